"""`neco eval all`: every requested evaluation of every model, one JSON and one Markdown table.

The table has the NeCo paper's layout: one row per model, one column per (dataset, protocol), so
stock DINOv2 and a NeCo model can be compared side by side from one command. Every column header
names the protocol that produced it (see docs/evaluation.md for which paper each is comparable with).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from neco.atomic import make_parent
from neco.contract import DEFAULT_INPUT_SIZE, DEFAULT_K, DEFAULT_TEMPERATURE
from neco.evaluation.backends import BackendConfig, BackendError
from neco.evaluation.config import build_backend
from neco.evaluation.datasets import DatasetError
from neco.evaluation.hummingbird import deprecated_beta
from neco.evaluation.overcluster import DEFAULT_CLUSTERS, OverclusterProtocol
from neco.evaluation.overcluster import PROTOCOL_HELP as OVERCLUSTER_HELP
from neco.evaluation.protocols import PROTOCOLS

Evaluation = Literal["overcluster", "hummingbird", "linear", "keypoints"]
SEGMENTATION_DATASETS = ("voc", "ade20k", "coco-stuff", "cityscapes", "folder")
DATASET_TITLES = {
    "voc": "VOC",
    "ade20k": "ADE20k",
    "coco-stuff": "COCO-Stuff-27",
    "cityscapes": "Cityscapes",
    "folder": "folder",
    "spair": "SPair-71k",
}


def _split_named(value: str, what: str) -> tuple[str, str]:
    if "=" in value:
        name, _, rest = value.partition("=")
        if name and rest:
            return name, rest
    if what == "model":
        return Path(value).stem or value, value
    raise ValueError(f"{what} {value!r} must be NAME=ROOT, e.g. voc=/data/VOCdevkit")


class ReportConfig(BaseModel):
    """Settings of `neco eval all`; every model runs with the same backend kind and options."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, description="NAME=SOURCE or SOURCE (artefact, checkpoint, model dir)")
    datasets: list[str] = Field(
        min_length=1, description="KIND=ROOT; KIND in voc ade20k coco-stuff cityscapes folder spair"
    )
    evaluations: list[Evaluation] = ["overcluster", "hummingbird", "linear", "keypoints"]
    protocol: Literal["hbird-eval", "strict", "both"] = "both"
    clusters: list[PositiveInt] = Field([max(DEFAULT_CLUSTERS)], min_length=1, description="overclustering K values")
    overcluster_protocol: OverclusterProtocol = Field("neco", description="neco (the NeCo repository's) | raw")
    input_size: int = Field(DEFAULT_INPUT_SIZE, ge=1, description="rounded down to the model's patch multiple")
    train_split: str = Field("train", description="memory / head split of every segmentation dataset")
    val_split: str = "val"
    train_subset: int = Field(1, ge=1)
    val_subset: int = Field(1, ge=1)
    k: int = Field(DEFAULT_K, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0)
    memory_size: int | None = Field(None, ge=1)
    epochs: int = Field(10, ge=1, description="linear head epochs")
    seed: int = 0
    hbird_eval_std_typo: bool = False
    backend: BackendConfig = BackendConfig()
    out: Path = Path("outputs/eval/report")

    _beta = model_validator(mode="before")(deprecated_beta)

    @model_validator(mode="after")
    def _check_named(self) -> ReportConfig:
        for kind, _ in self.named_datasets:
            if kind not in (*SEGMENTATION_DATASETS, "spair"):
                raise ValueError(f"unknown dataset {kind!r}; use {', '.join((*SEGMENTATION_DATASETS, 'spair'))}")
        names = [name for name, _ in self.named_models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}; name them NAME=SOURCE")
        return self

    @property
    def named_models(self) -> list[tuple[str, str]]:
        return [_split_named(m, "model") for m in self.models]

    @property
    def named_datasets(self) -> list[tuple[str, str]]:
        return [_split_named(d, "dataset") for d in self.datasets]


def _segmentation(cfg: ReportConfig, backend: object, kind: str, root: str) -> dict[str, dict]:
    from neco.evaluation.hummingbird import HummingbirdConfig, run_hummingbird
    from neco.evaluation.linear import LinearConfig, run_linear
    from neco.evaluation.overcluster import OverclusterConfig, run_overcluster

    common = dict(
        dataset=kind,
        data_root=root,
        train_split=cfg.train_split,
        val_split=cfg.val_split,
        input_size=cfg.input_size,
        seed=cfg.seed,
        hbird_eval_std_typo=cfg.hbird_eval_std_typo,
        backend=cfg.backend,
    )
    out: dict[str, dict] = {}
    if "overcluster" in cfg.evaluations:
        oc = OverclusterConfig(
            **common, clusters=cfg.clusters, val_subset=cfg.val_subset, protocol=cfg.overcluster_protocol
        )
        out["overcluster"] = run_overcluster(oc, backend)  # type: ignore[arg-type]
    if "hummingbird" in cfg.evaluations:
        hb = HummingbirdConfig(
            **common, protocol=cfg.protocol, train_subset=cfg.train_subset, val_subset=cfg.val_subset,
            k=cfg.k, temperature=cfg.temperature, memory_size=cfg.memory_size,
        )  # fmt: skip
        out["hummingbird"] = run_hummingbird(hb, backend)  # type: ignore[arg-type]
    if "linear" in cfg.evaluations:
        lin = LinearConfig(**common, train_subset=cfg.train_subset, epochs=cfg.epochs)
        out["linear"] = run_linear(lin, backend)  # type: ignore[arg-type]
    return out


def columns(cfg: ReportConfig) -> list[tuple[str, str, str]]:
    """(dataset kind, evaluation, result key) of every table column, in the paper's order."""
    cols = []
    for kind, _ in cfg.named_datasets:
        if kind == "spair":
            if "keypoints" in cfg.evaluations:
                cols += [(kind, "keypoints", "pck@0.1"), (kind, "keypoints", "pck@0.05")]
            continue
        if "overcluster" in cfg.evaluations:
            cols += [(kind, "overcluster", f"k={k}") for k in cfg.clusters]
        if "hummingbird" in cfg.evaluations:
            cols += [(kind, "hummingbird", p) for p in (PROTOCOLS if cfg.protocol == "both" else (cfg.protocol,))]
        if "linear" in cfg.evaluations:
            cols.append((kind, "linear", "linear"))
    return cols


def cell(report: dict, evaluation: str, key: str) -> float | None:
    """The headline number (0-1) of one column from one evaluation report."""
    if evaluation == "linear":
        return report.get("miou")
    if evaluation == "keypoints":
        return report.get(key, {}).get("mean")
    return report.get("results", {}).get(key, {}).get("miou")


def header(kind: str, evaluation: str, key: str) -> str:
    title = DATASET_TITLES[kind]
    if evaluation == "overcluster":
        return f"{title} overclustering {key.replace('k=', 'K=')}"
    if evaluation == "hummingbird":
        return f"{title} dense NN ({key})"
    if evaluation == "keypoints":
        return f"{title} {key.upper()}"
    return f"{title} linear"


def markdown_table(cfg: ReportConfig, results: dict[str, dict[str, dict[str, dict]]]) -> str:
    """Rows = models, columns = dataset x protocol, values mIoU / PCK in percent."""
    cols = columns(cfg)
    lines = [
        "| model | " + " | ".join(header(*c) for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, per_dataset in results.items():
        values = []
        for kind, evaluation, key in cols:
            value = cell(per_dataset.get(kind, {}).get(evaluation, {}), evaluation, key)
            values.append("-" if value is None else f"{100 * value:.1f}")
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    lines += [
        "",
        "dense NN (hbird-eval): open-hummingbird-eval v2.0.0 protocol, comparable with the NeCo / DIP / "
        "open-hummingbird-eval tables; dense NN (strict): this project's protocol (not comparable); "
        f"overclustering ({cfg.overcluster_protocol}): {OVERCLUSTER_HELP[cfg.overcluster_protocol]}, many-to-one "
        "matching; SPair: PCK of the target bounding box.",
    ]
    return "\n".join(lines) + "\n"


def run_report(cfg: ReportConfig) -> dict[str, object]:
    """Run everything, write `<out>.json` and `<out>.md`, return the JSON document."""
    from neco.evaluation.keypoints import KeypointConfig, run_keypoints

    started = time.perf_counter()
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for name, source in cfg.named_models:
        # A SOURCE that is no file or directory is a timm architecture (stock weights).
        update = {"model": Path(source)} if Path(source).exists() else {"model": None, "arch": source}
        backend_cfg = cfg.backend.model_copy(update=update)
        holder = cfg.model_copy(update={"backend": backend_cfg})
        try:
            backend = build_backend(backend_cfg, cfg.hbird_eval_std_typo)
        except (BackendError, OSError, ValueError) as exc:
            raise BackendError(f"model {name!r} ({source}): {exc}") from None
        results[name] = {}
        for kind, root in cfg.named_datasets:
            print(f"eval all: {name} on {kind}")
            if kind == "spair":
                if "keypoints" in cfg.evaluations:
                    kp = KeypointConfig(data_root=root, input_size=cfg.input_size, backend=backend_cfg)
                    results[name][kind] = {"keypoints": run_keypoints(kp, backend)}  # type: ignore[arg-type]
                continue
            try:
                results[name][kind] = _segmentation(holder, backend, kind, root)
            except DatasetError as exc:
                raise DatasetError(f"{kind}={root}: {exc}") from None
    document: dict[str, object] = {
        "evaluation": "all",
        "config": cfg.model_dump(mode="json"),
        "columns": [
            {"dataset": k, "evaluation": e, "protocol": p, "header": header(k, e, p)} for k, e, p in columns(cfg)
        ],
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
    make_parent(cfg.out)
    cfg.out.with_suffix(".json").write_text(json.dumps(document, indent=2))
    table = markdown_table(cfg, results)
    cfg.out.with_suffix(".md").write_text(table)
    print(table)
    return document
