"""TensorRT: pure-Python parts everywhere; the engine build/parity only where tensorrt + CUDA exist."""

import shlex

import pytest

from neco.cli import main
from neco.export.config import TensorRTSettings
from neco.export.errors import EngineMismatchError, ExportError, ProfileError
from neco.export.tensorrt import (
    EngineMetadata,
    engine_name,
    engine_precision,
    trtexec_command,
    verify_engine,
    write_sidecar,
)

META = EngineMetadata(
    model_name="neco_dinov2",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    tensorrt_version="10.3.0",
    min_shape=(1, 224, 224),
    opt_shape=(4, 448, 448),
    max_shape=(8, 896, 896),
    precision="fp16",
)


def test_engine_name_encodes_gpu_tensorrt_version_profile_and_precision():
    name = engine_name(META)
    assert name == "neco_dinov2__NVIDIA-H100-80GB-HBM3_sm90__trt10.3.0__b1x224x224-4x448x448-8x896x896__fp16.plan"
    for changed in (
        {"gpu_name": "NVIDIA A100"},
        {"tensorrt_version": "10.4.0"},
        {"max_shape": (16, 896, 896)},
        {"precision": "bf16"},
        {"compute_capability": "8.0"},
    ):
        assert engine_name(META.model_copy(update=changed)) != name


def test_precision_label():
    assert engine_precision(TensorRTSettings(fp16=False)) == "fp32"
    assert engine_precision(TensorRTSettings(fp16=True, bf16=True)) == "fp16+bf16"


def _engine(tmp_path, meta=META, sidecar=True):
    path = tmp_path / engine_name(meta)
    path.write_bytes(b"serialized engine")
    if sidecar:
        write_sidecar(path, meta)
    return path


def test_matching_engine_is_accepted(tmp_path):
    verify_engine(_engine(tmp_path), META)


@pytest.mark.parametrize(
    "field,value", [("gpu_name", "NVIDIA L4"), ("tensorrt_version", "10.0.1"), ("opt_shape", (2, 448, 448))]
)
def test_engine_for_another_setup_is_refused(tmp_path, field, value):
    path = _engine(tmp_path)
    expected = META.model_copy(update={field: value})
    with pytest.raises(EngineMismatchError, match="is not"):
        verify_engine(path, expected)  # the file name already differs
    with pytest.raises(EngineMismatchError, match=f"{field}: engine"):
        verify_engine(path, expected, check_name=False)  # the sidecar is checked independently


def test_engine_without_or_with_broken_metadata_is_refused(tmp_path):
    path = _engine(tmp_path, sidecar=False)
    with pytest.raises(EngineMismatchError, match="no metadata sidecar"):
        verify_engine(path, META)
    path.with_name(path.name + ".json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="malformed engine metadata"):
        verify_engine(path, META)
    with pytest.raises(EngineMismatchError, match="does not exist"):
        verify_engine(tmp_path / "missing.plan", META)


def test_trtexec_command_carries_profile_precision_and_cache(tmp_path):
    settings = TensorRTSettings(
        min_shape=(1, 224, 224),
        opt_shape=(4, 448, 336),
        max_shape=(8, 896, 672),
        fp16=True,
        bf16=True,
        workspace_gib=2,
        timing_cache=tmp_path / "t.cache",
    )
    command = trtexec_command(tmp_path / "model.onnx", tmp_path / "model.plan", settings)
    assert command[0] == "trtexec"
    assert f"--onnx={tmp_path / 'model.onnx'}" in command
    assert "--minShapes=images:1x224x224x3" in command
    assert "--optShapes=images:4x448x336x3" in command
    assert "--maxShapes=images:8x896x672x3" in command
    assert {"--fp16", "--bf16", "--memPoolSize=workspace:2048", f"--timingCacheFile={tmp_path / 't.cache'}"} <= set(
        command
    )


def test_trtexec_command_refuses_bad_profile(tmp_path):
    bad = TensorRTSettings.model_construct(
        min_shape=(1, 224, 224),
        opt_shape=(4, 450, 448),
        max_shape=(8, 896, 896),
        fp16=True,
        bf16=False,
        workspace_gib=1.0,
        timing_cache=None,
    )
    with pytest.raises(ProfileError, match="multiples of the patch size"):
        trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", bad)


def test_cli_prints_trtexec_command(tmp_path, capsys):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"x")
    code = main(
        [
            "export",
            "trtexec",
            "--config",
            "configs/export_tensorrt.yaml",
            "--onnx",
            str(onnx_path),
            "--engine",
            str(tmp_path / "model.plan"),
            "fp16=false",
            "max_shape=[8, 448, 448]",
        ]
    )
    assert code == 0
    command = shlex.split(capsys.readouterr().out)
    assert "--maxShapes=images:8x448x448x3" in command and "--fp16" not in command
    assert main(["export", "trtexec", "--onnx", str(onnx_path), "--engine", "e.plan", "min_shape=[1, 100, 100]"]) == 2


def test_tensorrt_export_fails_fast_where_it_cannot_run(tmp_path, capsys):
    """Without tensorrt or a GPU the command stops before loading weights, with the reason."""
    try:
        from neco.export.tensorrt import require_tensorrt

        require_tensorrt()
        pytest.skip("tensorrt and a GPU are available here; the fail-fast path does not apply")
    except ExportError:
        pass
    code = main(
        [
            "export",
            "tensorrt",
            "--config",
            "configs/export_tensorrt.yaml",
            "--source",
            str(tmp_path / "never-read"),
            "--out",
            str(tmp_path / "repo"),
        ]
    )
    assert code == 1
    assert "backend tensorrt needs" in capsys.readouterr().err
    assert list((tmp_path / "repo").iterdir()) == []


@pytest.mark.tensorrt
def test_engine_build_and_parity_against_onnxruntime(request, tmp_path):
    """Needs the `tensorrt` package and a CUDA GPU; neither exists on the development machines."""
    pytest.importorskip("tensorrt", reason="TensorRT Python package not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU; torch.cuda.is_available() is False")
    model_repository_model_dir = request.getfixturevalue("model_repository_model_dir")  # only once it can run
    from neco.export.config import ExportConfig
    from neco.export.parity import ort_session
    from neco.export.tensorrt import build_and_check_engine, load_engine, read_sidecar

    onnx_path = model_repository_model_dir / "1" / "model.onnx"
    cfg = ExportConfig(
        source="fixture",
        backend="tensorrt",
        tensorrt={
            "min_shape": [1, 224, 196],
            "opt_shape": [2, 224, 224],
            "max_shape": [8, 448, 448],
            "fp16": False,
            "timing_cache": str(tmp_path / "timing.cache"),
            "engine_cache_dir": str(tmp_path / "engines"),
        },
    )
    files, report = build_and_check_engine(onnx_path, ort_session(onnx_path), cfg, tmp_path)
    assert report["parity_vs_onnxruntime"]["max_abs_diff"] <= 1e-3
    assert (tmp_path / "timing.cache").stat().st_size > 0
    meta = read_sidecar(files["model.plan"])
    load_engine(tmp_path / "engines" / engine_name(meta), meta)
    _, again = build_and_check_engine(onnx_path, ort_session(onnx_path), cfg, tmp_path)
    assert again["reused"] is True
