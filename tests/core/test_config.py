"""The shared YAML + override loader rejects bad input before any work starts."""

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from neco.config import (
    ConfigError,
    field_defaults,
    load_config,
    resolve_config_path,
    shipped_config_dir,
    shipped_config_names,
)


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-4


class Demo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(default=4, ge=1)
    name: str = "x"
    optim: Inner = Inner()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\noptim:\n  lr: 0.5\n")
    cfg = load_config(Demo, path, ["optim.lr=1e-3", "name=run1"])
    assert cfg.batch_size == 8 and cfg.optim.lr == pytest.approx(1e-3) and cfg.name == "run1"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batch_size=0"], "batch_size"),
        (["batch_size=abc"], "batch_size"),
        (["optim.momentum=0.9"], "optim.momentum"),
        (["nokey"], "key=value"),
        (["name=a", "name.sub=1"], "not a section"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Demo, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Demo, bad)


REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_named_configs_resolve_from_the_shipped_ones_in_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert shipped_config_dir() is not None
    shipped = shipped_config_dir() / "demo.yaml"
    assert shipped.read_bytes() == (REPO_CONFIGS / "demo.yaml").read_bytes()
    for name in ("configs/demo.yaml", "demo.yaml", "demo"):
        assert resolve_config_path(name) == shipped, name
    assert set(shipped_config_names()) == {p.stem for p in REPO_CONFIGS.glob("*.yaml")}


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    local = tmp_path / "configs" / "demo.yaml"
    local.write_text("batch_size: 3\n")
    assert resolve_config_path("configs/demo.yaml") == Path("configs/demo.yaml")
    assert load_config(Demo, "configs/demo.yaml").batch_size == 3


def test_unknown_names_and_nested_paths_are_not_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("nope", "configs/nope.yaml", "other/demo.yaml", "configs/sub/demo.yaml", "demo.json"):
        with pytest.raises(ConfigError, match="does not exist") as info:
            resolve_config_path(bad)
        assert "demo" in str(info.value) and "train_smoke" in str(info.value)  # names what is shipped


def test_field_defaults_flattens_nested_models():
    assert field_defaults(Demo) == {"batch_size": 4, "name": "x", "optim.lr": 1e-4}
