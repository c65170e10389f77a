"""TensorRT: pure-Python parts everywhere; the engine build/parity only where tensorrt + CUDA exist.

The builder's calls per TensorRT version are tested against fake modules in test_tensorrt_build.py.
"""

import json
import shlex

import pytest

from neco.cli import main
from neco.config import ConfigError, load_config
from neco.export.config import ExportConfig, TensorRTSettings
from neco.export.errors import EngineMismatchError, ExportError, ProfileError
from neco.export.precision import onnx_precision
from neco.export.tensorrt import EngineMetadata, engine_name, verify_engine, write_sidecar
from neco.export.tensorrt_build import trtexec_command
from tests.export.test_tensorrt_build import tiny_onnx

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


def test_precision_is_chosen_by_the_top_level_setting_not_builder_flags():
    cfg = load_config(ExportConfig, None, ["source=x", "backend=tensorrt", "precision=bf16"])
    assert cfg.precision == "bf16"
    with pytest.raises(ConfigError, match="tensorrt.fp16/bf16 are gone.*precision: fp16"):
        load_config(ExportConfig, None, ["source=x", "backend=tensorrt", "tensorrt.fp16=true"])
    with pytest.raises(ConfigError, match="instead of precision int8"):
        load_config(ExportConfig, None, ["source=x", "backend=tensorrt", "precision=int8"])
    with pytest.raises(ConfigError, match="bf16 is for backend tensorrt"):
        load_config(ExportConfig, None, ["source=x", "backend=onnxruntime", "precision=bf16"])


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


def test_engine_parsed_from_another_onnx_is_refused(tmp_path):
    """Same model name, GPU and profile, other weights (say DINOv3 exported after DINOv2): rebuild."""
    path = _engine(tmp_path)
    with pytest.raises(EngineMismatchError, match="onnx_sha256: engine '' != here 'abc'"):
        verify_engine(path, META.model_copy(update={"onnx_sha256": "abc"}))


def test_engine_without_or_with_broken_metadata_is_refused(tmp_path):
    path = _engine(tmp_path, sidecar=False)
    with pytest.raises(EngineMismatchError, match="no metadata sidecar"):
        verify_engine(path, META)
    path.with_name(path.name + ".json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="malformed engine metadata"):
        verify_engine(path, META)
    with pytest.raises(EngineMismatchError, match="does not exist"):
        verify_engine(tmp_path / "missing.plan", META)


def test_trtexec_command_carries_profile_and_cache(tmp_path):
    settings = TensorRTSettings(
        min_shape=(1, 224, 224),
        opt_shape=(4, 448, 336),
        max_shape=(8, 896, 672),
        workspace_gib=2,
        timing_cache=tmp_path / "t.cache",
    )
    command = trtexec_command(tmp_path / "model.onnx", tmp_path / "model.plan", settings, "10.3.0")
    assert command[0] == "trtexec"
    assert f"--onnx={tmp_path / 'model.onnx'}" in command
    assert "--minShapes=images:1x224x224x3" in command
    assert "--optShapes=images:4x448x336x3" in command
    assert "--maxShapes=images:8x896x672x3" in command
    assert {"--stronglyTyped", "--memPoolSize=workspace:2048", f"--timingCacheFile={tmp_path / 't.cache'}"} <= set(
        command
    )


def test_trtexec_command_refuses_bad_profile(tmp_path):
    bad = TensorRTSettings.model_construct(
        min_shape=(1, 224, 224),
        opt_shape=(4, 450, 448),
        max_shape=(8, 896, 896),
        workspace_gib=1.0,
        timing_cache=None,
    )
    with pytest.raises(ProfileError, match="multiples of the patch size"):
        trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", bad, "10.3.0")


def _trtexec(onnx_path, engine, *extra):
    return main(["export", "trtexec", "--onnx", str(onnx_path), "--engine", str(engine), *extra])


def test_cli_trtexec_writes_the_reduced_onnx_from_the_config_precision(tmp_path, capsys):
    """configs/export_tensorrt.yaml asks for fp16: the FP32 ONNX is converted and that file is parsed."""
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    config = ["--config", "configs/export_tensorrt.yaml", "--tensorrt-version", "10.3", "max_shape=[8, 448, 448]"]
    assert _trtexec(onnx_path, tmp_path / "model.plan", *config) == 0
    command = shlex.split(capsys.readouterr().out)
    assert (
        f"--onnx={tmp_path / 'model_fp16.onnx'}" in command and onnx_precision(tmp_path / "model_fp16.onnx") == "fp16"
    )
    assert "--maxShapes=images:8x448x448x3" in command and "--stronglyTyped" in command
    assert not {"--fp16", "--bf16"} & set(command)


def test_cli_trtexec_per_version_and_precision(tmp_path, capsys):
    fp32 = tiny_onnx(tmp_path / "model.onnx")
    assert _trtexec(fp32, tmp_path / "e.plan", "--precision", "fp32", "--tensorrt-version", "11.4") == 0
    command = shlex.split(capsys.readouterr().out)
    assert f"--onnx={fp32}" in command and "--stronglyTyped" not in command  # TensorRT 11: always strongly typed
    bf16 = tmp_path / "elsewhere" / "bf16.onnx"
    bf16.parent.mkdir()
    args = ("--precision", "bf16", "--tensorrt-version", "10.13", "--reduced-onnx", str(bf16))
    assert _trtexec(fp32, tmp_path / "e.plan", *args) == 0
    assert f"--onnx={bf16}" in shlex.split(capsys.readouterr().out) and onnx_precision(bf16) == "bf16"
    # an ONNX already in the asked precision is used as it is; one in another reduced precision is refused
    assert _trtexec(bf16, tmp_path / "e.plan", "--precision", "bf16", "--tensorrt-version", "10.3") == 0
    assert f"--onnx={bf16}" in shlex.split(capsys.readouterr().out)
    assert _trtexec(bf16, tmp_path / "e.plan", "--precision", "fp16", "--tensorrt-version", "10.3") == 1
    assert "holds bf16 weights: pass the FP32 export" in capsys.readouterr().err


def test_cli_trtexec_refuses_bad_input(tmp_path, capsys):
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    assert _trtexec(onnx_path, "e.plan", "--tensorrt-version", "10.3", "min_shape=[1, 100, 100]") == 2
    assert _trtexec(onnx_path, "e.plan", "--tensorrt-version", "10.3", "fp16=false") == 2
    assert "tensorrt.fp16/bf16 are gone" in capsys.readouterr().err
    assert _trtexec(onnx_path, "e.plan", "--tensorrt-version", "9.3") == 1
    assert "TensorRT 9.3 is not supported" in capsys.readouterr().err
    assert _trtexec(tmp_path / "missing.onnx", "e.plan", "--tensorrt-version", "10.3") == 2
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert _trtexec(onnx_path, "e.plan") == 1  # the container's TensorRT cannot be guessed here
        assert "pass --tensorrt-version" in capsys.readouterr().err


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
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_build_and_parity_against_onnxruntime(request, tmp_path, precision):
    """Needs the `tensorrt` package and a CUDA GPU; neither exists on the development machines."""
    pytest.importorskip("tensorrt", reason="TensorRT Python package not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU; torch.cuda.is_available() is False")
    model_repository_model_dir = request.getfixturevalue("model_repository_model_dir")  # only once it can run
    from neco.export.parity import ort_session
    from neco.export.precision import TENSORRT_FP32_OPS, reduced_precision_onnx
    from neco.export.tensorrt import build_and_check_engine, load_engine, read_sidecar

    fp32 = model_repository_model_dir / "1" / "model.onnx"
    onnx_path = fp32
    if precision != "fp32":
        onnx_path = reduced_precision_onnx(fp32, tmp_path / f"{precision}.onnx", precision, TENSORRT_FP32_OPS)
    cfg = ExportConfig(
        source="fixture",
        backend="tensorrt",
        precision=precision,
        tensorrt={
            "min_shape": [1, 224, 196],
            "opt_shape": [2, 224, 224],
            "max_shape": [8, 448, 448],
            "timing_cache": str(tmp_path / "timing.cache"),
            "engine_cache_dir": str(tmp_path / "engines"),
        },
    )
    files, report = build_and_check_engine(onnx_path, ort_session(fp32), cfg, tmp_path, patch_size=14)
    parity = report["parity_vs_onnxruntime"]
    if precision == "fp32":
        assert parity["max_abs_diff"] <= 1e-3
    else:
        assert parity["min_mean_cosine"] >= cfg.parity.min_cosine_fp16 and parity["max_abs_diff"] > 0
    assert (tmp_path / "timing.cache").stat().st_size > 0
    meta = read_sidecar(files["model.plan"])
    assert meta.precision == precision and report["strongly_typed"] is True
    load_engine(tmp_path / "engines" / engine_name(meta), meta)
    _, again = build_and_check_engine(onnx_path, ort_session(fp32), cfg, tmp_path, patch_size=14)
    assert again["reused"] is True


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_pipeline_parses_the_reduced_onnx_it_writes(
    tmp_path, monkeypatch, export_source_model, model_repository_model_dir, precision
):
    """backend tensorrt + precision fp16/bf16: the engine step gets the reduced graph (LayerNorm in FP32).

    The FP32 export is the fixture's (same weights) and the engine step is replaced by one that
    records what it was handed; everything before it (parity, conversion) runs for real.
    """
    import shutil

    import onnx

    import neco.export.onnx_export as onnx_export
    import neco.export.tensorrt as tensorrt
    from neco.contract import ModelContract
    from neco.export.pipeline import REPORT_FILENAME, export_model
    from neco.triton_config import read_model_config

    def export_onnx(model, path, settings):
        shutil.copy(model_repository_model_dir / "1" / "model.onnx", path)
        return path

    handed = {}

    def build_and_check_engine(onnx_path, reference_session, cfg, work, patch_size):
        model = onnx.load(str(onnx_path))
        norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
        weights = {init.name: init.data_type for init in model.graph.initializer}
        handed.update(precision=onnx_precision(onnx_path), ln_weight_types={weights[n.input[1]] for n in norms})
        plan = work / "model.plan"
        plan.write_bytes(b"plan")
        return {plan.name: plan}, {"precision": cfg.precision, "engine_name": "fake.plan"}

    monkeypatch.setattr(onnx_export, "export_onnx", export_onnx)
    monkeypatch.setattr(tensorrt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt, "build_and_check_engine", build_and_check_engine)
    cfg = ExportConfig(
        source="fixture",
        output=tmp_path / "repo",
        backend="tensorrt",
        precision=precision,
        onnx={"simplify": False},
        parity={"sizes": [[56, 42]], "batch_sizes": [1]},
    )
    model_dir = export_model(
        export_source_model, ModelContract.for_arch("vit_small_patch14_reg4_dinov2"), cfg, progress=lambda _m: None
    )
    assert handed == {"precision": precision, "ln_weight_types": {onnx.TensorProto.FLOAT}}
    assert read_model_config(model_dir).parameters["precision"].string_value == precision
    report = json.loads((model_dir / REPORT_FILENAME).read_text())
    if precision == "fp16":
        assert report["parity_fp16"]["min_mean_cosine"] >= 0.99
    else:
        assert "no BF16 kernels" in report["parity_bf16"]["skipped"]
