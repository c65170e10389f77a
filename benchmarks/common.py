"""What every benchmark shares: machine information and the one result-file schema.

Every file in `benchmarks/results/` has the same top-level keys (`RESULT_KEYS`), so results
from different benchmarks, machines and dates can be loaded and compared by one reader:

    schema     "neco-benchmark/1"
    benchmark  the script's name ("sorter", "serving", ...)
    created    UTC timestamp of the run
    machine    `machine_info()`: CPU, cores, load, Python, package versions, GPU if any
    settings   the arguments and fixed parameters of the run
    results    the measurements (a list of rows or a mapping; the script's docstring says which)
    goal       what the numbers are compared with and whether it was met, or null

Speed goals are ratios measured side by side in one run, never absolute times.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SCHEMA = "neco-benchmark/1"
RESULT_KEYS: tuple[str, ...] = ("schema", "benchmark", "created", "machine", "settings", "results", "goal")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES: tuple[str, ...] = ("torch", "timm", "onnxruntime", "faiss-cpu", "nvidia-pytriton", "tritonclient", "numpy")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    """The CUDA device name when torch is installed and sees a GPU; never imports torch otherwise."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured; load average is taken now, before the timed work."""
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": _gpu_name(),
        "packages": packages,
    }


def default_path(benchmark: str, device: str = "cpu") -> Path:
    """`benchmarks/results/<benchmark>_<device>.json`, the committed location."""
    return RESULTS_DIR / f"{benchmark}_{device}.json"


def make_result(
    benchmark: str,
    settings: dict[str, Any],
    results: Any,
    goal: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble one result document with exactly the schema's keys."""
    return {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine if machine is not None else machine_info(),
        "settings": settings,
        "results": results,
        "goal": goal,
    }


def write_result(document: dict[str, Any], path: Path) -> Path:
    """Check the schema and write the JSON (atomically: a crash never leaves half a file)."""
    if tuple(document) != RESULT_KEYS or document["schema"] != SCHEMA:
        raise ValueError(f"benchmark result must have keys {RESULT_KEYS}, got {tuple(document)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
