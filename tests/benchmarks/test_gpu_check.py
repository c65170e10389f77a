"""benchmarks/gpu_check.py, the parts a CPU can check: arguments, the extrapolation, a tiny dry run."""

from __future__ import annotations

import json
from pathlib import Path

import gpu_check
import pytest
import torch

from .test_results_schema import check_schema


def test_defaults_are_the_issue_s_sizes():
    args = gpu_check.parse_args([])
    assert args.device == "cuda" and args.compile == ["eager", "compiled"]
    assert args.sorter_rows == [31_360, 62_720] and args.config == gpu_check.RECIPE
    assert not args.tiny and not args.no_onnx


def test_tiny_shrinks_everything_and_bad_arguments_are_refused(capsys):
    tiny = gpu_check.parse_args(["--device", "cpu", "--tiny"])
    assert tiny.sorter_rows == [64] and tiny.inference_size == 56 and tiny.no_onnx
    for bad in (["--steps", "0"], ["--warmup", "-1"], ["--threads", "0"], ["--sorter-rows", "1"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    assert "error" in capsys.readouterr().err


def test_arch_entries_pick_a_recipe_per_family(tmp_path: Path):
    assert gpu_check.parse_args([]).archs == [(None, gpu_check.RECIPE)]
    custom = tmp_path / "mine.yaml"
    args = gpu_check.parse_args(["--arch", "vit_small_patch14_reg4_dinov2", f"vit_small_patch16_dinov3={custom}"])
    assert args.archs == [("vit_small_patch14_reg4_dinov2", gpu_check.RECIPE), ("vit_small_patch16_dinov3", custom)]
    dinov3 = gpu_check.FAMILY_RECIPES["dinov3"]
    expected = dinov3 if dinov3.is_file() else gpu_check.RECIPE
    assert gpu_check.parse_args(["--arch", "vit_base_patch16_dinov3"]).archs == [("vit_base_patch16_dinov3", expected)]
    for bad in (["--arch", "vit_tiny"], ["--arch", "vit_7b_patch16_dinov3"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_extrapolation_is_epochs_times_images_over_the_slower_rate():
    out = gpu_check.extrapolate(step_images_per_s=200.0, loader_images_per_s=50.0)
    assert out["images_per_s"] == 50.0
    assert out["recipe_gpu_hours"] == pytest.approx(25 * 118_287 / 50.0 / 3600)
    assert out["paper_gpu_hours"] == 19.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="cuda"):
        gpu_check.main(["--out", "unused.json"])


def test_tiny_cpu_dry_run_writes_the_common_schema(tmp_path: Path):
    out = tmp_path / "gpu_check_cpu.json"
    argv = ["--device", "cpu", "--tiny", "--compile", "eager", "--steps", "1", "--warmup", "0"]
    argv += ["--loader-batches", "1", "--sorter-repeats", "1", "--threads", "1", "--out", str(out)]
    argv += ["--arch", "vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"]
    assert gpu_check.main(argv) == 0
    document = json.loads(out.read_text())
    check_schema(document)
    settings, results = document["settings"], document["results"]
    assert document["benchmark"] == "gpu_check" and settings["device_name"] == "cpu" and settings["tiny"]
    step = results["train_step"]["eager"]
    assert step["images_per_s"] > 0 and step["model_flops_per_step"] > 0
    assert {"data", "forward", "sorter", "backward"} <= set(step["phase_s_per_step"])
    assert step["mfu"] is None and step["peak_memory_mib"] is None  # no peak FLOP/s or CUDA memory on CPU
    assert results["loader"]["images_per_s"] > 0
    assert [row["rows"] for row in results["sorter"]] == [64] and results["sorter"][0]["ours"]["median_s"] > 0
    assert set(results["inference"]["images_per_s"]) == {"eager_fp32", "eager_bf16"}
    assert results["extrapolation"]["paper_gpu_hours"] == 19.0
    assert settings["archs"] == ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"]
    dinov2, dinov3 = results["by_arch"]["vit_small_patch14_reg4_dinov2"], results["by_arch"]["vit_small_patch16_dinov3"]
    assert dinov2["train_step"]["eager"] == step and dinov2["inference"]["size"] == 56
    assert dinov3["inference"]["size"] == 48 and set(dinov3["inference"]["images_per_s"]) == {
        "eager_fp32",
        "eager_bf16",
    }
    assert "eager" in dinov3["train_step"] or "error" in dinov3["train_step"]  # the tiny crops suit patch 14 only
    assert isinstance(document["goal"]["met"], bool)
