"""neco.export stage: trained or stock DINOv2 -> ONNX / TensorRT -> Triton model repository.

Importing this package stays torch-free (config validation and `--help` need no torch);
`run_export` loads the heavy pipeline on first use.
"""

from typing import Any

from neco.export.config import ExportConfig

__all__ = ["ExportConfig", "run_export"]


def run_export(cfg: ExportConfig, progress: Any = None):
    """See `neco.export.pipeline.run_export` (imported lazily: it needs torch)."""
    from neco.export.pipeline import run_export as _run_export

    return _run_export(cfg, progress)
