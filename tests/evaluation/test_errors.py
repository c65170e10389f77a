"""Every exception class of the evaluation and training stages is a `NecoError` (issue 27, item 5).

The one exit-code mapping (`neco.errors.exit_code`) and an application's single `except NecoError`
rely on it; the classes keep their other bases (ValueError, FileNotFoundError, RuntimeError).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import neco.evaluation
import neco.training
from neco.errors import EXIT_FAILURE, EXIT_USAGE, NecoError, exit_code


def _exception_classes() -> list[type[BaseException]]:
    """Exception classes defined (not imported) in any module of the two stages."""
    found = []
    for package in (neco.evaluation, neco.training):
        for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            if info.name.endswith(".__main__"):
                continue
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found.append(obj)
    return found


def test_the_walk_finds_the_stage_errors() -> None:
    names = {cls.__name__ for cls in _exception_classes()}
    assert {"DatasetError", "MissingDatasetFileError", "MetricError", "ProtocolError"} <= names
    assert {"SortingInputError", "SortingConfigError", "DataError"} <= names


@pytest.mark.parametrize("cls", _exception_classes(), ids=lambda cls: cls.__name__)
def test_every_stage_error_is_a_neco_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, NecoError)


def test_other_bases_and_exit_codes_are_kept() -> None:
    from neco.evaluation.datasets import DatasetError, MissingDatasetFileError
    from neco.evaluation.metrics import MetricError
    from neco.evaluation.protocols import ProtocolError
    from neco.training.data import DataError
    from neco.training.sorting import SortingConfigError, SortingInputError

    for cls in (DatasetError, MetricError, ProtocolError, SortingInputError, SortingConfigError):
        assert issubclass(cls, ValueError) and exit_code(cls("x")) == EXIT_USAGE
    assert issubclass(MissingDatasetFileError, FileNotFoundError)
    assert exit_code(MissingDatasetFileError("x")) == EXIT_USAGE
    assert issubclass(DataError, RuntimeError) and exit_code(DataError("x")) == EXIT_FAILURE
