"""The shared YAML + override loader rejects bad input before any work starts."""

import pytest
from pydantic import BaseModel, ConfigDict, Field

from neco.config import ConfigError, load_config


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
