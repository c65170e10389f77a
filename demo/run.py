"""The end-to-end demo (`make demo`): every stage of the service, on generated scenes, in minutes.

    python -m neco.demo --config configs/demo.yaml [key=value ...]      (also `neco demo`)

1. generate a small scene dataset (train = support set, val = queries + scoring)
   (by default the "textures" family: colour says nothing about the class, texture and shape do)
2. post-pretrain with NeCo (configs/train_demo_cpu.yaml), starting from saved starting weights
3. export both the starting and the post-pretrained backbone to ONNX in one Triton repository
4-5. for each model: start the embedded Triton server, build a memory bank from the support
   set through `NecoClient`, `segment()` the queries, score val (Hummingbird mIoU), stop it
   and measure ordering agreement (the quantity NeCo optimises, `neco.evaluation.ordering`)
6. print per-class IoU, mIoU and ordering agreement side by side; write panel.png (image | ground
   truth | start | after NeCo | after NeCo, guided), pca.png, per-model overlays and summary.json

The protocol's numbers and the start / after NeCo columns use bilinear upsampling (the Hummingbird
protocol's); the last column and the `guided` scores upsample the same label scores guided by the
image (`neco.client.upsample`), with boundary IoU beside mIoU for both.

The starting weights are written first and handed to training as `model.weights`, so "before"
and "after" differ only by the NeCo run. Uses CUDA for training when present. This is the one
module that composes all stages; no stage imports it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from neco.contract import DEFAULT_ARCH, DEFAULT_K, DEFAULT_MODEL_NAME, DEFAULT_TEMPERATURE, supported_arch_spec
from neco.errors import run_reporting_errors
from neco.layout import IMAGES_DIR

START_MODEL_NAME = "neco_start"


class SceneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: int = Field(24, ge=1, description="support images (bank) and NeCo training images")
    val: int = Field(12, ge=1, description="scored query images")
    size: int = Field(112, ge=1)
    num_classes: int = Field(4, ge=2)
    family: Literal["textures", "shapes"] = Field("textures", description="neco.scenes family")


class DemoConfig(BaseModel):
    """configs/demo.yaml."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Path("demo_output")
    seed: int = 0
    arch: str = Field(DEFAULT_ARCH, description="backbone (`--backbone`): any supported neco.contract.ARCHS name")
    scenes: SceneSettings = SceneSettings()
    train_config: Path = Path("configs/train_demo_cpu.yaml")
    train_overrides: list[str] = Field(default_factory=list, description="key=value overrides of the train config")
    device: str = Field("auto", description="auto | cpu | cuda (training; the server picks CUDA itself)")
    input_size: int = Field(112, ge=1, description="square encoder input for bank and queries (patch multiple)")
    k: int = Field(DEFAULT_K, ge=1)
    temperature: float = Field(
        DEFAULT_TEMPERATURE,
        gt=0,
        validation_alias=AliasChoices("temperature", "beta"),
        description="softmax temperature",
    )
    memory_size: int | None = Field(None, ge=1)
    pictures: int = Field(4, ge=0, description="query images in the panel, the PCA sheet and the overlays")
    ordering_references: int = Field(4, ge=1, description="support images the ordering metric's references come from")
    export_parity: bool = Field(True, description="check each ONNX export against PyTorch")

    @model_validator(mode="after")
    def _sizes_fit_the_backbone(self) -> DemoConfig:
        patch = supported_arch_spec(self.arch).patch_size
        if self.input_size % patch or self.scenes.size < patch:
            raise ValueError(
                f"input_size {self.input_size} and scenes.size {self.scenes.size} must suit {self.arch}'s "
                f"{patch}-px patches (input_size a multiple of {patch})"
            )
        return self


class Stages:
    """Numbered, timed progress lines so a newcomer sees where the minutes go."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.started = total, 0, time.perf_counter()

    def __call__(self, title: str) -> None:
        self.index += 1
        print(f"\n[{self.index}/{self.total}] {title}  (t={time.perf_counter() - self.started:.0f}s)", flush=True)

    def note(self, message: str) -> None:
        print(f"      {message}", flush=True)


def save_starting_weights(cfg: DemoConfig, out: Path) -> Path:
    """Seeded random-init backbone (no model hub here), saved as a training artefact."""
    import torch

    from neco.contract import ModelContract
    from neco.model import create_backbone, save_artefact

    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg.arch).eval()
    return save_artefact(model, ModelContract.for_arch(cfg.arch), out, {"demo_start": True, "seed": cfg.seed})


def post_pretrain(cfg: DemoConfig, start: Path, images: Path, device: str) -> Path:
    """NeCo from `cfg.train_config` on the demo's own training images; returns the artefact dir."""
    from neco.training.config import load_train_config
    from neco.training.run import train

    overrides = [
        f"output_dir={cfg.output_dir / 'train'}",
        f"seed={cfg.seed}",
        f"model.arch={cfg.arch}",
        f"model.weights={start}",
        "data.kind=folder",
        f"data.root={images}",
        f"runtime.device={device}",
        f"runtime.precision={'bf16' if device == 'cuda' else 'fp32'}",
        *cfg.train_overrides,
    ]
    return train(load_train_config(cfg.train_config, overrides))


def export(cfg: DemoConfig, source: Path, repository: Path, name: str, device: str, stages: Stages) -> Path:
    from neco.export.config import ExportConfig
    from neco.export.pipeline import run_export

    size = (cfg.input_size, cfg.input_size)
    export_cfg = ExportConfig(
        source=str(source),
        output=repository,
        model_name=name,
        overwrite=True,
        onnx={"simplify": False, "example_size": size},
        parity={"enabled": cfg.export_parity, "sizes": [size], "batch_sizes": [1]},
        triton={
            "instance_kind": "KIND_GPU" if device == "cuda" else "KIND_CPU",
            "max_batch_size": 8,
            "preferred_batch_sizes": [8],
        },
    )
    return run_export(export_cfg, progress=stages.note)


def evaluate_served(
    cfg: DemoConfig, repository: Path, name: str, train, val, pictures: Path, stages: Stages
) -> tuple[dict[str, object], dict[str, list]]:
    """Serve one model, bank the support set through the client, segment and score the queries.

    Returns (scores, picture material: predicted masks and PCA pictures of the first queries).
    """
    from neco.client import NecoClient, batch_features, features_to_rgb, prepare_image, segment
    from neco.evaluation.boundary import BoundaryAccumulator
    from neco.evaluation.hummingbird import build_bank, evaluate_bank
    from neco.evaluation.ordering import ordering_agreement
    from neco.serving import EmbeddedServer, ServeConfig

    size = (cfg.input_size, cfg.input_size)
    serve_cfg = ServeConfig(repository=repository, model_name=name, http_port=0, grpc_port=0, metrics_port=0)
    stages.note(f"starting the embedded Triton server for {name!r}")
    material: dict[str, list] = {"masks": [], "masks_guided": [], "pca": []}
    upsampled: dict[str, dict[str, float]] = {}
    with EmbeddedServer(serve_cfg) as server, NecoClient(server.grpc_url, "grpc", model=name, size=size) as client:
        stages.note(f"serving on grpc {server.grpc_url} / http {server.http_url}; building the bank")
        bank = build_bank(client, train, train.class_names, size, memory_size=cfg.memory_size, seed=cfg.seed)
        bank.save(cfg.output_dir / "banks" / name)
        stages.note(f"{bank!r}; segmenting {len(val)} val images")
        scored = {}
        for method in ("bilinear", "guided"):  # bilinear: the protocol's numbers; guided: the last column's
            edges = BoundaryAccumulator(list(bank.class_names))
            scored[method] = evaluate_bank(
                client, bank, val, k=cfg.k, temperature=cfg.temperature, upsample=method, boundary=edges
            )
            upsampled[method] = {"miou": scored[method].miou, "boundary_iou": edges.result().miou}
        result = scored["bilinear"]
        references = [train[i][0] for i in range(min(cfg.ordering_references, len(train)))]
        queries = [val[i][0] for i in range(len(val))]
        ordering = ordering_agreement(client, queries, references, size=cfg.input_size, seed=cfg.seed)
        stages.note(f"ordering agreement {ordering.mean_spearman:.3f} over {ordering.points} aligned patches")
        for i in range(min(cfg.pictures, len(val))):
            image, _ = val[i]
            seg = segment(client, image, bank, k=cfg.k, temperature=cfg.temperature, upsample="bilinear")
            seg.overlay(image).save(pictures / f"query{i}_{name}_overlay.png")
            material["masks"].append(seg.mask)
            guided = segment(client, image, bank, k=cfg.k, temperature=cfg.temperature, upsample="guided")
            material["masks_guided"].append(guided.mask)
            feats = batch_features(client, [prepare_image(image, size, client.contract.patch_size).array])[0]
            material["pca"].append(features_to_rgb(feats, size=(2 * image.shape[0], 2 * image.shape[1])))
    stages.note(f"server for {name!r} stopped")
    scores = {
        "model": name,
        "bank_patches": len(bank),
        **result.to_dict(),
        "upsample": "bilinear",
        "boundary_iou": upsampled["bilinear"]["boundary_iou"],
        "guided": upsampled["guided"],
        "ordering": ordering.to_dict(),
    }
    return scores, material


def write_ground_truth(val, count: int, pictures: Path) -> None:
    from neco.client import overlay

    for i in range(min(count, len(val))):
        image, mask = val[i]
        overlay(image, mask, val.class_names).save(pictures / f"query{i}_ground_truth.png")


def run_demo(cfg: DemoConfig) -> dict[str, object]:
    """All stages; returns (and writes to output_dir/summary.json) the side-by-side results."""
    from neco.evaluation.datasets import load_dataset
    from neco.model import resolve_device
    from neco.scenes import write_scene_dataset

    stages = Stages(6)
    out = cfg.output_dir
    pictures = out / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device).type

    scenes = cfg.scenes
    stages(
        f"generating {scenes.train}+{scenes.val} '{scenes.family}' scenes ({scenes.size}px, {scenes.num_classes} classes)"
    )
    root = write_scene_dataset(
        out / "scenes",
        {"train": cfg.scenes.train, "val": cfg.scenes.val},
        size=(cfg.scenes.size, cfg.scenes.size),
        num_classes=cfg.scenes.num_classes,
        seed=cfg.seed,
        family=cfg.scenes.family,
    )
    train, val = load_dataset("folder", root, "train"), load_dataset("folder", root, "val")
    stages.note(f"wrote {root}")

    stages(f"NeCo post-pretraining on {device} ({cfg.train_config})")
    start = save_starting_weights(cfg, out / "start_artefact")
    stages.note(f"starting weights: {start}")
    trained = post_pretrain(cfg, start, root / "train" / IMAGES_DIR, device)
    stages.note(f"post-pretrained weights: {trained}")

    stages("exporting both backbones to ONNX in one Triton model repository")
    repository = out / "model_repository"
    for name, source in ((START_MODEL_NAME, start), (DEFAULT_MODEL_NAME, trained)):
        stages.note(f"{name} <- {source}")
        export(cfg, source, repository, name, device, stages)

    results, material = {}, {}
    for label, name in (("starting weights", START_MODEL_NAME), ("after NeCo", DEFAULT_MODEL_NAME)):
        stages(f"{label}: serve -> bank -> segment() -> mIoU, ordering agreement")
        results[label], material[label] = evaluate_served(cfg, repository, name, train, val, pictures, stages)
    write_ground_truth(val, cfg.pictures, pictures)
    write_summary_pictures(val, results, material, pictures)

    stages("results")
    names = train.class_names
    before, after = results["starting weights"], results["after NeCo"]
    width = max(len(n) for n in [*names, "mIoU"])
    print(f"      {'':<{width}}  {'start':>7}  {'NeCo':>7}")
    for cls in names:
        b, a = before["per_class_iou"][cls], after["per_class_iou"][cls]  # type: ignore[index]
        print(f"      {cls:<{width}}  {_pct(b):>7}  {_pct(a):>7}")
    print(f"      {'mIoU':<{width}}  {_pct(before['miou']):>7}  {_pct(after['miou']):>7}")
    agreement = [float(r["ordering"]["mean_spearman"]) for r in (before, after)]  # type: ignore[index]
    print(f"      {'ordering':<{width}}  {agreement[0]:>7.3f}  {agreement[1]:>7.3f}   (mean Spearman, two views)")
    for key, title in (("miou", "mIoU"), ("boundary_iou", "boundary IoU")):
        row = [before, after]
        bilinear = [_pct(r["miou"] if key == "miou" else r["boundary_iou"]) for r in row]
        guided = [_pct(r["guided"][key]) for r in row]  # type: ignore[index]
        print(f"      {title}: bilinear {bilinear[0]} / {bilinear[1]}, guided {guided[0]} / {guided[1]} (start / NeCo)")
    gain = 100 * (float(after["miou"]) - float(before["miou"]))  # type: ignore[arg-type]
    print(f"      NeCo changed mIoU by {gain:+.1f} points on held-out '{cfg.scenes.family}' scenes")
    if gain <= 0:
        print("      (from random weights NeCo needs far more steps than the demo's; measured settings, seeds and a")
        print("      30-CPU-minute curve: docs/evaluation.md, 'NeCo effect on generated scenes')")
    summary = {
        "config": cfg.model_dump(mode="json"),
        "device": device,
        "seconds": round(time.perf_counter() - stages.started, 1),
        "results": results,
        "pictures": sorted(p.name for p in pictures.glob("*.png")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    stages.note(f"pictures in {pictures}/, summary in {out / 'summary.json'}")
    return summary


def write_summary_pictures(val, results: dict, material: dict, pictures: Path) -> None:
    """panel.png (image | ground truth | start | after NeCo | after NeCo, guided) and pca.png (image | PCA maps)."""
    from neco.demo.pictures import pca_sheet, segmentation_panel

    count = len(next(iter(material.values()))["masks"])
    if not count:
        return
    images = [val[i][0] for i in range(count)]
    truths = [val[i][1] for i in range(count)]
    titles = {"starting weights": "start", "after NeCo": "after NeCo"}
    predictions = {
        f"{titles[label]}  mIoU {_pct(results[label]['miou'])}": material[label]["masks"] for label in material
    }
    if "after NeCo" in material:
        guided = f"after NeCo, guided  mIoU {_pct(results['after NeCo']['guided']['miou'])}"
        predictions[guided] = material["after NeCo"]["masks_guided"]
    segmentation_panel(images, truths, predictions, val.class_names).save(pictures / "panel.png")
    pca_sheet(images, {f"PCA {titles[label]}": material[label]["pca"] for label in material}).save(pictures / "pca.png")


def _pct(value: object) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"  # type: ignore[arg-type]


def add_backbone_option(parser: argparse.ArgumentParser) -> None:
    """`--backbone ARCH`: the demo's encoder (default: the config's, DINOv2-S/14 with registers)."""
    parser.add_argument(
        "--backbone",
        default=None,
        metavar="ARCH",
        help=f"registered backbone, e.g. vit_small_patch16_dinov3 (default: the config's arch, {DEFAULT_ARCH})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from neco.config import load_config

    parser = argparse.ArgumentParser(prog="python -m neco.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="demo YAML (configs/demo.yaml)")
    add_backbone_option(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *([f"arch={args.backbone}"] if args.backbone else [])]

    def body() -> int:
        run_demo(load_config(DemoConfig, args.config, overrides))
        return 0

    return run_reporting_errors("demo", body)


if __name__ == "__main__":
    raise SystemExit(main())
