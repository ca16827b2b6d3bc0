"""ASHA end to end in a real local Ray: the trial below the first rung's cutoff is stopped after one epoch, molre's
trials table and leaderboard mark it stopped early (TERMINATED, not ERROR, and not as if it ran to the end), and
the winner is the trial that ran every epoch.

Two grid trials (grid order: the learner first) run one at a time, for at most two epochs. ASHA counts Tune
iterations, one per epoch report plus the trial's final report (max_t = max_epochs + 1 = 3). grace_period 1 and
reduction_factor 4 give one rung, at iteration 1 (1 * 4**k < 3 for k = 0 only), whose cutoff is the 75th
percentile of the objectives recorded there: the first trial finds it empty and runs on; the second is stopped
when its epoch-0 objective is below the first's. The learner (lr_head 0.1) reaches val/best_mean_auc ~0.65 in
its first epoch; the staller (every lr 1e-7) keeps its initial weights, ~0.50 (same seed, so the same weights
the learner started from).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
import ray.tune
import yaml

from molre.tune.leaderboard import Analysis, ranking_table
from molre.tune.space import load_sweep
from molre.tune.sweep import run_sweep

MAX_EPOCHS = 2
LEARNS, STALLS = 1.0e-1, 1.0e-7  # lr_head of the trial that learns / of the one ASHA stops
ASHA = {"grace_period": 1, "reduction_factor": 4}


def _spec_file(tmp_path: Path, data: str, asha: dict | None) -> Path:
    spec = {
        "name": "asha",
        "base": {
            "backbone": {"preset": "tiny-vit"},
            "adapter": {"kind": "none"},
            "data": {"uri": data, "augment": {"enabled": False}},
            "optim": {"lr_adapter": 1.0e-7},
            # min_epochs = max: no patience stop, so an epoch short of the max is ASHA's doing
            "train": {"max_epochs": MAX_EPOCHS, "min_epochs": MAX_EPOCHS, "batch_size": 4},
        },
        "space": {"optim.lr_head": {"choice": [LEARNS, STALLS]}},
        "search": {"algorithm": "grid"},
        "scheduler": {"asha": asha},
        "resources": {"num_workers": 1, "max_concurrent_trials": 1},
    }
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_asha_stops_the_trial_below_the_first_rung_and_the_leaderboard_tells_it_apart(
    ray_local, tiny_dataset, tmp_path
):
    spec = load_sweep(_spec_file(tmp_path, tiny_dataset, ASHA))
    groups_before = set(ray_local.util.placement_group_table())
    try:
        table, paths = run_sweep(spec, str(tmp_path / "results"))
        # the stopped trial's worker group is given back by Ray Train's cleaner (it needs the dashboard's state
        # API, which ensure_ray and this session's Ray run): without it, it held its CPU until the session ended
        assert _left_groups(ray_local, groups_before, wait_s=30) == []
    finally:
        _remove_left_groups(ray_local, groups_before)
    experiment = tmp_path / "results" / "asha"

    # Tune's own record: the staller reported one epoch and no final report, the learner every epoch and its final
    analysis = ray.tune.ExperimentAnalysis(str(experiment))
    reports = {
        t.config["point"]["optim.lr_head"]: analysis.trial_dataframes[t.trial_id] for t in analysis.trials
    }
    assert list(reports[STALLS]["epoch"]) == [0]
    assert list(reports[LEARNS]["training_iteration"]) == [1, 2, MAX_EPOCHS + 1]
    assert reports[STALLS]["val/best_mean_auc"].iloc[0] < reports[LEARNS]["val/best_mean_auc"].iloc[0]

    # molre's trials table, as written to storage (the returned one is the same)
    trials = pd.read_parquet(experiment / "trials.parquet")
    pd.testing.assert_frame_equal(trials, table)
    assert list(trials["status"]) == ["TERMINATED", "TERMINATED"]  # a stop is no failure
    by_lr = trials.set_index("config/optim.lr_head")
    learner, staller = by_lr.loc[LEARNS], by_lr.loc[STALLS]
    assert not learner["stopped_early"] and learner["epochs"] == MAX_EPOCHS
    assert staller["stopped_early"] and staller["epochs"] == 1
    # every epoch report carries the parameter counts (an objective of a multi-objective search), the staller's too
    assert learner["params/total"] > 0 and staller["params/total"] == learner["params/total"]
    assert list(reports[STALLS]["report"]) == ["epoch"] and list(reports[LEARNS]["report"])[-1] == "final"
    # the staller's row is its best (only) epoch's: the objective ASHA saw and that epoch's per-finding AUCs
    assert staller["val/best_mean_auc"] == reports[STALLS]["val/best_mean_auc"].iloc[0]
    assert staller["val/n_defined"] == 3  # the tiny data's three planted findings
    assert (
        staller["auc/intraparenchymal_hemorrhage"]
        == reports[STALLS]["val/auc/intraparenchymal_hemorrhage"].iloc[0]
    )
    assert staller["val/best_mean_auc"] < learner["val/best_mean_auc"]
    # and its Train run did stop: one epoch's checkpoint in storage, the learner's two
    checkpoints = {
        t: sum(p.is_dir() for p in (experiment / "runs" / t).glob("checkpoint_*")) for t in trials["trial_id"]
    }
    assert checkpoints == {staller["trial_id"]: 1, learner["trial_id"]: MAX_EPOCHS}

    # the leaderboard ranks both, says which one ASHA stopped, and compares only the one that ran to the end
    ranking = ranking_table(Analysis.of(trials).finished)
    assert list(ranking["trial"]) == [learner["trial_id"], staller["trial_id"]]
    assert list(ranking["ASHA stop"]) == ["", "yes"] and list(ranking["epochs"]) == ["2", "1"]
    [setting] = Analysis.of(trials).best.values()  # Table 2's one cell (tiny-vit, LoRA)
    assert list(setting.trials["trial_id"]) == [learner["trial_id"]]
    markdown = Path(paths["leaderboard.md"]).read_text()
    assert "1 trial(s) stopped early by ASHA are ranked but not compared." in markdown
    [row] = [line for line in markdown.splitlines() if line.startswith(f"| 2 | {staller['trial_id']} |")]
    assert "| 1 | yes |" in row  # its epochs and the ASHA stop column


def _left_groups(ray_module, before: set[str], wait_s: float = 0.0) -> list[str]:
    """Placement groups created since ``before`` and not removed, after waiting up to ``wait_s`` for none."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [
            group_id
            for group_id, group in ray_module.util.placement_group_table().items()
            if group_id not in before and group["state"] != "REMOVED"
        ]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


def _remove_left_groups(ray_module, before: set[str]) -> None:
    """A failed test's leftovers would hold their CPUs for the rest of the session's tests."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for group_id in _left_groups(ray_module, before):
        remove_placement_group(PlacementGroup(ray_module.PlacementGroupID(bytes.fromhex(group_id))))


@pytest.mark.parametrize("objectives", [[["val/best_mean_auc", "max"]],
                                        [["val/best_mean_auc", "max"], ["params/trainable", "min"]]])  # fmt: skip
def test_asha_takes_the_metric_tune_config_leaves_to_it(objectives):
    """What Tune does with the scheduler before any trial, without a cluster: it passes TuneConfig's metric and
    mode (one objective: the spec's; several: None) to set_search_properties, and refuses to run when that
    returns False (the scheduler had a metric of its own). ASHA then stops trials on the first objective."""
    from molre.tune.space import SweepSpec
    from molre.tune.sweep import _scheduler

    spec = SweepSpec.model_validate(
        {"name": "s", "search": {"objectives": objectives}, "scheduler": {"asha": ASHA}}
    )
    scheduler = _scheduler(spec, MAX_EPOCHS)
    # what _new_tuner gives TuneConfig, which Tune passes on
    metric, mode = (None, None) if len(objectives) > 1 else ("val/best_mean_auc", "max")
    assert scheduler.set_search_properties(metric, mode)
    assert (scheduler._metric, scheduler._mode) == ("val/best_mean_auc", "max")


def test_optuna_records_a_trial_asha_stopped_in_a_multi_objective_search():
    """Tune tells Optuna a stopped trial's last report; with [mean AUC, trainable parameters] as objectives, an
    epoch report without the counts was a [value, None] that Optuna refused (a logged warning), and the trial
    stayed RUNNING in the study, unlearnt from. The epochs' forwarding now carries them."""
    from molre.config import build_config
    from molre.tune.space import SweepSpec
    from molre.tune.sweep import REPORT, _searcher, epoch_report_extra, is_final

    objectives = [["val/best_mean_auc", "max"], ["params/trainable", "min"]]
    spec = SweepSpec.model_validate(
        {"name": "s", "space": {"optim.lr_head": {"choice": [LEARNS, STALLS]}},
         "search": {"objectives": objectives}, "scheduler": {"asha": ASHA}}
    )  # fmt: skip
    epoch = {"epoch": 0, "val/mean_auc": 0.5, "val/best_mean_auc": 0.5, "best_epoch": 0}
    extra = epoch_report_extra(build_config({"adapter": {"kind": "molre"}}))  # run_trial's forwarding adds it
    last = {**epoch, **extra}  # what the stopped trial's last (epoch) report holds
    assert extra["params/trainable"] > 0 and last[REPORT] == "epoch" and not is_final(last)
    searcher = _searcher(spec)
    assert searcher.suggest("t1") is not None
    searcher.on_trial_complete("t1", result=last)
    [trial] = searcher._ot_study.trials
    assert trial.state.name == "COMPLETE" and trial.values == [0.5, extra["params/trainable"]]
    assert is_final({**last, REPORT: "final"}) and is_final({"params/total": 1}) and not is_final({})
