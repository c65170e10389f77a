"""Every install command and command line in README.md and docs/*.md is one this repository can run.

Checked without running them: a `pip install` of this project installs a local path (the
checkout, named `neco` by the README's convention, or a wheel `make wheel` writes) with extras
that pyproject.toml declares, since no package index has `neco-dense`; the files its options name
exist; every `make TARGET` is a target of the Makefile; every `neco COMMAND [SUBCOMMAND]` is a
sub-command of the `neco` console script.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DISTRIBUTION, VERSION = PROJECT["name"], PROJECT["version"]
EXTRAS = set(PROJECT["optional-dependencies"])
CHECKOUT = {".", "./neco", "neco", "./", "./neco/"}
"""How the pages name the checkout: from inside it, or from the folder holding it (named `neco`)."""
WHEEL = re.compile(rf"(?:.*/)?{DISTRIBUTION.replace('-', '_')}-(?:{re.escape(VERSION)}|<version>)-py3-none-any\.whl")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}


def shell_lines(page: Path) -> Iterator[tuple[int, str]]:
    """Lines of shell code blocks and inline code spans, with their line numbers."""
    language: str | None = None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            language = None if language is not None else fence.group(1)
            continue
        if language is not None:
            if language in SHELL_LANGUAGES:
                yield number, line.strip().removeprefix("$ ")
            continue
        for span in re.findall(r"`([^`]+)`", line):
            yield number, span


def commands(text: str) -> Iterator[list[str]]:
    """The simple commands of one shell line (split at && ; |), without comments."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return
    current: list[str] = []
    for word in words:
        if word in ("&&", "||", ";", "|", "&"):
            if current:
                yield current
            current = []
        else:
            current.append(word)
    if current:
        yield current


def found(program: str) -> list[tuple[str, list[str]]]:
    return [
        (f"{page.relative_to(REPO)}:{number}", command)
        for page in PAGES
        for number, line in shell_lines(page)
        for command in commands(line)
        if command and command[0] == program
    ]


def pip_install_problems(words: list[str]) -> list[str]:
    """Why one `pip install ...` is not runnable from this repository ([] if it is)."""
    problems, args = [], iter(words[2:])
    for word in args:
        if word in ("-c", "-r", "--constraint", "--requirement"):
            name = next(args, "")
            path = REPO / name.removeprefix("neco/")
            if not path.is_file():
                problems.append(f"{word} {name}: no such file in the checkout")
            continue
        if word.startswith("-"):
            continue
        base, _, extras = word.partition("[")
        is_ours = base in CHECKOUT or WHEEL.fullmatch(base) or base.lower() in (DISTRIBUTION, "neco", "neco_dense")
        if not is_ours:
            continue  # a third-party tool (pip-audit, ...)
        if not (base in CHECKOUT or WHEEL.fullmatch(base)):
            problems.append(f"{word}: no package index has {DISTRIBUTION}; install the checkout or a wheel")
        unknown = {e.strip() for e in extras.rstrip("]").split(",") if e.strip() and "<" not in e} - EXTRAS
        if unknown:
            problems.append(f"{word}: pyproject.toml has no extra {sorted(unknown)}")
    return problems


def test_pip_install_commands_install_this_checkout_with_declared_extras():
    commands_found = [(where, cmd) for where, cmd in found("pip") if cmd[1:2] == ["install"]]
    assert commands_found, "the pages name no pip install command: the test would check nothing"
    problems = [f"{where}: {p}" for where, cmd in commands_found for p in pip_install_problems(cmd)]
    assert not problems, "\n".join(problems)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


def test_make_targets_exist():
    targets = makefile_targets()
    missing = []
    for where, command in found("make"):
        args = iter(command[1:])
        for word in args:
            if word in ("-C", "-f"):
                next(args, None)
            elif not word.startswith("-") and "=" not in word and word not in targets:
                missing.append(f"{where}: make {word}")
    assert not missing, f"not a Makefile target: {missing}"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001  (argparse keeps sub-parsers there)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("program", ["neco"])
def test_neco_commands_exist(program):
    from neco.cli import build_parser

    top = subcommands(build_parser())
    unknown = []
    for where, command in found(program):
        words = [w for w in command[1:] if not w.startswith("-")]
        if not words or "<" in words[0] or words[0].endswith(":"):
            continue  # a placeholder, or a message such as `neco features: error: ...`
        parser = top.get(words[0])
        if parser is None:
            unknown.append(f"{where}: neco {words[0]}")
            continue
        nested = subcommands(parser)
        if nested and len(words) > 1 and words[1] not in nested and not {"<", "."} & set(words[1]):
            unknown.append(f"{where}: neco {words[0]} {words[1]}")
    assert not unknown, f"not a sub-command of neco: {unknown}"
