# The README's two commands: `make demo` and `make test`. Both (re)create .venv from the repo's
# own files; constraints.txt pins every package so no install ever downloads another torch.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint venv clean bench

demo: $(STAMP)
	$(PY) -m neco.demo --config configs/demo.yaml

# lint first (seconds), then the suite; the import rules are tests (tests/core/test_import_rules.py)
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

venv: $(STAMP)

# torch first, alone and pinned, so that no later resolver step can pick another build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

bench: $(STAMP)
	$(PY) benchmarks/sorter.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/segment.py

clean:
	rm -rf $(VENV) outputs demo_output model_repository
