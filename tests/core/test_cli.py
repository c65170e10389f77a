"""The `neco` console script: --version, defaults in --help, and a missing extra named instead of a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neco.cli import build_parser


def neco(*argv: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`neco ARGV` in a fresh interpreter where the `blocked` top-level modules cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # `import name` raises ModuleNotFoundError\n"
        "from neco.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_version():
    result = neco("--version")
    assert result.returncode == 0 and result.stdout.strip() == "neco 0.1.0"


@pytest.mark.parametrize(
    "argv, blocked, extra, module",
    [
        (["serve", "--repository", "."], ("pytriton",), "serve", "pytriton"),
        (["train", "--config", "configs/train_smoke.yaml"], ("torch",), "train", "torch"),
        (
            ["export", "onnx", "--config", "configs/export_onnx.yaml", "--source", "x"],
            ("torch", "onnx"),
            "export",
            None,
        ),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(argv, blocked, extra, module):
    result = neco(*argv, blocked=blocked)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"install the `{extra}` extra" in lines[0] and f'"./neco[{extra}]"' in lines[0]
    assert f"neco {argv[0]}" in lines[0]
    named = lines[0].split("Python package ")[1].split(",")[0].strip("'")
    assert named == module if module else named in blocked


def print_help(*argv: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])


def test_help_shows_defaults(capsys):
    for argv, expected in [
        (["segment"], ["neighbours per patch (default: 30)", "softmax temperature (default: 0.02)",
                       "Triton model name (default: neco_dinov2)", "transport (default: grpc)"]),
        (["bank", "build"], ["(default: the support images' own shorter side, at most 448)", "--index {flat,ivf,hnsw}", "(default: flat)"]),
        (["eval", "hummingbird"], ["(default: 448)", "(default: 30)", "(default: 0.02)", "(default: localhost:8001)"]),
        (["serve"], ["http_port=8000", "grpc_port=8001", "metrics_port=8002", "host=127.0.0.1"]),
    ]:  # fmt: skip
        print_help(*argv)
        text = " ".join(capsys.readouterr().out.split())
        for piece in expected:
            assert piece in text, (argv, piece)


def test_scenes_writes_the_readme_dataset_without_torch(tmp_path):
    """`neco scenes OUT` makes the README pipeline self-contained (steps 4-6 read OUT), torch blocked."""
    out = tmp_path / "scenes"
    result = neco("scenes", str(out), "--train", "3", "--val", "2", blocked=("torch", "torchvision", "timm"))
    assert result.returncode == 0, result.stderr
    assert (
        len(list((out / "train" / "images").glob("*.png"))) == 3 and len(list((out / "val" / "masks").iterdir())) == 2
    )
    assert (out / "classes.json").is_file() and "3+2 'textures' scenes (112 px, 4 classes)" in result.stdout
    bad = neco("scenes", str(tmp_path / "bad"), "--num-classes", "1")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--num-classes" in bad.stderr
