"""The exported model the embedded server serves: its `config.pbtxt` and newest ONNX version, checked.

Read before anything starts, so a repository that cannot be served ends in one message
(a missing model lists the ones the repository holds).
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2

from neco.serving.runtime import ModelLoadError
from neco.triton_config import CONFIG_FILENAME, ONNX_FILENAME, config_problems, read_model_config


def find_model_version(model_dir: Path, filename: str) -> int:
    """The newest numeric version folder holding `filename` (Triton's default `latest: 1` policy)."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / filename).is_file()]
    if not versions:
        raise ModelLoadError(
            f"{model_dir} has no <version>/{filename}: the embedded server runs ONNX through onnxruntime, "
            f"so export with backend=onnxruntime (TensorRT plans are served by the Docker Triton)"
        )
    return max(versions)


def check_served_signature(config: model_config_pb2.ModelConfig) -> None:
    """The exported config must declare the contract's tensors, batched (dynamic batching needs it)."""
    problems = config_problems(config)
    if problems:
        raise ModelLoadError(f"model config {config.name!r}: " + "; ".join(problems))
    if config.max_batch_size < 1:
        raise ModelLoadError(f"model config {config.name!r}: max_batch_size must be >= 1 for dynamic batching")


def exported_model(repository: Path, model_name: str) -> tuple[model_config_pb2.ModelConfig, int]:
    """The exported config of `model_name` and its newest ONNX version, checked to be servable."""
    model_dir = repository / model_name
    if not (model_dir / CONFIG_FILENAME).is_file():
        available = sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILENAME).is_file())
        if available:
            raise FileNotFoundError(
                f"model {model_name!r} is not in {repository}; it holds {available} (model_name=NAME)"
            )
        raise FileNotFoundError(f"{model_dir}/{CONFIG_FILENAME} not found: is {repository} a model repository?")
    exported = read_model_config(model_dir)
    check_served_signature(exported)
    return exported, find_model_version(model_dir, ONNX_FILENAME)
