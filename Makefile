# The README's two commands: `make demo` and `make test`. Both (re)create .venv from the repo's
# own files; constraints.txt pins every package so no install ever downloads another torch.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-client-numpy2 lint venv clean bench deps-system wheel gpu-wheels

demo: $(STAMP)
	$(PY) -m neco.demo --config configs/demo.yaml

# lint first (seconds), then the client beside numpy 2 (about a minute, below), then the suite; the import
# rules are tests (tests/core/test_import_rules.py)
test: deps-system lint test-client-numpy2
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

venv: $(STAMP)

# System tools some tests run (tests/deploy: `kubectl kustomize`, kustomize v5; tests/app/test_app.py: a
# headless browser). Idempotent: installs only what is missing, as Debian packages: `chromium` and `chromium-driver`
# from Debian's archive, and `kubectl`, which Debian's own archive does not carry (its kubernetes-client is 1.20,
# too old): its apt source is the Kubernetes (pkgs.k8s.io) or Google Cloud SDK repository. .ci/run calls this first.
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo )apt-get
deps-system:
	@command -v kubectl >/dev/null || { $(APT_GET) update && $(APT_GET) install -y kubectl; } \
	  || echo "deps-system: no apt source offers kubectl (add pkgs.k8s.io, docs/scaling.md); its tests will skip" >&2
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
	  || { $(APT_GET) update && $(APT_GET) install -y chromium chromium-driver; } \
	  || echo "deps-system: cannot install chromium + chromium-driver; the browser test of neco app will skip" >&2

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

# The wheel of the package (configs/*.yaml inside as neco.configs), built from a temporary copy of
# the sources so nothing (build/, *.egg-info) is written into the checkout, which may be read-only:
#   make wheel WHEEL_DIR=/tmp/wheels && pip install "/tmp/wheels/neco_dense-0.1.0-py3-none-any.whl[client]"
# WHEEL_FLAGS=--no-build-isolation builds with the current environment's setuptools (offline).
WHEEL_DIR ?= dist
WHEEL_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
WHEEL_FLAGS ?=
wheel:
	@src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	tar -c --exclude-vcs --exclude=./.venv --exclude='./$(WHEEL_DIR)' --exclude=./build --exclude='*.egg-info' \
	  --exclude=__pycache__ --exclude=./outputs --exclude=./demo_output --exclude=./model_repository . \
	  | tar -x -C "$$src" && \
	$(WHEEL_PYTHON) -m pip --disable-pip-version-check wheel -q --no-deps $(WHEEL_FLAGS) -w "$(abspath $(WHEEL_DIR))" "$$src"
	@ls "$(abspath $(WHEEL_DIR))"/neco_dense-*.whl

# What benchmarks/gpu_check.sh --wheels DIR installs on the lent GPU machine (Python 3.12, torch/timm/onnx
# there already, no network): the packages it lacks (tritonclient for the contract's config.pbtxt; grpcio and
# protobuf are there), pinned as in constraints.txt, and this project's wheel.
GPU_WHEELS ?= .whl
GPU_PACKAGES := pydantic pydantic_core annotated-types typing-inspection typing_extensions diffsort tritonclient python-rapidjson
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -c constraints.txt -d $(GPU_WHEELS) $(GPU_PACKAGES)
	$(MAKE) -s wheel WHEEL_DIR=$(GPU_WHEELS) WHEEL_FLAGS=--no-build-isolation

# The client lives beside numpy 2 (only the `serve` extra pins numpy<2): a second, client-only environment,
# made from the wheel's [client] extra with numpy>=2 (constraints-numpy2.txt), without torch (checked), runs
# tests/client except what needs another extra or a served model: test_retrieval.py (torch is its reference),
# test_milvus.py (the milvus extra) and the tests that ask for the embedded server (deselected by their
# fixtures, tests/packaging/client_only.py). The environment is made again when pyproject.toml or
# constraints-numpy2.txt change; the wheel is rebuilt and reinstalled on every run.
NUMPY2_DIR ?= build/numpy2
NUMPY2_PY := $(NUMPY2_DIR)/venv/bin/python
NUMPY2_PIP := $(NUMPY2_PY) -m pip --disable-pip-version-check
NUMPY2_WHEEL = $$(ls $(abspath $(NUMPY2_DIR))/wheel/neco_dense-*.whl)
NUMPY2_TESTS := tests/client --ignore=tests/client/test_retrieval.py --ignore=tests/client/test_milvus.py

$(NUMPY2_DIR)/venv/.installed: pyproject.toml constraints-numpy2.txt $(STAMP)
	rm -rf $(NUMPY2_DIR) && mkdir -p $(NUMPY2_DIR)
	$(MAKE) -s wheel WHEEL_DIR=$(NUMPY2_DIR)/wheel WHEEL_FLAGS=--no-build-isolation >/dev/null
	$(PYTHON) -m venv $(NUMPY2_DIR)/venv
	$(NUMPY2_PIP) install -q --no-compile -c constraints-numpy2.txt \
	  "$(NUMPY2_WHEEL)[client,client-http]" "numpy>=2" pytest pytest-timeout hypothesis
	touch $@

test-client-numpy2: $(NUMPY2_DIR)/venv/.installed
	rm -rf $(NUMPY2_DIR)/wheel
	$(MAKE) -s wheel WHEEL_DIR=$(NUMPY2_DIR)/wheel WHEEL_FLAGS=--no-build-isolation >/dev/null
	$(NUMPY2_PIP) install -q --no-compile --no-deps --force-reinstall "$(NUMPY2_WHEEL)"
	$(NUMPY2_PY) -c "import importlib.util as u, numpy, neco; \
	  assert int(numpy.__version__.split('.')[0]) >= 2, numpy.__version__; \
	  assert u.find_spec('torch') is None, 'torch in the client-only environment'; \
	  assert 'site-packages' in neco.__file__, neco.__file__; print('client-only, numpy', numpy.__version__)"
	$(NUMPY2_PY) -m pytest -p no:cacheprovider -p tests.packaging.client_only -m "not slow" $(NUMPY2_TESTS)

clean:
	rm -rf $(VENV) outputs demo_output model_repository build
