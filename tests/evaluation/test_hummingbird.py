"""Hummingbird runner on generated scenes and on tiny VOC / ADE20k / folder trees via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neco.cli import main
from neco.evaluation.backends import BackendError, TorchBackend
from neco.evaluation.datasets import load_dataset
from neco.evaluation.hummingbird import AugmentedPairs, HummingbirdConfig, build_bank, evaluate_bank, run_hummingbird
from neco.evaluation.metrics import mean_iou


@pytest.fixture(scope="module")
def backend(random_artefact: Path) -> TorchBackend:
    return TorchBackend(random_artefact, device="cpu")


def test_self_retrieval_and_val(backend: TorchBackend, scene_dataset: Path) -> None:
    train = load_dataset("folder", scene_dataset, "train")
    val = load_dataset("folder", scene_dataset, "val")
    # Segmenting support images against their own bank recovers their masks up to the patch
    # resolution (8 px patches here), even with random weights: each patch finds itself.
    few = train.subset(3)
    own = build_bank(backend, few, few.class_names, (224, 224), progress=False)
    assert len(own) == len(few) * 16 * 16
    assert evaluate_bank(backend, own, few, k=1, progress=False).miou >= 0.9
    bank = build_bank(backend, train, train.class_names, (112, 112), progress=False)
    result = evaluate_bank(backend, bank, val, progress=False)
    # Above the best constant predictor (always "background"), even with random weights.
    constant = mean_iou([np.zeros_like(m) for _, m in val], [m for _, m in val], val.class_names)
    assert constant.miou < result.miou <= 1.0


def test_augmented_passes_and_memory_bound(backend: TorchBackend, scene_dataset: Path) -> None:
    train = load_dataset("folder", scene_dataset, "train")
    aug = AugmentedPairs(train, seed=1)
    image, mask = aug[0]
    assert image.shape[:2] == mask.shape and max(image.shape[:2]) <= 112
    np.testing.assert_array_equal(aug[3][1], AugmentedPairs(train, seed=1)[3][1])  # seeded
    assert set(np.unique(mask)) <= set(np.unique(train[0][1]))
    bank = build_bank(backend, train, train.class_names, (56, 56), memory_size=120, augment_passes=2, progress=False)
    assert len(bank) == 2 * len(train) * (60 // len(train))
    assert bank.num_images == 2 * len(train)


def test_run_writes_report(backend: TorchBackend, scene_dataset: Path, tmp_path: Path, capsys) -> None:
    cfg = HummingbirdConfig(data_root=scene_dataset, input_size=56, val_subset=2, out=tmp_path / "hb.json")
    report = run_hummingbird(cfg, backend)
    assert "input 56x56 px" in capsys.readouterr().out  # the size is part of every printed result
    on_disk = json.loads((tmp_path / "hb.json").read_text())
    assert (on_disk["input_size"], on_disk["resize"]) == (56, "square")
    assert all(result["input_size"] == 56 for result in on_disk["results"].values())
    assert on_disk["miou"] == pytest.approx(report["miou"]) and 0.0 <= on_disk["miou"] <= 1.0
    assert on_disk["num_val"] == 3 and on_disk["config"]["k"] == 30 and on_disk["config"]["temperature"] == 0.02
    assert set(on_disk["per_class_iou"]) == set(json.loads((scene_dataset / "classes.json").read_text()))


def _write(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _voc_tree(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    base = root / "VOC2012"
    names = [f"2008_{i:06d}" for i in range(len(pairs))]
    for name, (image, mask) in zip(names, pairs):
        _write(base / "JPEGImages" / f"{name}.jpg", image)
        voc_mask = np.where(mask == 0, 0, mask + 10).astype(np.uint8)  # scene classes -> VOC ids 11..13
        voc_mask[:2] = 255
        _write(base / "SegmentationClass" / f"{name}.png", voc_mask)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:4]))
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[4:]))


def _ade_tree(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    base = root / "ADEChallengeData2016"
    for i, (image, mask) in enumerate(pairs):
        sub = "training" if i < 4 else "validation"
        _write(base / "images" / sub / f"ADE_{sub}_{i:08d}.jpg", image)
        _write(base / "annotations" / sub / f"ADE_{sub}_{i:08d}.png", (mask + 1).astype(np.uint8))


def _coco_tree(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    fine = np.array([71, 77, 51, 61], dtype=np.uint8)  # stuffthingmaps ids of coarse classes 0..3
    for i, (image, mask) in enumerate(pairs):
        sub = "train2017" if i < 4 else "val2017"
        _write(root / "images" / sub / f"{i:012d}.jpg", image)
        _write(root / "annotations" / sub / f"{i:012d}.png", fine[mask])


def _cityscapes_tree(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    ids = np.array([7, 8, 11, 12], dtype=np.uint8)  # labelIds of train ids 0..3
    for i, (image, mask) in enumerate(pairs):
        split = "train" if i < 4 else "val"
        _write(root / "leftImg8bit" / split / "ulm" / f"ulm_{i:06d}_000019_leftImg8bit.png", image)
        _write(root / "gtFine" / split / "ulm" / f"ulm_{i:06d}_000019_gtFine_labelIds.png", ids[mask])


TREES = {"voc": _voc_tree, "ade20k": _ade_tree, "coco-stuff": _coco_tree, "cityscapes": _cityscapes_tree}
CLASS_COUNTS = {"voc": 21, "ade20k": 150, "coco-stuff": 27, "cityscapes": 19, "folder": 4}


@pytest.mark.parametrize("layout", [*TREES, "folder"])
def test_cli_on_every_layout(
    layout: str, random_artefact: Path, scene_pairs: list, scene_dataset: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / layout
    if layout in TREES:
        TREES[layout](root, scene_pairs)
    else:
        root = scene_dataset
    out = tmp_path / "report.json"
    code = main(
        [
            "eval",
            "hummingbird",
            "--dataset",
            layout,
            "--data-root",
            str(root),
            "--backend",
            "torch",
            "--model",
            str(random_artefact),
            "--device",
            "cpu",
            "--input-size",
            "56",
            "--out",
            str(out),
            "k=10",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert 0.0 <= report["miou"] <= 1.0 and report["config"]["k"] == 10
    assert len(report["per_class_iou"]) == CLASS_COUNTS[layout]
    # The published protocol is the default for the paper layouts, the strict one for folders.
    assert report["protocol"] == ("strict" if layout == "folder" else "hbird-eval")
    assert list(report["results"]) == [report["protocol"]]
    assert report["results"][report["protocol"]]["miou"] == report["miou"]


def test_both_protocols_and_beta_alias(backend: TorchBackend, scene_dataset: Path) -> None:
    with pytest.warns(DeprecationWarning, match="beta"):
        cfg = HummingbirdConfig(data_root=scene_dataset, input_size=56, protocol="both", beta=0.05, val_subset=2)
    assert cfg.temperature == 0.05
    report = run_hummingbird(cfg, backend)
    assert report["protocol"] == "hbird-eval" and set(report["results"]) == {"hbird-eval", "strict"}
    assert report["results"]["hbird-eval"]["matching"] == "hungarian"
    assert report["results"]["strict"]["matching"] == "none"
    assert "description" in report["results"]["strict"]
    with pytest.raises(ValueError, match="not both"):
        HummingbirdConfig(data_root=scene_dataset, beta=0.05, temperature=0.02)


def test_std_typo_switch(random_artefact: Path, scene_dataset: Path) -> None:
    cfg = HummingbirdConfig(data_root=scene_dataset, hbird_eval_std_typo=True, backend={"model": random_artefact})
    assert cfg.build_backend().contract.std == (0.229, 0.224, 0.255)
    onnx = HummingbirdConfig(data_root=scene_dataset, hbird_eval_std_typo=True, backend={"kind": "onnx"})
    with pytest.raises(BackendError, match="torch"):
        onnx.build_backend()


def test_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["eval", "hummingbird", "--dataset", "folder", "--data-root", str(tmp_path)]) == 2
    assert "missing directory" in capsys.readouterr().err
    assert main(["eval", "hummingbird", "--dataset", "folder"]) == 2
    assert "data_root" in capsys.readouterr().err
    assert main(["eval", "hummingbird", "--data-root", str(tmp_path), "--k", "0"]) == 2
    assert "k:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "hummingbird", "--data-root", str(tmp_path), "--protocol", "grpc"])
    assert "--transport" in capsys.readouterr().err
