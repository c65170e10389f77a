"""Every impossible training configuration is a ConfigError naming the key, before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from neco.config import ConfigError
from neco.training.config import TrainConfig, load_train_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


DINOV2, DINOV3 = "vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("train_smoke.yaml", DINOV2),
        ("train_vits14_reg_coco224.yaml", DINOV2),
        ("train_vits14_reg_coco518.yaml", DINOV2),
        ("train_smoke_dinov3.yaml", DINOV3),
        ("train_vits16_dinov3_coco224.yaml", DINOV3),
    ],
)
def test_shipped_configs_validate(name: str, arch: str, tmp_path: Path) -> None:
    overrides = [f"data.root={tmp_path}"] if "smoke" not in name else []
    cfg = load_train_config(CONFIGS / name, overrides)
    assert isinstance(cfg, TrainConfig) and cfg.model.arch == arch


def test_dinov3_recipe_is_the_dinov2_recipe_in_patches(tmp_path: Path) -> None:
    """Only the backbone, its weights, the output folder and the local crop's pixels differ: the
    crops keep the recipe's patch grids where the patch allows (local 7x7; global 224 px = 14x14)."""
    dinov2 = _leaves(yaml.safe_load((CONFIGS / "train_vits14_reg_coco224.yaml").read_text()))
    dinov3 = _leaves(yaml.safe_load((CONFIGS / "train_vits16_dinov3_coco224.yaml").read_text()))
    assert dinov2.keys() == dinov3.keys()
    assert {key for key in dinov2 if dinov2[key] != dinov3[key]} == {
        "output_dir",
        "model.arch",
        "model.weights",
        "crops.local_size",
    }
    cfg = load_train_config(CONFIGS / "train_vits16_dinov3_coco224.yaml", [f"data.root={tmp_path}"])
    patch = cfg.model.patch_size
    assert (patch, cfg.crops.global_size // patch, cfg.crops.local_size // patch, cfg.method.grid_size) == (
        16,
        14,
        7,
        7,
    )
    assert cfg.crops.local_size // patch == dinov2["crops.local_size"] // 14  # the same 7x7 local grid


def test_recipe_values(tmp_path: Path) -> None:
    cfg = load_train_config(CONFIGS / "train_vits14_reg_coco224.yaml", [f"data.root={tmp_path}"])
    assert (cfg.crops.global_size, cfg.crops.local_size, cfg.crops.num_local) == (224, 98, 4)
    assert (cfg.method.queue_length, cfg.method.student_steepness, cfg.method.teacher_momentum) == (8192, 100.0, 0.9995)
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.backbone_lr, cfg.optim.head_lr) == (64, 25, 1e-5, 1e-4)
    assert cfg.total_steps(118_287) == 25 * 118_287 // 64
    assert (cfg.crops.global_scale, cfg.crops.local_scale, cfg.crops.min_intersection) == (
        (0.25, 1.0),
        (0.05, 0.25),
        0.01,
    )
    assert (cfg.crops.flip_p, cfg.method.reference_draw, cfg.method.queue_push_per_image) == (0.0, "pair", 10)
    assert (cfg.model.head_layers, cfg.model.head_hidden_dim, cfg.model.head_out_dim) == (3, 2048, 256)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.5, None)
    assert (
        load_train_config(CONFIGS / "train_vits14_reg_coco518.yaml", [f"data.root={tmp_path}"]).crops.global_size == 518
    )


DELIBERATE_DEFAULTS: dict[str, str] = {
    "output_dir": "one output folder per recipe",
    "model.weights": "TrainConfig() starts from random init and needs no weights; the recipe starts from DINOv2R",
    "data.kind": "TrainConfig() trains on generated scenes, so it runs without a dataset; the recipe on COCO",
    "data.root": "where the dataset lies on this machine",
    "data.num_workers": "loader processes suited to the recipe's GPU machine",
    "optim.epochs": "TrainConfig() runs one step (optim.steps=1, a smoke run); the recipe runs 25 epochs",
    "runtime.device": "auto picks cuda where there is one, as the recipe asks",
    "runtime.compile": "torch.compile needs a compiler and minutes of warm-up; same numbers, faster on a GPU",
    "runtime.log_every": "log frequency, no effect on training",
}
"""Keys a recipe YAML sets to other values than TrainConfig()'s defaults, each with why (docs/training.md)."""


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


@pytest.mark.parametrize(
    ("name", "variant"),
    [("train_vits14_reg_coco224.yaml", set()), ("train_vits14_reg_coco518.yaml", {"crops.global_size"})],
)
def test_defaults_are_the_published_recipe(name: str, variant: set[str]) -> None:
    recipe = _leaves(yaml.safe_load((CONFIGS / name).read_text()))
    defaults = _leaves(TrainConfig().model_dump(mode="json"))
    differing = {key for key, value in recipe.items() if defaults[key] != value}
    assert differing == set(DELIBERATE_DEFAULTS) | variant
    assert TrainConfig().optim.clip_grad is None  # the reference does not clip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.batchsize=4"], "optim.batchsize"),  # unknown key (typo)
        (["bogus=1"], "bogus"),
        (["optim.batch_size=four"], "optim.batch_size"),  # wrong type
        (["crops.global_size=[1, 2]"], "crops.global_size"),
        (["optim.batch_size=0"], "optim.batch_size"),
        (["crops.local_size=7"], "smaller than one 14-px patch"),
        (["crops.global_size=100"], "not a multiple of the patch size"),
        (["crops.local_scale=[0.5, 0.2]"], "crops.local_scale"),
        (["data.kind=folder", "data.root=/definitely/not/here"], "does not exist"),
        (["data.kind=folder", "data.root=null"], "data.root is required"),
        (["optim.epochs=2"], "exactly one of optim.steps and optim.epochs"),
        (["model.arch=vit_tiny_patch16_224"], "unknown architecture"),
        (["model.train_last_blocks=13"], "exceeds the depth"),
        (["model.weights=/no/such/file.pth"], "neither an existing file"),
        (["method.sort_network=quick"], "sort_network"),
        (["method.distribution=uniform"], "distribution"),
        (["method.mask_mode=object"], "method.mask_mode"),
        (["crops.global_size=28", "crops.local_size=42"], "global_size 28 < crops.local_size 42"),
        (["method.mask_mode=bg", "crops.global_size=42"], "needs crops.global_size >= 56 px"),
        (["method.mask_connectivity=6"], "method.mask_connectivity"),
        (["method.reference_draw=batch"], "method.reference_draw"),
        (["crops.ratio=[2.0, 1.0]"], "crops.ratio"),
    ],
)
def test_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_train_config(CONFIGS / "train_smoke.yaml", overrides)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(CONFIGS / "nope.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("train_*.yaml")))
def test_configs_keeping_one_checkpoint_say_what_that_means_for_recovery(name: str) -> None:
    """keep_checkpoints: 1 leaves no fallback (tests/training/test_faults.py shows the exit); the YAML says so."""
    lines = (CONFIGS / name).read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("keep_checkpoints: 1"):
            assert "no usable checkpoint" in " ".join(lines[index : index + 3]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["crops.local_size=98"],
            "not a multiple of the patch size 16 of vit_small_patch16_dinov3 (6.12 patches); use 96",
        ),
        (["crops.local_size=14"], "smaller than one 16-px patch"),
        (["model.keep_registers=false"], "DINOv2 register models only"),
        (["model.arch=vit_7b_patch16_dinov3"], "listed but not supported"),
        (["model.arch=vit_large_patch16_dinov3.sat493m"], "without a tag"),
        (["method.mask_mode=fg", "crops.global_size=48"], "needs crops.global_size >= 64 px"),
    ],
)
def test_dinov3_config_errors(overrides: list[str], message: str) -> None:
    """Crop sizes are checked against DINOv3's 16-px patch, not DINOv2's 14."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(CONFIGS / "train_smoke_dinov3.yaml", overrides)


def test_crops_are_standardised_with_the_start_weights_statistics(tmp_path: Path) -> None:
    """DINOv3's satellite weights (`.sat493m`) were trained with other statistics than ImageNet's."""
    from neco.contract import IMAGENET_MEAN, SAT493M_MEAN, SAT493M_STD
    from neco.training.run import model_contract

    base = ["model.arch=vit_large_patch16_dinov3", "model.head_hidden_dim=64"]
    satellite = load_train_config(
        CONFIGS / "train_smoke_dinov3.yaml", [*base, "model.weights=vit_large_patch16_dinov3.sat493m"]
    )
    contract = model_contract(satellite)
    assert (contract.arch, contract.mean, contract.std) == ("vit_large_patch16_dinov3", SAT493M_MEAN, SAT493M_STD)
    assert model_contract(load_train_config(CONFIGS / "train_smoke_dinov3.yaml", base)).mean == IMAGENET_MEAN
