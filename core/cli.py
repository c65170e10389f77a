"""The `neco` console script: one entry point, one sub-command group per stage.

Each stage folder provides a torch-free `cli.py` with `register(subparsers)`; heavy imports
(torch, onnxruntime, pytriton) happen inside the handlers, so `neco segment` works with only
the client extra installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from neco.errors import MissingExtraError, run_reporting_errors

DISTRIBUTION = "neco-dense"

VOCABULARY: dict[str, str] = {
    "Triton transport (grpc | http)": "--transport",
    "scoring protocol of an evaluation": "--protocol",
    "Triton model name (served)": "--model-name",
    "weights to load (artefact, checkpoint, model.onnx, timm id)": "--source",
    "encoder input size": "--size",
    "softmax temperature": "--temperature",
}
"""One flag per concept across every sub-command (`tests/core/test_vocabulary.py` walks the parsers).

Old spellings (`--protocol grpc`, `--model NAME`, `--input-size`, `--beta`) are `deprecated_alias`es
for one release: hidden from --help, still accepted, with a one-line notice on stderr."""

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


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: hidden from --help, it still works and says so once on stderr."""

    def __init__(self, option_strings: list[str], dest: str, target: argparse.Action, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.target = target
        self.canonical = target.option_strings[0]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        print(
            f"note: {option} is deprecated and goes in the next release; use {self.canonical}",
            file=sys.stderr,
            flush=True,
        )
        self.target(parser, namespace, values, option)


def deprecated_alias(container: Any, target: argparse.Action, *old: str) -> None:
    """Accept the `old` spellings of `target`'s flag (a parser or argument group's action) for one release."""
    for flag in old:
        container.add_argument(
            flag, action=DeprecatedAlias, target=target, dest=target.dest, nargs=target.nargs, const=target.const,
            type=target.type, choices=target.choices, metavar=target.metavar, default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )  # fmt: skip


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
    _register_scenes(sub)
    return parser


def _register_scenes(subparsers: Any) -> None:
    """`neco scenes OUT`: the generated dataset of the README pipeline (core only: numpy and Pillow)."""
    from neco.scenes import SCENE_FAMILIES

    scenes = subparsers.add_parser(
        "scenes",
        help="write the generated scenes dataset (images/ + masks/ per split, classes.json); no torch, no server",
        description="Write OUT/train and OUT/val, each with images/ and masks/, and OUT/classes.json: the "
        "colour-independent 'textures' scenes `make demo` uses, for `neco bank build OUT/train` and "
        "`neco eval hummingbird --data-root OUT`.",
    )
    scenes.add_argument("out", type=Path, help="dataset folder to write (e.g. demo_output/scenes)")
    scenes.add_argument("--train", type=int, default=24, help="images of the train split (the bank's support)")
    scenes.add_argument("--val", type=int, default=12, help="images of the val split (queries)")
    scenes.add_argument("--image-size", type=int, default=112, help="side of each square image, pixels")
    scenes.add_argument("--num-classes", type=int, default=4, help="classes, background included")
    scenes.add_argument("--family", choices=sorted(SCENE_FAMILIES), default="textures", help="scene family")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.set_defaults(handler=_scenes, extra=None)


def _scenes(args: argparse.Namespace) -> int:
    from neco.contract import registered_patch_sizes
    from neco.errors import InputError
    from neco.scenes import write_scene_dataset

    smallest = min(registered_patch_sizes())
    if args.image_size < smallest or args.num_classes < 2:
        raise InputError(
            f"need --image-size >= {smallest} and --num-classes >= 2, got {args.image_size} and {args.num_classes}"
        )
    try:
        root = write_scene_dataset(
            args.out, {"train": args.train, "val": args.val}, size=(args.image_size, args.image_size),
            num_classes=args.num_classes, seed=args.seed, family=args.family,
        )  # fmt: skip
    except ValueError as exc:  # a negative split size
        raise InputError(str(exc)) from exc
    print(
        f"{args.train}+{args.val} '{args.family}' scenes ({args.image_size} px, {args.num_classes} classes) -> {root}"
    )
    return 0


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
