"""Leaderboards: statistics on fabricated trials with a known MoLRE shift, tables, files (local and s3://), CLI."""

from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from molre.cli import main as cli_main
from molre.data import storage
from molre.findings import CATEGORY_NAMES, FINDING_IDS
from molre.tune import leaderboard as lb

SEARCHED = ["backbone.preset", "adapter.kind", "adapter.molre.experts", "adapter.molre.rank", "train.seed"]
PARAMS_TOTAL = {"dinov3-base": 86_600_000, "medgemma": 431_100_000, "deepcntd": 6_900_000}
UNDEFINED = FINDING_IDS[:2]  # no trial defines these (e.g. no positive case in validation)


def _trial_row(trial_id, preset, kind, seed, aucs, *, experts=6, rank=8, rng=None, max_experts=6) -> dict:
    defined = aucs[~np.isnan(aucs)]
    row = {
        "trial_id": trial_id, "status": "TERMINATED", "stopped_early": False, "epochs": 20,
        "checkpoint": f"s3://bucket/exp/{trial_id}/checkpoint",
        "config/backbone.preset": preset, "config/adapter.kind": kind,
        "config/adapter.molre.experts": experts, "config/adapter.molre.rank": rank,
        "config/adapter.molre.router_hidden": 256, "config/adapter.molre.placement": "features",
        "config/adapter.molre.top_k": None, "config/adapter.molre.balance_loss_weight": 0.0,
        "config/loss.gamma": 2.0, "config/optim.lr_head": 1e-3, "config/optim.lr_adapter": 1e-4,
        "config/train.seed": seed, "searched": json.dumps(SEARCHED),
        "val/best_mean_auc": defined.mean(), "val/std_auc": defined.std(),
        "val/n_auc_ge_090": int((defined >= 0.9).sum()),
        "val/n_auc_080_090": int(((defined >= 0.8) & (defined < 0.9)).sum()), "val/n_defined": defined.size,
        "params/total": PARAMS_TOTAL.get(preset, 1_000_000), "params/trainable": 590_000,
        "params/molre": 12 * 8 * experts * rank + 198_406 if kind == "molre" else 0,
        "router/entropy": np.nan,
    }  # fmt: skip
    row.update({f"auc/{fid}": a for fid, a in zip(FINDING_IDS, aucs, strict=True)})
    for cat in CATEGORY_NAMES:
        usage = rng.dirichlet(np.ones(experts)) if kind == "molre" else np.full(experts, np.nan)
        row.update(
            {f"router/usage/{cat}/{k}": (usage[k] if k < experts else np.nan) for k in range(max_experts)}
        )
    if kind == "molre":
        row["router/entropy"] = 0.8 * math.log(experts)
    return row


def synthetic_trials(presets=("dinov3-base", "medgemma", "deepcntd"), seeds=3, shift=0.03,
                     molre_settings=((6, 8), (4, 4)), noise=0.01, rng_seed=0) -> pd.DataFrame:  # fmt: skip
    """A fabricated trials table: per backbone, LoRA plus each MoLRE (experts, rank) setting, ``seeds`` seeds.
    Per-finding AUC = a backbone base level + (MoLRE only) ``shift`` for the first setting and ``shift / 2``
    for the others + N(0, noise) per trial. DeepCNTD gets no MoLRE (as in the paper)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for preset in presets:
        base = rng.uniform(0.70, 0.95, len(FINDING_IDS))
        arms = [("none", 6, 8, 0.0)]
        if preset != "deepcntd":
            arms += [
                ("molre", k, r, shift if i == 0 else shift / 2) for i, (k, r) in enumerate(molre_settings)
            ]
        for kind, experts, rank, delta in arms:
            for seed in range(seeds):
                aucs = np.clip(base + delta + rng.normal(0, noise, base.size), 0.5, 1.0)
                aucs[: len(UNDEFINED)] = np.nan
                trial_id = f"{preset}_{kind}_{experts}x{rank}_s{seed}"
                rows.append(
                    _trial_row(trial_id, preset, kind, seed, aucs, experts=experts, rank=rank, rng=rng)
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    return synthetic_trials()


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    """One backbone with both sides plus DeepCNTD: every section, one radar (keeps the file tests fast)."""
    return synthetic_trials(presets=("dinov3-base", "deepcntd"), molre_settings=((6, 8),))


def _lora_vs_molre(trials, preset):
    best = lb.best_settings(trials)
    return best[(preset, "none")], best[(preset, "molre")]


# ---- statistics --------------------------------------------------------------------------------------------


def test_known_shift_is_detected(trials):
    lora, molre = _lora_vs_molre(trials, "dinov3-base")
    c = lb.compare_findings(lora.per_finding, molre.per_finding)
    assert c.n == len(FINDING_IDS) - len(UNDEFINED)
    assert c.mean_diff == pytest.approx(0.03, abs=0.005)
    assert c.mean_diff == pytest.approx(c.molre_mean - c.lora_mean)
    assert c.ci[0] > 0 and c.ci[0] < c.mean_diff < c.ci[1]
    assert c.p_value < 1e-6 and c.verdict == "MoLRE higher"


def test_no_shift_ci_covers_zero():
    none = synthetic_trials(presets=("dinov3-base",), shift=0.0, molre_settings=((6, 8),))
    lora, molre = _lora_vs_molre(none, "dinov3-base")
    c = lb.compare_findings(lora.per_finding, molre.per_finding)
    assert c.ci[0] < 0 < c.ci[1] and c.p_value > 0.05 and c.verdict == "no clear difference"
    # an exactly symmetric set of differences: mean 0, the CI straddles 0, the test finds nothing
    base = pd.Series(np.linspace(0.7, 0.95, 40))
    c = lb.compare_findings(base, base + np.tile([0.02, -0.02], 20))
    assert c.mean_diff == pytest.approx(0.0, abs=1e-12) and c.ci[0] < 0 < c.ci[1] and c.p_value > 0.5


def test_bootstrap_is_seeded_and_deterministic():
    diffs = np.random.default_rng(1).normal(0.01, 0.02, 60)
    assert lb.bootstrap_ci(diffs, seed=0) == lb.bootstrap_ci(diffs, seed=0)
    assert lb.bootstrap_ci(diffs, seed=0) != lb.bootstrap_ci(diffs, seed=1)
    low, high = lb.bootstrap_ci(diffs)
    se = diffs.std(ddof=1) / math.sqrt(diffs.size)  # the percentile CI ~ mean +- 1.96 se for a mean
    assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.3 * se)
    assert high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.3 * se)


def test_too_few_pairs_is_reported_not_tested():
    lora = pd.Series([0.8, 0.9, np.nan, 0.7], index=list("abcd"))
    molre = pd.Series([0.85, np.nan, 0.9, 0.75], index=list("abcd"))
    c = lb.compare_findings(lora, molre)
    assert c.n == 2 and c.ci is None and c.p_value is None and "not enough data" in c.verdict
    assert c.mean_diff == pytest.approx(0.05)


def test_all_zero_differences_give_p_one():
    s = pd.Series(np.linspace(0.7, 0.9, 10))
    assert lb.compare_findings(s, s).p_value == 1.0


# ---- tables ------------------------------------------------------------------------------------------------


def test_best_setting_and_seed_grouping(trials):
    lora, molre = _lora_vs_molre(trials, "medgemma")
    assert lora.n_seeds == 3 and molre.n_seeds == 3
    assert molre.params == {"molre.experts": 6, "molre.rank": 8}  # the +shift setting wins
    assert lora.params == {}  # MoLRE keys do not split LoRA trials


def test_table2_rows_order_and_missing_sides(trials):
    t = lb.table2(lb.best_settings(trials)).set_index("Model")
    assert list(t.index) == ["dinov3-base", "medgemma", "deepcntd"]  # paper order
    assert t.loc["deepcntd", "+MoLRE AUC"] == "-" and t.loc["deepcntd", "MoLRE Params"] == "-"
    assert t.loc["dinov3-base", "Domain"] == "Natural" and t.loc["deepcntd", "Domain"] == "Head CT"
    assert (
        t.loc["dinov3-base", "Total Params"] == "86.6M"
        and t.loc["dinov3-base", "Trainable Params"] == "0.59M"
    )
    assert t.loc["medgemma", "LoRA seeds"].startswith("3 (sd ")
    # LoRA AUC: per-finding mean over seeds, then mean +- (population) std across defined findings
    rows = trials[
        (trials["config/backbone.preset"] == "dinov3-base") & (trials["config/adapter.kind"] == "none")
    ]
    per_finding = rows[[f"auc/{f}" for f in FINDING_IDS]].mean().dropna()
    assert (
        t.loc["dinov3-base", "Base (LoRA) AUC"] == f"{per_finding.mean():.3f} ± {per_finding.std(ddof=0):.3f}"
    )


def test_stratified_counts_equal_a_direct_count(trials):
    counts = lb.stratified_counts(lb.best_settings(trials))
    for preset in ("dinov3-base", "medgemma", "deepcntd"):
        rows = trials[
            (trials["config/backbone.preset"] == preset) & (trials["config/adapter.kind"] == "none")
        ]
        a = rows[[f"auc/{f}" for f in FINDING_IDS]].mean().dropna().to_numpy()
        assert counts.loc[preset, (">= 0.90", "LoRA")] == (a >= 0.9).sum()
        assert counts.loc[preset, ("0.80-0.90", "LoRA")] == ((a >= 0.8) & (a < 0.9)).sum()
        assert counts.loc[preset, ("defined", "LoRA")] == len(FINDING_IDS) - len(UNDEFINED)
    assert np.isnan(counts.loc["deepcntd", (">= 0.90", "+MoLRE")])


def test_seed_averaged_auc_on_a_band_threshold_counts_in_that_band():
    """Seed means that float arithmetic puts a hair below a threshold: mean(0.85, 0.95) = 0.8999999999999999
    and mean(0.5, 0.9, 1.0) = 0.7999999999999999; they belong to the >= 0.90 and 0.80-0.90 bands."""
    seeds = [(0.85, 0.5), (0.95, 0.9), (np.nan, 1.0)]  # finding 0 undefined in the third seed
    rows = []
    for seed, (first, second) in enumerate(seeds):
        aucs = np.full(len(FINDING_IDS), np.nan)
        aucs[:2] = first, second
        rows.append(_trial_row(f"s{seed}", "dinov3-base", "none", seed, aucs, rng=np.random.default_rng(0)))
    (setting,) = lb.best_settings(pd.DataFrame(rows)).values()
    assert setting.per_finding.iloc[:2].tolist() == [0.8999999999999999, 0.7999999999999999]
    assert lb.band_counts(setting.per_finding) == (1, 1, 2)
    counts = lb.stratified_counts({("dinov3-base", "none"): setting})
    assert counts.loc["dinov3-base", (">= 0.90", "LoRA")] == 1
    assert counts.loc["dinov3-base", ("0.80-0.90", "LoRA")] == 1


def test_ranking_is_sorted_and_shows_varying_config(trials):
    r = lb.ranking_table(lb.finished_trials(trials))
    values = r["val mean AUC"].astype(float).to_numpy()
    assert len(r) == len(trials) and (np.diff(values) <= 0).all()
    assert {"molre.experts", "train.seed"} <= set(r.columns) and "loss.gamma" not in r.columns
    assert set(r.loc[r["adapter"] == "LoRA", "molre.experts"]) == {""}  # no effect on LoRA: left blank


def test_importances_computed_or_skipped(trials):
    series, message = lb.hyperparameter_importances(lb.finished_trials(trials))
    assert series is not None and series.sum() == pytest.approx(1.0) and "backbone.preset" in series.index
    assert "fANOVA" in message
    series, message = lb.hyperparameter_importances(trials.head(3))
    assert series is None and "3 finished trial(s) < 4" in message
    one = trials[
        (trials["config/backbone.preset"] == "medgemma") & (trials["config/adapter.kind"] == "molre")
    ]
    one = one.assign(
        **{"config/train.seed": 0, "config/adapter.molre.experts": 6, "config/adapter.molre.rank": 8}
    )
    series, message = lb.hyperparameter_importances(one)
    assert series is None and "one value only" in message


def test_importances_with_a_none_choice(trials):
    t = lb.finished_trials(trials)
    t = t[t["config/adapter.kind"] == "molre"].copy()  # top_k is a MoLRE key: it applies to these trials only
    t["config/adapter.molre.top_k"] = [None if i % 2 else 2 for i in range(len(t))]
    t["searched"] = json.dumps([*SEARCHED, "adapter.molre.top_k", "loss.gamma"])
    series, message = lb.hyperparameter_importances(t)
    assert series is not None and "adapter.molre.top_k" in series.index
    assert "loss.gamma: one value only" in message


def _mixed_sweep_table() -> pd.DataFrame:
    """Trials rows as the sweep writes them (``trial_row``) for LoRA and MoLRE with experts in {2, 6}, 3 seeds;
    objective: LoRA 0.80, MoLRE 0.82 with 2 experts and 0.86 with 6, + seed noise."""
    from molre.tune.space import SweepSpec
    from molre.tune.sweep import trial_row

    spec = SweepSpec.model_validate({"name": "mixed", "space": {
        "adapter.kind": {"choice": ["none", "molre"]},
        "adapter.molre.experts": {"choice": [2, 6], "when": {"adapter.kind": "molre"}}}})  # fmt: skip
    points = [({"adapter.kind": "none"}, 0.80)]
    points += [({"adapter.kind": "molre", "adapter.molre.experts": k}, v) for k, v in ((2, 0.82), (6, 0.86))]
    rows = []
    for n, ((point, objective), seed) in enumerate(itertools.product(points, range(3))):
        metrics = {"val/best_mean_auc": objective + 0.002 * seed, "params/total": 1_000, "epochs": 20}
        rows.append(trial_row(f"t{n}", "TERMINATED", {"point": point, "seed": seed}, metrics, spec))
    return pd.DataFrame(rows)


def test_importance_study_leaves_out_keys_whose_condition_failed():
    table = _mixed_sweep_table()
    assert (table.loc[table["config/adapter.kind"] == "none", "config/adapter.molre.experts"] == 6).all()
    study, notes = lb.importance_study(table)
    for trial, kind in zip(study.trials, table["config/adapter.kind"], strict=True):
        assert ("adapter.molre.experts" in trial.params) == (kind == "molre")  # LoRA: no experts=6 default
    assert set(study.trials[0].params) == {"adapter.kind", "train.seed"}
    series, message = lb.hyperparameter_importances(table)
    assert series is not None and set(series.index) == {"adapter.kind", "train.seed"}
    assert series["adapter.kind"] > series["train.seed"]
    assert "adapter.molre.experts: conditional, applies to 6 of 9 trials" in message
    (within,) = lb.conditional_importances(table)
    assert within.keys == ("adapter.molre.experts",) and within.trials == 6
    assert within.importances is not None and within.importances.idxmax() == "adapter.molre.experts"


def test_importances_of_an_older_table_without_active_keys():
    """Tables written before the ``active_keys`` column: LoRA trials ignore adapter.molre.* (no effect there)."""
    table = _mixed_sweep_table().drop(columns="active_keys")
    study, _ = lb.importance_study(table)
    assert ["adapter.molre.experts" in t.params for t in study.trials] == [False] * 3 + [True] * 6
    blocks = lb._importances(lb.Analysis.of(table))
    assert any(
        "Within the 6 trials where adapter.molre.experts apply" in getattr(b, "text", "") for b in blocks
    )


def test_infer_distribution():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert lb.infer_distribution([1, 1]) is None
    assert isinstance(lb.infer_distribution(["a", "b"]), CategoricalDistribution)
    assert set(lb.infer_distribution([2, None, 2]).choices) == {2, None}
    d = lb.infer_distribution([4, 8, 6])
    assert isinstance(d, IntDistribution) and (d.low, d.high, d.log) == (4, 8, False)
    d = lb.infer_distribution([1e-5, 1e-3, 1e-2])
    assert isinstance(d, FloatDistribution) and d.log and d.low == 1e-5
    assert not lb.infer_distribution([0.5, 2.0]).log


def test_router_uses_best_trial_of_best_setting(trials):
    results = {r.preset: r for r in lb.router_results(lb.best_settings(trials))}
    assert set(results) == {"dinov3-base", "medgemma"}  # deepcntd: no MoLRE
    r = results["dinov3-base"]
    assert r.experts == 6 and r.usage.shape == (6, 6)
    assert r.relative_entropy == pytest.approx(0.8)
    assert np.allclose(r.usage.sum(axis=1), 1.0)


# ---- files -------------------------------------------------------------------------------------------------


def _check_written(written: dict[str, str]) -> str:
    for name in ("trials.parquet", "trials.csv", "leaderboard.md", "report.html"):
        assert name in written
    for uri in written.values():
        assert storage.exists(uri) and len(storage.read_bytes(uri)) > 0
    html = storage.read_bytes(written["report.html"]).decode()
    assert 'src="http' not in html and "<link" not in html and "<script" not in html
    pngs = [n for n in written if n.endswith(".png")]
    assert html.count('src="data:image/png;base64,') == len(pngs)
    markdown = storage.read_bytes(written["leaderboard.md"]).decode()
    assert all(f"]({n})" in markdown for n in pngs)
    return html


def test_write_leaderboard_local(trials, tmp_path):
    written = lb.write_leaderboard(trials, str(tmp_path / "lb"), title="synthetic")
    html = _check_written(written)
    assert {"stratified_counts.png", "radar_dinov3-base.png", "radar_medgemma.png", "importances.png",
            "router_usage.png"} <= set(written)  # fmt: skip
    assert "radar_deepcntd.png" not in written
    assert "MoLRE higher" in html and "Table 2" in html
    back = pd.read_parquet(io.BytesIO(storage.read_bytes(written["trials.parquet"])))
    assert len(back) == len(trials) and list(back.columns) == list(trials.columns)


def test_write_leaderboard_s3(small, s3_bucket):
    experiment = f"{s3_bucket}/sweeps/exp1"
    written = lb.write_leaderboard(small, experiment)
    assert all(uri.startswith(experiment) for uri in written.values())
    _check_written(written)
    assert len(lb.load_trials(experiment)) == len(small)


@pytest.mark.parametrize("case", ["empty", "no_columns", "error_only", "lora_only", "nan_aucs", "running"])
def test_partial_inputs_give_an_honest_report(small, tmp_path, case):
    t = small.copy()
    if case == "empty":
        t = t.iloc[:0]
    elif case == "no_columns":
        t = pd.DataFrame()
    elif case == "error_only":
        t = t.assign(status="ERROR", **{c: np.nan for c in t.columns if c.startswith(("val/", "auc/"))})
    elif case == "lora_only":
        t = t[t["config/adapter.kind"] == "none"]
    elif case == "nan_aucs":  # only 3 findings defined anywhere: too few pairs for a test
        t = t.assign(**{f"auc/{f}": np.nan for f in FINDING_IDS[5:]})
    elif case == "running":
        t = t.assign(status=["RUNNING", "PENDING", *["TERMINATED"] * (len(t) - 2)])
        t.loc[t.index[2], "stopped_early"] = True
    html = _check_written(lb.write_leaderboard(t, str(tmp_path / case)))
    expected = {
        "empty": "No finished trials yet", "no_columns": "No finished trials yet",
        "error_only": "ended in ERROR", "lora_only": "No backbone has finished trials on both sides",
        "nan_aucs": "not enough data", "running": "stopped early by ASHA are ranked but not compared",
    }[case]  # fmt: skip
    assert expected in html


def test_missing_trials_table_is_a_clear_error(tmp_path):
    with pytest.raises(lb.MolreError, match="no trials table"):
        lb.load_trials(str(tmp_path))


def test_cli_regenerates_from_trials_parquet(small, tmp_path, capsys):
    trials = small
    experiment = tmp_path / "exp"
    buf = io.BytesIO()
    trials.to_parquet(buf, index=False)
    storage.write_bytes(str(experiment / "trials.parquet"), buf.getvalue())
    before = (experiment / "trials.parquet").read_bytes()
    assert cli_main(["leaderboard", str(experiment), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{len(trials)} trials, {len(trials)} finished" in out and "report.html" in out
    assert (experiment / "report.html").stat().st_size > 0 and (experiment / "leaderboard.md").exists()
    assert (experiment / "trials.parquet").read_bytes() == before  # the sweep's table is left alone
    assert cli_main(["leaderboard", str(experiment), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "trials.parquet").exists()
    assert cli_main(["leaderboard", str(tmp_path / "nothing")]) == 2
