"""The `neco` console script: one entry point, one sub-command group per stage.

Each stage folder provides a torch-free `cli.py` with `register(subparsers)`; heavy imports
(torch, onnxruntime, pytriton) happen inside the handlers, so `neco segment` works with only
the client extra installed.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from neco.errors import MissingExtraError, run_reporting_errors

DISTRIBUTION = "neco-dense"

# Stage modules that contribute sub-commands, in the order they appear in --help.
STAGE_CLIS: tuple[str, ...] = (
    "neco.training.cli",
    "neco.export.cli",
    "neco.serving.cli",
    "neco.client.cli",
    "neco.app.cli",
    "neco.evaluation.cli",
    "neco.demo.cli",
)

STAGE_EXTRAS: dict[str, str] = {
    "neco.training.cli": "train",
    "neco.export.cli": "export",
    "neco.serving.cli": "serve",
    "neco.client.cli": "client",
    "neco.evaluation.cli": "eval",
    "neco.demo.cli": "all",
    "neco.app.cli": "app",
}
"""The extra that holds a stage's third-party dependencies, named when one of them is missing."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help unless it has no default or already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class NecoArgumentParser(argparse.ArgumentParser):
    """Every `neco` (sub-)parser: help shows defaults; a given formatter_class (raw text) keeps them too."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] | None = None, **kwargs: Any):
        if formatter_class is None:
            formatter_class = DefaultsHelpFormatter
        elif formatter_class is argparse.RawDescriptionHelpFormatter:
            formatter_class = _RawDescriptionDefaultsFormatter
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def format_help(self) -> str:
        """With a `config_model` default ("module:Class"), options and key=value settings show its defaults."""
        path = self.get_default("config_model")
        if path and not getattr(self, "_config_defaults_shown", False):
            self._config_defaults_shown = True
            self._show_config_defaults(path)
        return super().format_help()

    def _show_config_defaults(self, path: str) -> None:
        """Fill option help and the epilog from the pydantic model's defaults."""
        from neco.config import field_defaults

        module, _, name = path.partition(":")
        try:
            defaults = field_defaults(getattr(importlib.import_module(module), name))
        except ModuleNotFoundError:
            return  # the stage's extra is not installed; running the command says which
        for action in self._actions:
            if action.dest in defaults and action.default is None and "default" not in (action.help or ""):
                action.help = f"{action.help or ''} (default: {_shown(defaults[action.dest])})".replace("%", "%%")
        flagged = {action.dest for action in self._actions}
        rest = [f"{key}={_shown(value)}" for key, value in defaults.items() if key not in flagged]
        if rest:
            self.epilog = "\n".join(
                filter(None, [self.epilog, "settings (key=value) and defaults: " + ", ".join(rest)])
            )


def _shown(value: Any) -> str:
    """A default as a user would type it in key=value (None as null)."""
    return "null" if value is None else str(value)


class _RawDescriptionDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """A description kept as written, option defaults shown."""


def package_version() -> str:
    """The installed distribution's version (a source tree run without installing has none)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = NecoArgumentParser(prog="neco", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in STAGE_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # stage not present in this checkout
            raise
        before = set(sub.choices)
        module.register(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(extra=STAGE_EXTRAS.get(module_name))
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the chosen handler; expected errors end in one message.

    Shared by `neco` and the stage-only entry points (`python -m neco.client`), so every
    command reports errors the same way: `neco.errors.exit_code` decides the status.
    """
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    return run_reporting_errors(prog, lambda: _call_handler(prog, args))


def _call_handler(prog: str, args: argparse.Namespace) -> int | None:
    """The sub-command's handler; a missing third-party module names the extra that installs it."""
    try:
        return args.handler(args)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "neco":
            raise  # a stage of this project is missing: a broken install, keep the traceback
        raise MissingExtraError(prog, missing, getattr(args, "extra", None)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """The `neco` console script."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
