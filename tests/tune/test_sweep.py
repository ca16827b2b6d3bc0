"""Sweeps in a real local Ray: Optuna and grid smoke sweeps with leaderboards; an interrupted sweep resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from molre.errors import ConfigError
from molre.tune.space import load_sweep
from molre.tune.sweep import SPEC_FILE, run_sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LEADERBOARD_FILES = {"trials.parquet", "trials.csv", "leaderboard.md", "report.html"}


def _spec_file(tmp_path: Path, data: str, name: str, search: dict, space: dict | None = None) -> Path:
    spec = {
        "name": name,
        "base": {
            "backbone": {"preset": "tiny-vit"},
            "data": {"uri": data, "augment": {"enabled": False}},
            "optim": {"lr_head": 1.0e-2, "lr_adapter": 1.0e-3},
            "train": {"max_epochs": 1, "min_epochs": 0, "batch_size": 4},
        },
        "space": space or {
            "adapter.kind": {"choice": ["none", "molre"]},
            "adapter.molre.experts": {"choice": [2, 4], "when": {"adapter.kind": "molre"}},
        },
        "search": search,
        "resources": {"num_workers": 1, "max_concurrent_trials": 1},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_optuna_smoke_sweep_writes_every_leaderboard_file(ray_local, tiny_dataset, tmp_path):
    search = {"algorithm": "optuna", "num_samples": 2}  # the grid path is covered by the resume test below
    spec = load_sweep(_spec_file(tmp_path, tiny_dataset, "smoke-optuna", search))
    table, paths = run_sweep(spec, str(tmp_path / "results"))
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    assert table["val/best_mean_auc"].notna().all()
    assert table["params/trainable"].gt(0).all()
    written = {Path(p).name for p in paths.values()}
    assert written >= LEADERBOARD_FILES
    for p in paths.values():
        assert Path(p).stat().st_size > 0
    molre_rows = table[table["config/adapter.kind"] == "molre"]
    if len(molre_rows):  # routing analysis of MoLRE trials
        assert molre_rows["router/entropy"].notna().all()


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, tiny_dataset, tmp_path):
    spec_path = _spec_file(tmp_path, tiny_dataset, "resume", {"algorithm": "grid"},
                           space={"adapter.molre.experts": {"choice": [2, 3, 4]}})  # fmt: skip
    results = tmp_path / "results"
    trials_file = results / "resume" / "trials.parquet"
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "sweep.py"),
        "--config",
        str(spec_path),
        "--storage",
        str(results),
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": ""})  # fmt: skip
    try:
        deadline = time.time() + 420
        while time.time() < deadline and not _finished(trials_file):
            time.sleep(0.5)
        assert _finished(trials_file), "the first trial never finished"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep, as on a lost head node
        proc.wait()
    first = pd.read_parquet(trials_file)
    done = set(first.loc[first["status"] == "TERMINATED", "trial_id"])
    done_dirs = {
        t: sorted(p.name for p in (results / "resume" / "runs" / t).glob("checkpoint_*")) for t in done
    }
    table, paths = run_sweep(load_sweep(spec_path), str(results), resume=True)
    assert len(table) == 3 and (table["status"] == "TERMINATED").all()
    assert sorted(table["config/adapter.molre.experts"]) == [2, 3, 4]  # the grid, each point once
    assert {Path(p).name for p in paths.values()} >= LEADERBOARD_FILES
    for trial_id, checkpoints in done_dirs.items():  # finished trials were not trained again
        assert (
            sorted(p.name for p in (results / "resume" / "runs" / trial_id).glob("checkpoint_*"))
            == checkpoints
        )

    # the experiment recorded its spec and data: a changed spec file under the same name is refused, naming
    # what changed, before anything runs (its finished trials trained with the recorded spec)
    record = json.loads((results / "resume" / SPEC_FILE).read_text())
    assert record["spec"] == load_sweep(spec_path).model_dump(mode="json")
    changed = _spec_file(tmp_path, tiny_dataset, "resume", {"algorithm": "grid"},
                         space={"adapter.molre.experts": {"choice": [2, 3, 4, 5]}})  # fmt: skip
    spec = load_sweep(changed, ["optim.lr_head=0.5"])
    written = trials_file.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"base\.optim\.lr_head: 0\.01 -> 0\.5.*space\.adapter\.molre"):
        run_sweep(spec, str(results), resume=True)
    assert trials_file.stat().st_mtime_ns == written  # the leaderboard was not rewritten either


def _finished(path: Path) -> bool:
    try:
        return (pd.read_parquet(path)["status"] == "TERMINATED").any()
    except (OSError, ValueError):  # not written yet
        return False
