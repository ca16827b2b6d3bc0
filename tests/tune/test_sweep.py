"""Sweeps in a real local Ray: an Optuna smoke sweep with its leaderboard; an interrupted grid sweep resumed on
another cluster shape. Without Ray: what a resume may change, the leaderboard's rewrite interval, the imports."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from molre.errors import ConfigError
from molre.tune import sweep
from molre.tune.space import SweepSpec, load_sweep
from molre.tune.sweep import SPEC_FILE, run_sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LEADERBOARD_FILES = {"trials.parquet", "trials.csv", "leaderboard.md", "report.html"}


def _spec_file(tmp_path: Path, data: str, name: str, search: dict, space: dict | None = None,
               resources: dict | None = None, file_name: str | None = None) -> Path:  # fmt: skip
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
        "resources": {"num_workers": 1, "max_concurrent_trials": 1, **(resources or {})},
    }  # fmt: skip
    path = tmp_path / f"{file_name or name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_optuna_smoke_sweep_writes_every_leaderboard_file(ray_local, tiny_dataset, tmp_path):
    # one trial (each costs ~35 CPU-s of process starts): Optuna's define-by-run space with its condition
    # (experts only when adapter.kind is molre), suggested through Tune; the only kind is molre, so the routing
    # analysis is always checked (with two kinds it was checked only when TPE happened to pick molre)
    search = {"algorithm": "optuna", "num_samples": 1}  # the grid path is covered by the resume test below
    space = {"adapter.kind": {"choice": ["molre"]},
             "adapter.molre.experts": {"choice": [2, 4], "when": {"adapter.kind": "molre"}}}  # fmt: skip
    spec = load_sweep(_spec_file(tmp_path, tiny_dataset, "smoke-optuna", search, space=space))
    table, paths = run_sweep(spec, str(tmp_path / "results"))
    assert len(table) == spec.search.num_samples and (table["status"] == "TERMINATED").all()
    assert table["val/best_mean_auc"].notna().all()
    assert table["params/trainable"].gt(0).all()
    written = {Path(p).name for p in paths.values()}
    assert written >= LEADERBOARD_FILES
    for p in paths.values():
        assert Path(p).stat().st_size > 0
    assert (table["config/adapter.kind"] == "molre").all()
    assert table["config/adapter.molre.experts"].isin([2, 4]).all()  # the conditional key was suggested
    assert table["router/entropy"].notna().all()  # routing analysis of MoLRE trials


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, tiny_dataset, tmp_path):
    # two grid points: one finishes before the driver dies, the other runs on resume
    space = {"adapter.molre.experts": {"choice": [2, 3]}}
    spec_path = _spec_file(tmp_path, tiny_dataset, "resume", {"algorithm": "grid"}, space=space)
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
    # the driver joins this session's Ray (a cluster of its own costs its start-up and idle workers on 2 cores):
    # when it dies its trials' actors die with it, and what --resume needs, Tune's experiment state and the
    # trials' checkpoints, is in storage either way
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # Tune saves its experiment state at the end of every step, not every 10 s: the trial the leaderboard shows
    # finished is finished in Tune's state too when the driver dies (else the resume re-runs its driver, which
    # finds its Train run done and only reports it again: ~10 s of process starts)
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)  # fmt: skip
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
    # resumed on another cluster shape: 2 CPUs per Train worker instead of 1 (resources.cpus_per_worker)
    resumed_path = _spec_file(tmp_path, tiny_dataset, "resume", {"algorithm": "grid"}, space=space,
                              resources={"cpus_per_worker": 2}, file_name="resume-2cpus")  # fmt: skip
    groups_before = set(ray_local.util.placement_group_table())
    table, paths = run_sweep(load_sweep(resumed_path), str(results), resume=True)
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    assert sorted(table["config/adapter.molre.experts"]) == [2, 3]  # the grid, each point once
    assert {Path(p).name for p in paths.values()} >= LEADERBOARD_FILES
    for trial_id, checkpoints in done_dirs.items():  # finished trials were not trained again
        assert (
            sorted(p.name for p in (results / "resume" / "runs" / trial_id).glob("checkpoint_*"))
            == checkpoints
        )

    # the resumed trials' Train workers asked Ray for 2 CPUs each (their placement groups' bundles), and the
    # table says what each trial ran with: 1 CPU for the trials finished before the resume
    new_groups = [g for pg, g in ray_local.util.placement_group_table().items() if pg not in groups_before]
    worker_cpus = [b["CPU"] for g in new_groups for b in g["bundles"].values() if b.get("CPU")]
    assert worker_cpus and set(worker_cpus) == {2.0}
    ran_with = dict(zip(table["trial_id"], table["config/scaling.cpus_per_worker"], strict=True))
    assert {ran_with[t] for t in done} == {1.0} and set(ran_with.values()) == {1.0, 2.0}

    # the record holds the spec resumed with, and its history the old resources
    record = json.loads((results / "resume" / SPEC_FILE).read_text())
    assert record["spec"] == load_sweep(resumed_path).model_dump(mode="json")
    [resumed] = record["resumes"]
    assert resumed["changed"] == {"resources.cpus_per_worker": {"from": 1.0, "to": 2.0}}

    # a changed spec file under the same name is refused, naming what changed, before anything runs (its
    # finished trials trained with the recorded spec)
    changed = _spec_file(tmp_path, tiny_dataset, "resume", {"algorithm": "grid"},
                         space={"adapter.molre.experts": {"choice": [2, 3, 4]}},
                         resources={"cpus_per_worker": 2})  # fmt: skip
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


# ---- without Ray ------------------------------------------------------------------------------------------


def _bare_spec(multi_fidelity: dict | None = None, **resources) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "exp", "base": {"backbone": {"preset": "tiny-vit"}},
        "space": {"adapter.molre.experts": {"choice": [2, 3]}}, "search": {"algorithm": "grid"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1, **resources},
        "multi_fidelity": multi_fidelity,
    })  # fmt: skip


def test_a_resume_may_change_the_per_worker_resources_and_the_record_keeps_the_old_ones(tmp_path, caplog):
    sweep.write_experiment_record(str(tmp_path), sweep.experiment_record(_bare_spec(), None))
    moved = _bare_spec(cpus_per_worker=4, gpus_per_worker=0.5)  # a node with more CPUs, two trials per GPU
    with caplog.at_level(logging.WARNING, logger="molre.tune.sweep"):
        sweep.check_resumable(moved, str(tmp_path), None)
    assert "resources.cpus_per_worker: 1.0 -> 4.0" in caplog.text
    assert "resources.gpus_per_worker: 1.0 -> 0.5" in caplog.text
    record = json.loads((tmp_path / SPEC_FILE).read_text())
    assert record["spec"] == moved.model_dump(mode="json")  # the remaining trials run with these
    [entry] = record["resumes"]  # what the trials finished before this resume ran with
    assert entry["changed"] == {"resources.cpus_per_worker": {"from": 1.0, "to": 4.0},
                                "resources.gpus_per_worker": {"from": 1.0, "to": 0.5}}  # fmt: skip
    sweep.check_resumable(moved, str(tmp_path), None)  # the same again: nothing changed, nothing recorded
    assert len(json.loads((tmp_path / SPEC_FILE).read_text())["resumes"]) == 1
    back = _bare_spec(cpus_per_worker=1, gpus_per_worker=0.5)
    sweep.check_resumable(back, str(tmp_path), None)
    assert [e["changed"] for e in json.loads((tmp_path / SPEC_FILE).read_text())["resumes"]][-1] == {
        "resources.cpus_per_worker": {"from": 4.0, "to": 1.0}
    }


@pytest.mark.parametrize(
    ("resources", "reason"),
    [
        ({"num_workers": 2}, "Resume with the original spec"),  # the DDP world size changes the results
        ({"max_concurrent_trials": 4}, "fixed by Tune when the experiment was created"),
        ({"reuse_actors": False}, "fixed by Tune when the experiment was created"),
        ({"trial_max_failures": 0}, "Tuner.restore takes no new TuneConfig or RunConfig"),
    ],
)
def test_a_resume_refuses_the_other_resources_saying_why(tmp_path, resources, reason):
    sweep.write_experiment_record(str(tmp_path), sweep.experiment_record(_bare_spec(), None))
    key = next(iter(resources))
    with pytest.raises(ConfigError, match=rf"resources\.{key}: .* -> ") as refused:
        sweep.check_resumable(_bare_spec(cpus_per_worker=2, **resources), str(tmp_path), None)
    assert reason in str(refused.value)
    assert "resources.cpus_per_worker" not in str(refused.value)  # allowed: not named among the changes
    assert "resumes" not in json.loads((tmp_path / SPEC_FILE).read_text())  # the record is untouched


def test_a_multi_fidelity_resume_refuses_other_per_worker_resources(tmp_path):
    """Its screen trials hold their Tune resources (one device each) in Tune's state: a restored trial keeps them."""
    screened = {"confirm_top": 1}
    sweep.write_experiment_record(str(tmp_path), sweep.experiment_record(_bare_spec(screened), None))
    moved = _bare_spec(screened, gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_worker: 1\.0 -> 0\.5.*screen trials"):
        sweep.check_resumable(moved, str(tmp_path), None)


def _trial(trial_id: str, status: str = "TERMINATED"):
    """A trial as the callback sees it (Tune's Trial: id, status, recorded config, last result)."""
    metrics = {"epoch": 0, "best_epoch": 0, "val/best_mean_auc": 0.7, "time_total_s": 3.0}
    return SimpleNamespace(trial_id=trial_id, status=status, config={"point": {"adapter.molre.experts": 2},
                           "seed": 0}, last_result=metrics)  # fmt: skip


def _rows(experiment: Path) -> list[str]:
    return sorted(pd.read_parquet(experiment / "trials.parquet")["trial_id"])


def test_the_leaderboard_is_rewritten_at_most_once_per_interval_and_a_waiting_trial_soon(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(sweep.LEADERBOARD_INTERVAL_ENV, "1.5")
    experiment = tmp_path / "exp"
    callback = sweep.LeaderboardCallback(_bare_spec(), str(experiment))
    t1, t2, t3 = _trial("t1", "RUNNING"), _trial("t2"), _trial("t3", "ERROR")
    callback.on_trial_complete(0, [t1], t1)  # the first end: written at once
    assert _rows(experiment) == ["t1"]
    # Tune calls on_trial_complete before it marks the trial TERMINATED: the table must not say RUNNING
    assert list(pd.read_parquet(experiment / "trials.parquet")["status"]) == ["TERMINATED"]
    t1.status = "TERMINATED"
    callback.on_trial_complete(1, [t1, t2], t2)  # within the interval: waits (a burst costs one rewrite)
    callback.on_trial_error(2, [t1, t2, t3], t3)
    callback.on_step_begin(3, [t1, t2, t3])
    assert _rows(experiment) == ["t1"]
    time.sleep(1.6)
    callback.on_step_begin(4, [t1, t2, t3])  # the interval is over: Tune's next step writes both
    assert _rows(experiment) == ["t1", "t2", "t3"]
    written = (experiment / "trials.parquet").stat().st_mtime_ns
    time.sleep(1.6)
    callback.on_step_begin(5, [t1, t2, t3])  # nothing ended since: nothing to write
    assert (experiment / "trials.parquet").stat().st_mtime_ns == written

    restored = pickle.loads(pickle.dumps(callback))  # as Tune restores it on --resume, in another process
    t4 = _trial("t4")
    restored.on_trial_complete(6, [t1, t2, t3, t4], t4)  # its first end writes at once
    assert _rows(experiment) == ["t1", "t2", "t3", "t4"]
    monkeypatch.setenv(sweep.LEADERBOARD_INTERVAL_ENV, "0")  # 0: every end, as before the interval
    t5 = _trial("t5")
    restored.on_trial_complete(7, [t1, t2, t3, t4, t5], t5)
    assert _rows(experiment) == ["t1", "t2", "t3", "t4", "t5"]


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_malformed_leaderboard_interval_stops_the_sweep_before_it_starts(tmp_path, monkeypatch, value):
    monkeypatch.setenv(sweep.LEADERBOARD_INTERVAL_ENV, value)
    with pytest.raises(ConfigError, match=rf"{sweep.LEADERBOARD_INTERVAL_ENV}='{value}': expected seconds"):
        run_sweep(_bare_spec(), str(tmp_path / "results"))


def test_the_sweep_module_and_the_presets_import_no_heavy_package():
    """A Ray Train controller imports the sweep module for each trial (its report callback), and `molre sweep`
    does before it checks a spec: sklearn is imported where AUCs are computed, torch where checkpoints are read,
    timm where a net is built (the presets' names and domains, all the leaderboard needs, do without it)."""
    code = (
        "import sys\n"
        "import molre.tune.sweep\n"
        "print(sorted(m for m in ('sklearn', 'torch', 'timm') if m in sys.modules))\n"
        "import molre.models\n"
        "print(sorted(m for m in ('sklearn', 'timm') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_a_trial_reports_the_resources_its_checkpoint_was_trained_with(tmp_path):
    """A trial resumed after its Train run finished re-reports that run without training: the resources in the
    report are the checkpoint's, not those of the spec it was resumed with."""
    from molre.config import build_config, config_to_dict

    trained = build_config({"scaling": {"cpus_per_worker": 1, "gpus_per_worker": 0.5}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(trained)))
    resumed = build_config({"scaling": {"cpus_per_worker": 2, "gpus_per_worker": 1}})
    assert sweep.checkpoint_scaling(str(tmp_path), resumed) == {
        "scaling/cpus_per_worker": 1.0, "scaling/gpus_per_worker": 0.5}  # fmt: skip
    assert sweep.checkpoint_scaling(str(tmp_path / "none"), resumed)["scaling/cpus_per_worker"] == 2.0
