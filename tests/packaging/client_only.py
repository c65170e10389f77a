"""pytest plugin for `make test-client-numpy2`: the client's tests that need no served model.

The client-only environment (the wheel's `[client]` extra beside numpy 2) has no torch, export
or PyTriton, so a test that asks for the session's embedded Triton server cannot run there.
Such tests are deselected by the fixtures they request, not by name, so a new server test in
tests/client is left out automatically and every other new client test runs beside numpy 2.
Used as `pytest -p tests.packaging.client_only`; it changes nothing in the main suite.
"""

from __future__ import annotations

import pytest

SERVER_FIXTURES = frozenset({"triton_server", "model_repository", "export_source_model"})
"""tests/fixtures/server.py and model_repository.py: they export a torch model and start Triton."""


def needs_server(item: pytest.Item) -> bool:
    """Whether `item` requests a fixture that exports or serves a model (directly or through another)."""
    return bool(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests that need a server, reported as deselected like `-m` does."""
    deselected = [item for item in items if needs_server(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not needs_server(item)]
