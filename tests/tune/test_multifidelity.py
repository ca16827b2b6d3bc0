"""Multi-fidelity sweeps in a real local Ray: screen on cached features, confirm the best point end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from molre.errors import ConfigError
from molre.tune.multifidelity import SUMMARY_FILE, cache_configs, screen_resources, top_points
from molre.tune.space import SweepSpec, load_sweep
from molre.tune.sweep import run_sweep


def _spec(tmp_path: Path, data: str, finetune: str = "frozen", **extra) -> Path:
    spec = {
        "name": "mf",
        "base": {
            "backbone": {"preset": "tiny-vit", "finetune": finetune},
            "data": {"uri": data, "augment": {"enabled": False}},
            "optim": {"lr_head": 1.0e-2, "lr_adapter": 1.0e-3},
            "train": {"max_epochs": 2, "min_epochs": 0, "batch_size": 4},
        },
        "space": {
            "adapter.kind": {"choice": ["none", "molre"]},
            "adapter.molre.experts": {"choice": [2, 4], "when": {"adapter.kind": "molre"}},
        },
        "search": {"algorithm": "grid"},
        "resources": {"num_workers": 1, "max_concurrent_trials": 1},
        "multi_fidelity": {"confirm_top": 1},
        **extra,
    }  # fmt: skip
    path = tmp_path / "mf.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_point_that_cannot_be_cached_is_refused_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="multi_fidelity.*finetune=frozen"):
        load_sweep(_spec(tmp_path, "/nowhere", finetune="lora"))


def test_multi_objective_multi_fidelity_is_refused(tmp_path):
    objectives = {
        "algorithm": "grid",
        "objectives": [["val/best_mean_auc", "max"], ["params/trainable", "min"]],
    }
    with pytest.raises(ConfigError, match="one objective"):
        load_sweep(_spec(tmp_path, "/nowhere", search=objectives))


def test_screen_trials_take_a_gpu_as_the_base_config_says(tmp_path):
    path = _spec(
        tmp_path, "/nowhere", resources={"num_workers": 2, "gpus_per_worker": 0.5, "cpus_per_worker": 2}
    )
    assert screen_resources(load_sweep(path, ["scaling.use_gpu=true"])) == {"CPU": 2.0, "GPU": 0.5}
    assert screen_resources(load_sweep(path, ["scaling.use_gpu=false"])) == {"CPU": 2.0}


def test_a_random_backbone_gets_a_cache_per_seed_loaded_weights_one_for_all(tmp_path):
    from tests.tiny_data import write_tiny_dataset

    data = write_tiny_dataset(str(tmp_path / "data"), counts={"train": 1, "val": 1})
    raw = yaml.safe_load(_spec(tmp_path, data).read_text())
    raw["search"]["seeds"] = [0, 1, 2]
    assert len(cache_configs(SweepSpec.model_validate(raw), data)) == 3  # the screen builds each up front
    raw["base"]["backbone"]["weights"] = "/weights/{preset}.safetensors"
    assert len(cache_configs(SweepSpec.model_validate(raw), data)) == 1


def test_top_points_rank_by_the_mean_over_seeds():
    table = pd.DataFrame({
        "status": ["TERMINATED"] * 5 + ["ERROR"],
        "point": ['{"a": 1}', '{"a": 1}', '{"a": 2}', '{"a": 2}', '{"a": 3}', '{"a": 4}'],
        "val/best_mean_auc": [0.9, 0.5, 0.72, 0.72, 0.6, None],
    })  # fmt: skip
    assert top_points(table, "val/best_mean_auc", "max", 2) == [{"a": 2}, {"a": 1}]  # 0.72 > 0.70 > 0.60
    assert top_points(table, "val/best_mean_auc", "min", 1) == [{"a": 3}]


@pytest.mark.slow
def test_screen_on_cached_features_then_confirm_the_best_end_to_end(ray_local, tiny_dataset, tmp_path):
    spec = load_sweep(_spec(tmp_path, tiny_dataset))
    results = tmp_path / "results"
    table, paths = run_sweep(spec, str(results))

    screen = pd.read_parquet(results / "mf-screen" / "trials.parquet")
    assert len(screen) == 3 and (screen["status"] == "TERMINATED").all()  # none, molre K=2, molre K=4
    assert screen["pid"].nunique() == 1  # one trial at a time: each reuses the previous trial's actor
    assert screen["val/best_mean_auc"].notna().all()
    summary = json.loads(Path(paths["multi_fidelity"]).read_text())
    assert Path(paths["multi_fidelity"]).name == SUMMARY_FILE
    assert summary["screen"]["cache"]["built"] == 1  # one backbone config: its features computed once
    assert summary["screen"]["trials"] == 3 and summary["confirm"]["trials"] == 1

    best = screen.loc[screen["val/best_mean_auc"].idxmax()]  # the screen's winner is the confirmed point
    expected = {"adapter.kind": best["config/adapter.kind"]}
    if best["config/adapter.kind"] == "molre":
        expected["adapter.molre.experts"] = int(best["config/adapter.molre.experts"])
    assert summary["confirm"]["points"] == [expected]
    assert len(table) == 1 and table["status"].eq("TERMINATED").all()  # end to end: a TorchTrainer checkpoint
    assert table["checkpoint"].notna().all() and table["val/best_mean_auc"].notna().all()
    for total in ("device_seconds", "wall_seconds"):
        assert summary[total] == pytest.approx(summary["screen"][total] + summary["confirm"][total])
    assert summary["screen"]["wall_seconds"] >= summary["screen"]["cache"]["seconds"]
    assert summary["resumed"] is False  # the wall seconds cover the whole sweep
    keys = [p.name for p in (results / "features").iterdir()]  # under the storage root, for the next sweep
    assert (
        len(keys) == 1 and (results / "features" / keys[0] / "meta.json").is_file()
    )  # <storage>/features/<key>
