"""End to end: `neco export` on a training artefact, and failures that must leave nothing behind."""

import json
import shutil

import pytest

from neco.cli import main
from neco.contract import ModelContract
from neco.export.config import ExportConfig
from neco.export.errors import ParityError, RepositoryError
from neco.export.pipeline import REPORT_FILENAME, export_model, run_export
from neco.model import WeightsError, save_artefact
from neco.triton_config import contract_from_config, read_model_config

ARCH = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, export_source_model):
    out = tmp_path_factory.mktemp("artefact")
    return save_artefact(export_source_model, ModelContract.for_arch(ARCH), out, {"recipe": "test", "seed": 0})


@pytest.fixture
def reuse_fixture_onnx(monkeypatch, model_repository_model_dir):
    """Skip the (slow, already fixture-tested) torch.onnx.export: hand out the fixture's graph.

    Valid because the artefact and the fixture hold the same weights; parity against the
    PyTorch model loaded from the artefact still runs for real and would catch any mismatch.
    """
    import neco.export.onnx_export as onnx_export

    def export_onnx(model, path, settings):
        shutil.copy(model_repository_model_dir / "1" / "model.onnx", path)
        return path

    monkeypatch.setattr(onnx_export, "export_onnx", export_onnx)


def test_cli_exports_training_artefact_as_int8_with_parity_report(artefact, tmp_path, capsys, reuse_fixture_onnx):
    repo = tmp_path / "repo"
    code = main(
        [
            "export",
            "onnx",
            "--config",
            "configs/export_onnx.yaml",
            "--source",
            str(artefact),
            "--out",
            str(repo),
            "--precision",
            "int8",
            "parity.sizes=[[112, 84], [70, 126]]",
            "parity.batch_sizes=[2]",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    model_dir = repo / "neco_dinov2"
    assert captured.out.strip() == str(model_dir)
    assert "parity_int8" in captured.err and "[export" in captured.err  # progress + parity reported
    cfg = read_model_config(model_dir)
    contract = contract_from_config(cfg)
    assert contract.arch == ARCH and len(contract.training_hash) == 16  # the artefact's config hash
    assert cfg.parameters["precision"].string_value == "int8"
    report = json.loads((model_dir / REPORT_FILENAME).read_text())
    assert report["onnx"] == {"opset": 18, "simplified": True}  # onnxslim ran; parity re-checked after it
    assert report["parity_fp32"]["max_abs_diff"] <= 1e-3
    assert report["parity_int8"]["min_mean_cosine"] >= 0.98
    assert {(c["height"], c["width"]) for c in report["parity_int8"]["cases"]} == {(112, 84), (70, 126)}
    assert sorted(p.name for p in repo.iterdir()) == ["neco_dinov2"]


def _cfg(tmp_path, **kw):
    return ExportConfig(source="unused", output=tmp_path / "repo", **kw)


def test_missing_weights_fail_before_writing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file"):
        run_export(_cfg(tmp_path).model_copy(update={"source": str(tmp_path / "nope")}))
    assert list((tmp_path / "repo").iterdir()) == []


def test_corrupt_weights_are_a_weights_error(artefact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artefact, broken)
    weights = broken / "backbone.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="broken"):
        run_export(_cfg(tmp_path).model_copy(update={"source": str(broken)}))
    assert list((tmp_path / "repo").iterdir()) == []


def test_existing_model_is_refused_before_loading(tmp_path):
    (tmp_path / "repo" / "neco_dinov2").mkdir(parents=True)
    with pytest.raises(RepositoryError, match="already exists"):
        run_export(_cfg(tmp_path))


def test_parity_failure_leaves_repository_untouched(tmp_path, export_source_model, reuse_fixture_onnx):
    """A real parity check that fails midway: the repository must stay empty."""
    cfg = _cfg(tmp_path, onnx={"simplify": False}, parity={"sizes": [[56, 42]], "batch_sizes": [1], "atol": 1e-12})
    with pytest.raises(ParityError, match="differs from PyTorch"):
        export_model(export_source_model, ModelContract.for_arch(ARCH), cfg, progress=lambda _m: None)
    assert list((tmp_path / "repo").iterdir()) == []


def test_cli_reports_typed_errors_with_exit_code(tmp_path, capsys):
    assert main(["export", "onnx", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "neither a file" in capsys.readouterr().err
    assert main(["export", "onnx", "--source", "x", "--arch", "vit_tiny_patch16_224"]) == 2
    assert "unknown architecture" in capsys.readouterr().err


def test_cli_inspect_prints_the_served_contract(model_repository_model_dir, capsys):
    assert main(["export", "inspect", str(model_repository_model_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["contract"]["arch"] == ARCH and printed["backend"] == "onnxruntime"
