"""The contract in a Triton model config (`config.pbtxt`): written, read and checked here only.

Export writes the config, serving and the client read it back, and all three check it with
`config_problems`; the config is built as Triton's own `model_config_pb2.ModelConfig` message
(not as hand-written text), so every field and enum is checked by the schema Triton parses.
Torch-free: needs only `tritonclient` (a dependency of the client, export and serve extras).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from neco.contract import ModelContract
from neco.errors import NecoError
from neco.signature import INPUT, OUTPUT_SPECS, SPECS

CONFIG_FILENAME = "config.pbtxt"
ONNX_FILENAME = "model.onnx"
PLAN_FILENAME = "model.plan"

Backend = Literal["onnxruntime", "tensorrt"]


class RepositoryError(NecoError, ValueError):
    """A model repository or model config cannot be written or read (not writable, exists, malformed)."""


class Scheduling(Protocol):
    """What a model config needs to know about batching and placement (export's TritonSettings)."""

    max_batch_size: int
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int
    max_queue_size: int
    instance_kind: str
    instance_count: int
    gpus: list[int]


def _data_type(spec_dtype: str) -> int:
    return mc.DataType.Value(f"TYPE_{spec_dtype}")


def build_model_config(
    model_name: str,
    contract: ModelContract,
    settings: Scheduling,
    backend: Backend = "onnxruntime",
    extra_parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """The served interface: UINT8 [-1,-1,3] images in, FP32 patch grids and CLS out.

    Batch is implicit (`max_batch_size` > 0), H and W are -1 because one graph serves every
    multiple-of-14 size. The contract travels in `parameters` so a client can discover the
    encoder, its normalisation and training hash from the server alone.
    """
    cfg = mc.ModelConfig(name=model_name, max_batch_size=settings.max_batch_size)
    if backend == "onnxruntime":
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = ONNX_FILENAME
    elif backend == "tensorrt":
        cfg.backend = "tensorrt"
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = PLAN_FILENAME
    else:
        raise RepositoryError(f"unknown Triton backend {backend!r}; expected onnxruntime or tensorrt")
    width = contract.embed_dim
    cfg.input.add(name=INPUT.name, data_type=_data_type(INPUT.triton_dtype), dims=INPUT.triton_dims(width))
    for spec in OUTPUT_SPECS:
        cfg.output.add(name=spec.name, data_type=_data_type(spec.triton_dtype), dims=spec.triton_dims(width))

    batching = cfg.dynamic_batching
    batching.preferred_batch_size.extend(settings.preferred_batch_sizes)
    batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    batching.default_queue_policy.max_queue_size = settings.max_queue_size
    batching.default_queue_policy.timeout_action = mc.ModelQueuePolicy.REJECT

    kind = mc.ModelInstanceGroup.Kind.Value(settings.instance_kind)
    group = cfg.instance_group.add(count=settings.instance_count, kind=kind)
    group.gpus.extend(settings.gpus)

    parameters = {**contract.to_parameters(), **(extra_parameters or {})}
    for key, value in sorted(parameters.items()):
        cfg.parameters[key].string_value = value
    return cfg


def config_to_text(cfg: mc.ModelConfig) -> str:
    """Protobuf text format, which is what Triton reads from config.pbtxt."""
    return text_format.MessageToString(cfg)


def parse_config_text(text: str, source: str = "<text>") -> mc.ModelConfig:
    """Parse config.pbtxt text with Triton's schema; malformed text raises RepositoryError."""
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source}: not a valid Triton model config: {exc}") from None
    return cfg


def read_model_config(model_dir: str | Path) -> mc.ModelConfig:
    """Read `<model_dir>/config.pbtxt` into a ModelConfig message."""
    path = Path(model_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist; not a Triton model directory")
    return parse_config_text(path.read_text(), str(path))


def contract_from_config(cfg: mc.ModelConfig) -> ModelContract:
    """Recover the ModelContract that export stored in the config's `parameters`."""
    return ModelContract.from_parameters({key: param.string_value for key, param in cfg.parameters.items()})


def config_problems(cfg: mc.ModelConfig, required: tuple[str, ...] | None = None) -> list[str]:
    """Differences between a model config's tensors and the served signature (empty: conforms).

    `required` limits the check to some tensors (a client needs only `images` and `features`);
    by default every contract tensor must be declared with its type and nothing else may be.
    """
    declared = {t.name: t.data_type for t in [*cfg.input, *cfg.output]}
    names = required or tuple(SPECS)
    problems = []
    if required is None:
        extra = sorted(set(declared) - set(SPECS))
        if extra:
            problems.append(f"tensors {extra} are not part of the served contract")
    for name in names:
        want = _data_type(SPECS[name].triton_dtype)
        if declared.get(name) != want:
            found = [(n, mc.DataType.Name(d)) for n, d in declared.items()]
            problems.append(f"tensor {name!r} must be {mc.DataType.Name(want)}; the config declares {found}")
    return problems
