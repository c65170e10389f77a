"""One error base class for the whole project and one mapping of errors to exit codes.

Every typed error a stage raises derives from `NecoError`, so applications can catch the
project's failures with one `except`, and every `neco` sub-command (and `python training/run.py`)
reports them the same way: one line on stderr, no traceback, and an exit status that says
whether the caller's input was wrong (2) or the environment or a computation failed (1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
"""A step failed although the request was well-formed (export parity, server died, ...)."""
EXIT_USAGE = 2
"""The caller's input is wrong: a config, a path, an image, a flag (argparse uses 2 too)."""


class NecoError(Exception):
    """Base class of every error the project raises on purpose."""

    exit_code: int | None = None
    """Exit status of a command that ends with this error; None: decided by `exit_code()`."""


class InputError(NecoError, ValueError):
    """A value given by the caller violates the contract (image shape, size limit, ...)."""


class MissingExtraError(NecoError, ModuleNotFoundError):
    """A command needs a third-party package of an extra that is not installed."""

    exit_code = EXIT_FAILURE

    def __init__(self, command: str, module: str, extra: str | None) -> None:
        self.module, self.extra = module, extra
        if extra is None:
            hint = "install the extra of this command"
        else:
            hint = (
                f'install the `{extra}` extra: pip install -c neco/constraints.txt "./neco[{extra}]" beside a checkout '
                f'named neco, or "neco_dense-<version>-py3-none-any.whl[{extra}]" from `make wheel` (README.md, Install)'
            )
        super().__init__(f"`{command}` needs the Python package {module!r}, which is not installed; {hint}")
        self.name = module


def exit_code(exc: BaseException) -> int | None:
    """The exit status for an expected error, or None for a bug (which keeps its traceback).

    An error class may fix its status (`NecoError.exit_code`); otherwise input-like errors
    (`ValueError`, missing files) mean the caller can fix the command, so they get
    `EXIT_USAGE`; the project's other errors are failures of a step or of the environment and
    get `EXIT_FAILURE`.
    """
    if isinstance(exc, NecoError) and exc.exit_code is not None:
        return exc.exit_code
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE
    if isinstance(exc, (NecoError, PermissionError)):
        return EXIT_FAILURE
    return None


def run_reporting_errors(prog: str, handler: Callable[[], int | None]) -> int:
    """Run a command body; expected errors become `prog: error: message` and their exit code."""
    try:
        return int(handler() or EXIT_OK)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return code
