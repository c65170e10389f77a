"""One name per concept across every `neco` sub-command; old spellings work for one release, with a notice.

The walk classifies every option by what it means (its choices, destination and help), not by its
name, so a new command that spells a known concept differently (`--input-size`, `--protocol grpc`,
`--model NAME`) fails here unless it is a `deprecated_alias` of the canonical flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from neco.cli import VOCABULARY, DeprecatedAlias, build_parser

TRANSPORT, SCORING, MODEL_NAME, SOURCE, SIZE, TEMPERATURE = VOCABULARY
SECOND_NAMES = {"--overcluster-protocol"}
"""Flags allowed beside a concept's canonical one: `neco eval all` scores two evaluations, each by its protocol."""

COMMANDS = {
    "neco features", "neco segment", "neco novelty", "neco bank build", "neco bank append", "neco bank novelty",
    "neco eval hummingbird", "neco eval linear", "neco eval overcluster", "neco eval keypoints", "neco eval all",
    "neco serve", "neco gateway", "neco app", "neco export onnx", "neco export tensorrt", "neco scenes", "neco train",
}  # fmt: skip


def walk(parser: argparse.ArgumentParser, path: str = "neco") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under `parser`, named by its command line."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


def concept(action: argparse.Action) -> str | None:
    """Which `VOCABULARY` concept an option stands for, from its meaning (None: none of them)."""
    if isinstance(action, DeprecatedAlias):
        return concept(action.target)
    text, dest = (action.help or "").lower(), action.dest
    if set(action.choices or ()) == {"grpc", "http"} or "grpc | http" in text:
        return TRANSPORT
    if "model name" in text:
        return MODEL_NAME
    if dest.split(".")[-1].endswith("protocol") or {"hbird-eval", "strict"} & set(action.choices or ()):
        return SCORING
    if dest in ("backend.model", "models", "source", "model", "model_path", "weights"):
        return SOURCE
    if dest in ("size", "input_size") or "encoder input" in text or "input side" in text:
        return SIZE
    if "temperature" in text or dest in ("temperature", "beta"):
        return TEMPERATURE
    return None


def options() -> Iterator[tuple[str, argparse.ArgumentParser, argparse.Action, str]]:
    for path, parser in walk(build_parser()):
        for action in parser._actions:
            meaning = concept(action) if action.option_strings else None
            if meaning is not None:
                yield path, parser, action, meaning


def test_every_command_is_walked_and_every_concept_met() -> None:
    paths = {path for path, _ in walk(build_parser())}
    assert COMMANDS <= paths, COMMANDS - paths
    assert {meaning for *_, meaning in options()} == set(VOCABULARY)


def test_one_name_per_concept_across_every_command() -> None:
    wrong = [
        f"{path}: {flag} means {meaning!r}, which is {VOCABULARY[meaning]}"
        for path, _, action, meaning in options()
        if not isinstance(action, DeprecatedAlias)
        for flag in action.option_strings
        if flag != VOCABULARY[meaning] and flag not in SECOND_NAMES
    ]
    assert not wrong, "\n".join(wrong)


def test_old_spellings_are_hidden_aliases_of_the_canonical_flag() -> None:
    aliases = 0
    for path, parser, action, meaning in options():
        if isinstance(action, DeprecatedAlias):
            aliases += 1
            assert action.canonical == VOCABULARY[meaning] and action.target in parser._actions, path
            assert action.help == argparse.SUPPRESS and action.default == argparse.SUPPRESS, path
    assert aliases >= 10  # --protocol/--model in the client commands and app, --input-size/--model/--beta in eval


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["segment", "q.png", "--bank", "b", "--protocol", "http", "--model", "m"], {"transport": "http", "model_name": "m"}),
        (["app", "--protocol", "http"], {"protocol": "http"}),
        (["eval", "hummingbird", "--data-root", "d", "--input-size", "112", "--beta", "0.1", "--model", "a"],
         {"input_size": 112, "temperature": 0.1, "backend.model": "a"}),
        (["eval", "all", "--model", "x=a", "--model", "y=b"], {"models": ["x=a", "y=b"]}),
    ],
)  # fmt: skip
def test_old_spellings_still_work_with_one_line_each(argv, expected, capsys) -> None:
    args = build_parser().parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected
    notes = capsys.readouterr().err.strip().splitlines()
    old = [flag for flag in argv if flag in ("--protocol", "--model", "--input-size", "--beta")]
    assert len(notes) == len(old) and all(
        note.startswith(f"note: {flag} is deprecated") for note, flag in zip(notes, old)
    )


def test_canonical_spellings_say_nothing(capsys) -> None:
    args = build_parser().parse_args(["eval", "hummingbird", "--data-root", "d", "--size", "112", "--source", "a"])
    assert (args.input_size, getattr(args, "backend.model")) == (112, "a") and capsys.readouterr().err == ""


def test_eval_uses_the_served_model_unless_given_weights_or_a_backend() -> None:
    """Regression: `neco eval` defaulted to --backend torch, alone among the commands that need features."""
    from neco.evaluation.backends import BackendConfig
    from neco.evaluation.config import served_unless_given

    assert served_unless_given(BackendConfig()).kind == "triton"
    assert served_unless_given(BackendConfig(model="outputs/train/artefact")).kind == "torch"
    assert served_unless_given(BackendConfig(arch="vit_small_patch14_reg4_dinov2")).kind == "torch"
    assert served_unless_given(BackendConfig(kind="onnx")).kind == "onnx"
    assert served_unless_given(BackendConfig(kind="torch")).kind == "torch"  # chosen: kept (and it says what it needs)
