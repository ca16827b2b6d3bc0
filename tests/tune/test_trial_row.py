"""A trial's row in the trials table, from hand-made Tune reports (no Ray): an ASHA-stopped trial's per-finding
AUCs, std and band counts are its best epoch's, like its objective val/best_mean_auc."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import ray.train

from molre.findings import FINDING_IDS
from molre.train.metrics import per_finding_auc, summarize
from molre.tune import leaderboard as lb
from molre.tune.multifidelity import epoch_report
from molre.tune.space import SweepSpec
from molre.tune.sweep import BestEpochAUCs, best_aucs_in_checkpoint, trial_row

SPEC = SweepSpec.model_validate({"name": "t", "space": {"adapter.kind": {"choice": ["none", "molre"]}}})
CONFIG = {"point": {"adapter.kind": "molre"}, "seed": 0}
RNG = np.random.default_rng(0)
# epoch 1 is the best (highest mean); epoch 2, the last before ASHA stops the trial, is worse on every finding
EPOCH_AUCS = [RNG.uniform(0.55, 0.75, 75), RNG.uniform(0.80, 0.99, 75), RNG.uniform(0.60, 0.85, 75)]


def _epoch_reports() -> list[dict]:
    """What the worker loop reports per epoch: its own summary and per-finding AUCs, plus the best so far."""
    reports, best_epoch, best = [], -1, -math.inf
    for epoch, aucs in enumerate(EPOCH_AUCS):
        summary = summarize(aucs).as_dict("val/")
        if summary["val/mean_auc"] > best:
            best_epoch, best = epoch, summary["val/mean_auc"]
        report = {**summary, "epoch": epoch, "best_epoch": best_epoch, "val/best_mean_auc": best,
                  "train/loss": 0.1, "time_total_s": 12.0}  # fmt: skip
        report.update({f"val/auc/{fid}": float(a) for fid, a in zip(FINDING_IDS, aucs, strict=True)})
        reports.append(report)
    return reports


def _forwarded(reports: list[dict]) -> dict:
    """The last report Tune holds for the trial: each epoch forwarded with the best epoch's AUCs added."""
    best = BestEpochAUCs()
    return [{**r, **best.update(r)} for r in reports][-1]


def _row_aucs(row: dict) -> np.ndarray:
    return np.array([row[f"auc/{fid}"] for fid in FINDING_IDS])


def test_stopped_trial_row_has_its_best_epochs_aucs_std_and_bands():
    last = _forwarded(_epoch_reports())
    assert last["epoch"] == 2 and last["best_epoch"] == 1
    row = trial_row("t1", "TERMINATED", CONFIG, last, SPEC)
    assert row["stopped_early"] and row["epochs"] == 3
    np.testing.assert_array_equal(_row_aucs(row), EPOCH_AUCS[1])
    best = summarize(EPOCH_AUCS[1])
    assert row["val/best_mean_auc"] == pytest.approx(best.mean)  # objective and AUCs: the same epoch
    assert row["val/std_auc"] == pytest.approx(best.std)
    assert (row["val/n_auc_ge_090"], row["val/n_auc_080_090"]) == (best.n_high, best.n_moderate)
    assert (row["val/n_auc_ge_090"], row["val/n_auc_080_090"]) != (
        summarize(EPOCH_AUCS[2]).n_high,
        summarize(EPOCH_AUCS[2]).n_moderate,
    )  # the last epoch's counts differ: the test tells the two apart
    assert not any(k.startswith("val/auc/") for k in row)


def test_table2_of_stopped_trials_uses_the_best_epoch():
    row = trial_row("t1", "TERMINATED", CONFIG, _forwarded(_epoch_reports()), SPEC)
    (setting,) = lb.best_settings(lb.finished_trials(pd.DataFrame([row]))).values()
    mean, std = setting.auc_mean_std()
    assert mean == pytest.approx(setting.objective) and std == pytest.approx(EPOCH_AUCS[1].std())


def test_screen_epoch_reports_carry_the_best_epochs_aucs():
    best = BestEpochAUCs()
    reports = [epoch_report(r, best, {"fidelity": "cached", "point": "{}"}) for r in _epoch_reports()]
    row = trial_row("t1", "TERMINATED", CONFIG, reports[-1], SPEC)
    np.testing.assert_array_equal(_row_aucs(row), EPOCH_AUCS[1])
    assert reports[-1]["point"] == "{}"


def test_best_epoch_unknown_after_a_resume_gives_no_aucs_until_read_from_the_checkpoint(tmp_path):
    resumed = _epoch_reports()[2]  # a fresh process sees epoch 2 only; its best epoch (1) came before
    best = BestEpochAUCs()
    assert best.update(resumed) == {}
    labels = (RNG.random((40, 75)) < 0.4).astype(np.uint8)
    scores = RNG.random((40, 75)) + 0.5 * labels
    np.savez(tmp_path / "val_outputs.npz", scores=scores, labels=labels, known=np.ones_like(labels))
    aucs = best_aucs_in_checkpoint(ray.train.Checkpoint.from_directory(str(tmp_path)))
    assert list(aucs.values()) == list(per_finding_auc(scores, labels))
    best.remember(resumed["best_epoch"], aucs)
    assert list(best.update(resumed).values()) == list(aucs.values())
    assert best_aucs_in_checkpoint(ray.train.Checkpoint.from_directory(str(tmp_path / "none"))) is None


def test_results_without_forwarded_aucs_fall_back_to_the_last_epoch():
    row = trial_row("t1", "TERMINATED", CONFIG, _epoch_reports()[-1], SPEC)
    np.testing.assert_array_equal(_row_aucs(row), EPOCH_AUCS[2])
    assert row["val/std_auc"] == pytest.approx(EPOCH_AUCS[2].std())


def test_pending_trial_row_has_no_aucs_and_no_summary():
    row = trial_row("t1", "PENDING", CONFIG, {}, SPEC)
    assert np.isnan(_row_aucs(row)).all() and "val/std_auc" not in row and not row["stopped_early"]


def test_row_config_is_what_the_trial_ran_with():
    """The sweep's resolved data and per-trial resources, as ``trial_run_config`` gives them to the trial."""
    spec = SweepSpec.model_validate(
        {**SPEC.model_dump(), "resources": {"num_workers": 2, "cpus_per_worker": 3}}
    )
    row = trial_row("t1", "TERMINATED", {"point": {"adapter.kind": "molre"}, "seed": 4}, {}, spec, "/data/x")
    assert row["config/data.uri"] == "/data/x" and row["config/train.seed"] == 4
    assert (row["config/scaling.num_workers"], row["config/scaling.cpus_per_worker"]) == (2, 3.0)
    assert row["config/adapter.kind"] == "molre"
