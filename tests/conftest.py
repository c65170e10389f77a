"""Shared fixtures live in tests/fixtures/, one module per providing stage."""

pytest_plugins = [
    "tests.fixtures.scenes",
    "tests.fixtures.model_repository",
    "tests.fixtures.server",
]
