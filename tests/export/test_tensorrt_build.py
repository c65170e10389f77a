"""The strongly typed build, driven against fake `tensorrt` modules with TensorRT 10's and 11's members.

No GPU or TensorRT is needed: the fakes record every builder call and every enum member
touched, and, like the real bindings, raise AttributeError for a member their version lacks
(TensorRT 11's BuilderFlag has no FP16/BF16). The tests assert the calls a build makes per
version and precision, not a mocked success.
"""

import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neco.export.config import TensorRTSettings
from neco.export.errors import ExportError
from neco.export.tensorrt_build import build_engine, network_flags, strongly_typed_opt_in, trtexec_command

# TensorRT 10.x Python bindings' BuilderFlag members (10.13), precision flags included.
TRT10_BUILDER_FLAGS = (
    "FP16 BF16 INT8 FP8 INT4 FP4 DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS SAFETY_SCOPE "
    "OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS DIRECT_IO REJECT_EMPTY_ALGORITHMS VERSION_COMPATIBLE "
    "EXCLUDE_LEAN_RUNTIME ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE WEIGHTLESS STRIP_PLAN REFIT_IDENTICAL "
    "WEIGHT_STREAMING REFIT_INDIVIDUAL STRICT_NANS MONITOR_MEMORY EDITABLE_TIMING_CACHE DISTRIBUTIVE_INDEPENDENCE"
).split()
# TensorRT 11.4's BuilderFlag members: no precision flag exists any more.
TRT11_BUILDER_FLAGS = (
    "DEBUG GPU_FALLBACK DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS SAFETY_SCOPE DIRECT_IO "
    "VERSION_COMPATIBLE ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE STRIP_PLAN REFIT_IDENTICAL "
    "WEIGHT_STREAMING REFIT_INDIVIDUAL STRICT_NANS MONITOR_MEMORY DISTRIBUTIVE_INDEPENDENCE"
).split()
NETWORK_FLAGS = {
    "10": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_AOT_PYTHON_PLUGINS": 2, "PREFER_JIT_PYTHON_PLUGINS": 3},
    "11": {"STRONGLY_TYPED": 0},  # kept for API compatibility, ignored: strong typing is the only mode
}
SETTINGS = TensorRTSettings(min_shape=(1, 224, 196), opt_shape=(2, 224, 224), max_shape=(8, 448, 448), workspace_gib=2)


class FakeEnum:
    """A pybind11-like enum: known members are ints, any other name raises AttributeError."""

    def __init__(self, name: str, members, touched: list) -> None:
        self._name = name
        self._members = dict(members) if isinstance(members, dict) else {m: i for i, m in enumerate(members)}
        self._touched = touched

    def __getattr__(self, member: str) -> int:
        if member.startswith("_"):
            raise AttributeError(member)
        self._touched.append(f"{self._name}.{member}")
        if member not in self._members:
            raise AttributeError(f"type object 'tensorrt.{self._name}' has no attribute '{member}'")
        return self._members[member]


def fake_tensorrt(version: str, *, parses: bool = True, builds: bool = True) -> types.ModuleType:
    """A `tensorrt` stand-in of `version` that records calls in `.calls` and enum members in `.touched`."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls, trt.touched = [], []
    major = version.split(".")[0]
    trt.BuilderFlag = FakeEnum(
        "BuilderFlag", TRT11_BUILDER_FLAGS if major == "11" else TRT10_BUILDER_FLAGS, trt.touched
    )
    trt.NetworkDefinitionCreationFlag = FakeEnum(
        "NetworkDefinitionCreationFlag", NETWORK_FLAGS.get(major, {}), trt.touched
    )
    trt.MemoryPoolType = FakeEnum("MemoryPoolType", ["WORKSPACE"], trt.touched)
    record = trt.calls.append

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            record(("Logger", severity))

    class TimingCache:
        def serialize(self):
            return b"timing cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            record(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            record(("set_flag", flag))

        def add_optimization_profile(self, profile):
            record(("add_optimization_profile", profile.shapes))

        def create_timing_cache(self, data):
            record(("create_timing_cache", bytes(data)))
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            record(("set_timing_cache", ignore_mismatch))
            return True

        def get_timing_cache(self):
            return TimingCache()

    class Profile:
        shapes = None

        def set_shape(self, name, minimum, optimum, maximum):
            self.shapes = (name, minimum, optimum, maximum)

    class Builder:
        def __init__(self, logger):
            record(("Builder",))

        def create_network(self, flags):
            record(("create_network", flags))
            return "network"

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record(("build_serialized_network", network))
            return b"serialized plan" if builds else None

    class OnnxParser:
        num_errors = 0 if parses else 1

        def __init__(self, network, logger):
            record(("OnnxParser", network))

        def parse_from_file(self, path):
            record(("parse_from_file", path))
            return parses

        def get_error(self, index):
            return "In node 3 (Resize): unsupported mode"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


def tiny_onnx(path, precision: str = "fp32"):
    """A one-MatMul graph whose weight has `precision`'s type (what `onnx_precision` reads)."""
    weight = np.arange(8, dtype=np.float32).reshape(4, 2)
    elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    if precision == "fp16":
        init = numpy_helper.from_array(weight.astype(np.float16), "w")
    elif precision == "bf16":
        bits = (weight.view(np.uint32) >> 16).astype(np.uint16)  # these small integers are exact in bf16
        init = helper.make_tensor("w", elem, [4, 2], bits.tobytes(), raw=True)
    else:
        init = numpy_helper.from_array(weight, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", elem, [None, 4])],
        [helper.make_tensor_value_info("y", elem, [None, 2])],
        [init],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _names(calls):
    return [call[0] for call in calls]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "version,flags,touched",
    [
        ("10.3.0", 1 << 1, ["NetworkDefinitionCreationFlag.STRONGLY_TYPED", "MemoryPoolType.WORKSPACE"]),
        ("11.4.0.106", 0, ["MemoryPoolType.WORKSPACE"]),
    ],
)
def test_build_is_strongly_typed_with_no_precision_flag(tmp_path, version, flags, touched, precision):
    trt = fake_tensorrt(version)
    onnx_path = tiny_onnx(tmp_path / f"model_{precision}.onnx", precision)
    engine = build_engine(onnx_path, tmp_path / "e.plan", SETTINGS, precision, trt=trt)

    assert engine.read_bytes() == b"serialized plan"
    assert ("create_network", flags) in trt.calls  # TRT 10: 1 << STRONGLY_TYPED; TRT 11: always strongly typed
    assert ("parse_from_file", str(onnx_path)) in trt.calls  # the precision is the parsed ONNX's
    assert "set_flag" not in _names(trt.calls)
    assert trt.touched == touched  # never a BuilderFlag, on either version
    assert ("set_memory_pool_limit", 0, 2 * 2**30) in trt.calls
    profile = ("images", (1, 224, 196, 3), (2, 224, 224, 3), (8, 448, 448, 3))
    assert ("add_optimization_profile", profile) in trt.calls
    assert _names(trt.calls).index("parse_from_file") < _names(trt.calls).index("build_serialized_network")


def test_fake_tensorrt11_lacks_the_precision_flags_like_the_real_one():
    """Guards the fake itself: what the old FP16 code path did now raises, as on TensorRT 11.4."""
    trt = fake_tensorrt("11.4.0.106")
    for member in ("FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS"):
        with pytest.raises(AttributeError, match=member):
            getattr(trt.BuilderFlag, member)
    assert trt.BuilderFlag.TF32 >= 0 and fake_tensorrt("10.3.0").BuilderFlag.FP16 >= 0


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0", "unknown"])
def test_unsupported_versions_fail_before_any_builder_call(tmp_path, version):
    trt = fake_tensorrt(version)
    with pytest.raises(ExportError, match="TensorRT|version"):
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "e.plan", SETTINGS, "fp32", trt=trt)
    assert trt.calls == [] and not (tmp_path / "e.plan").exists()


def test_onnx_of_another_precision_is_refused(tmp_path):
    """A strongly typed engine computes in the ONNX's types: an FP32 graph cannot become an fp16 engine."""
    trt = fake_tensorrt("10.3.0")
    with pytest.raises(ExportError, match="holds fp32 weights, not fp16"):
        build_engine(tiny_onnx(tmp_path / "m.onnx", "fp32"), tmp_path / "e.plan", SETTINGS, "fp16", trt=trt)
    with pytest.raises(ExportError, match="holds bf16 weights, not fp16"):
        build_engine(tiny_onnx(tmp_path / "b.onnx", "bf16"), tmp_path / "e.plan", SETTINGS, "fp16", trt=trt)
    assert trt.calls == []


def test_parse_and_build_failures_are_export_errors(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="could not parse .*unsupported mode"):
        build_engine(onnx_path, tmp_path / "e.plan", SETTINGS, "fp32", trt=fake_tensorrt("11.4.0", parses=False))
    with pytest.raises(ExportError, match="failed to build"):
        build_engine(onnx_path, tmp_path / "e.plan", SETTINGS, "fp32", trt=fake_tensorrt("10.3.0", builds=False))
    assert not (tmp_path / "e.plan").exists()


def test_timing_cache_is_read_and_written(tmp_path):
    cache = tmp_path / "caches" / "timing.cache"
    settings = SETTINGS.model_copy(update={"timing_cache": cache})
    trt = fake_tensorrt("10.3.0")
    build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "e.plan", settings, "fp32", trt=trt)
    assert ("create_timing_cache", b"") in trt.calls and cache.read_bytes() == b"timing cache"
    cache.write_bytes(b"previous")
    trt = fake_tensorrt("11.4.0")
    build_engine(tmp_path / "m.onnx", tmp_path / "e.plan", settings, "fp32", trt=trt)
    assert ("create_timing_cache", b"previous") in trt.calls and ("set_timing_cache", False) in trt.calls


def test_version_handling_lives_in_one_place():
    assert strongly_typed_opt_in("10.0.1") and strongly_typed_opt_in("10.13.3.9")
    assert not strongly_typed_opt_in("11.0") and not strongly_typed_opt_in("11.4.0.106")
    assert network_flags(fake_tensorrt("10.3.0")) == 2 and network_flags(fake_tensorrt("11.4.0")) == 0


@pytest.mark.parametrize("version,strongly_typed_flag", [("10.3", True), ("10.13.3", True), ("11.4", False)])
def test_trtexec_command_per_version(tmp_path, version, strongly_typed_flag):
    command = trtexec_command(tmp_path / "m_fp16.onnx", tmp_path / "m.plan", SETTINGS, version)
    assert ("--stronglyTyped" in command) is strongly_typed_flag  # 11: always on, the flag is not needed
    assert not {"--fp16", "--bf16", "--int8", "--best"} & set(command)  # removed in 11; unused on 10
    assert f"--onnx={tmp_path / 'm_fp16.onnx'}" in command
    with pytest.raises(ExportError, match="not supported"):
        trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", SETTINGS, "9.3")


def test_require_tensorrt_refuses_an_unsupported_installed_version(monkeypatch):
    from neco.export.tensorrt import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("12.1.0"))
    with pytest.raises(ExportError, match="TensorRT 12.1.0 is not supported"):
        require_tensorrt()
