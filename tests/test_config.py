import re

import numpy as np
import pytest

from molre.config import build_config, load_config
from molre.errors import ConfigError


def test_defaults_are_the_papers_settings():
    cfg = load_config()
    assert (cfg.adapter.lora.rank, cfg.adapter.lora.alpha) == (8, 16.0)
    m = cfg.adapter.molre
    assert (m.experts, m.rank, m.router_hidden, m.placement) == (6, 8, 256, "features")
    assert cfg.loss.gamma == 2.0 and (cfg.optim.lr_head, cfg.optim.lr_adapter) == (1e-3, 1e-4)
    assert (cfg.train.min_epochs, cfg.train.patience) == (20, 5)
    assert cfg.data.windows == [(0.0, 80.0), (-20.0, 180.0), (-800.0, 2000.0)]


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("backbone: {preset: tiny-vit}\nadapter:\n  molre: {experts: 3}\n")
    cfg = load_config(path, ["adapter.molre.experts=4", "loss.alpha=0.25", "adapter.lora.blocks=[0, 1]"])
    assert cfg.backbone.preset == "tiny-vit" and cfg.adapter.molre.experts == 4
    assert cfg.loss.alpha == 0.25 and cfg.adapter.lora.blocks == [0, 1]


def test_numbers_from_yaml_strings_numpy_and_whole_floats_still_read():
    # YAML 1.1 reads 1e-3 (no dot) as a string; Tune / Optuna hand numpy scalars to a trial's config
    cfg = load_config(None, ["optim.lr_head=1e-3", "train.max_epochs=3.0", "scaling.use_gpu=false"])
    assert (cfg.optim.lr_head, cfg.train.max_epochs, cfg.scaling.use_gpu) == (1e-3, 3, False)
    cfg = build_config({"adapter": {"molre": {"experts": np.int64(3)}}, "train": {"tf32": np.bool_(False)}})
    assert cfg.adapter.molre.experts == 3 and cfg.train.tf32 is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter.molre.expert=4"], "adapter.molre.expert: unknown key"),
        (["train.batch_size=two"], "train.batch_size: Input should be a valid integer"),
        (["optim.lr_head=-1"], "optim.lr_head: Input should be greater than 0"),
        (["adapter.kind=moe"], "adapter.kind: Input should be 'none' or 'molre'"),
        (["adapter.molre.top_k=9"], "top_k=9 exceeds experts=6"),
        (["train=3"], "train: Input should be a valid dictionary"),
        (["trainbatch_size"], "not of the form dotted.key=value"),
        # no crossings between numbers and flags (pydantic's lax mode reads true as 1 and 0 as false)
        (["train.max_epochs=true"], "train.max_epochs: expected a number, not true/false"),
        (["train.tf32=0"], "train.tf32: expected true or false (got 0)"),
        (["scaling.use_gpu=2"], "scaling.use_gpu: expected true or false (got 2)"),
        (["loss.gamma=false"], "loss.gamma: expected a number, not true/false"),
        (["data.augment.scale=[0.9, true]"], "data.augment.scale.1: expected a number"),
        (
            ["adapter.lora.blocks=[0, true]"],
            "adapter.lora.blocks.1: expected a number",
        ),  # no union tags in keys
    ],
)
def test_bad_keys_and_types_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")  # PyYAML recurses per level
    with pytest.raises(ConfigError, match="deep.yaml is not valid YAML: nested too deeply"):
        load_config(tmp_path / "deep.yaml")
    with pytest.raises(ConfigError, match="backbone.presets: unknown key"):
        build_config({"backbone": {"presets": "x"}}, source="x.yaml")
