"""molre compare: DeLong's test against a plain pair-by-pair computation, pairing by study_hash, refusals and
the CLI on evaluate-style folders written here (no model, no Ray)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from molre.cli import main
from molre.errors import ConfigError, DataError
from molre.findings import FINDING_IDS
from molre.train import compare as cmp

C = len(FINDING_IDS)
MANIFEST = "ab" * 32


def _data(n: int = 120, seed: int = 0):
    """studies [n], scores of A and B [n, C] (2 decimals: ties within and across classes), labels, known."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, C)) < 0.3).astype(np.uint8)
    known = (rng.random((n, C)) < 0.9).astype(np.uint8)
    scores_a = (0.3 * labels + 0.7 * rng.random((n, C))).round(2)
    scores_b = (0.4 * labels + 0.6 * rng.random((n, C))).round(2)
    return [f"study{i:04d}" for i in range(n)], scores_a, scores_b, labels, known


def _write(folder: Path, studies, scores, labels, known, **summary) -> str:
    """An evaluate output folder: scores.parquet in evaluate's exact format (fixed-size lists, float32 /
    uint8, finding ids in the metadata) and a summary.json with evaluate's provenance keys."""
    folder.mkdir(parents=True)

    def per_study(matrix, kind):
        return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(matrix).ravel(), kind), C)

    table = pa.table(
        {
            "study_hash": pa.array(studies, pa.string()),
            "patient_hash": pa.array([f"p-{s}" for s in studies], pa.string()),
            "scores": per_study(np.asarray(scores, dtype=np.float32), pa.float32()),
            "labels": per_study(np.asarray(labels, dtype=np.uint8), pa.uint8()),
            "known": per_study(np.asarray(known, dtype=np.uint8), pa.uint8()),
        },
        metadata={"molre.finding_ids": ",".join(FINDING_IDS)},
    )
    pq.write_table(table, folder / "scores.parquet", compression="zstd")
    doc = {"checkpoint": f"/runs/{folder.name}/checkpoint_000003", "data": "s3://bucket/shards",
           "split": "test", "manifest_sha256": MANIFEST, "molre_version": "0.1.0", "precision": "fp32",
           "trained_sha256": hashlib.sha256(folder.name.encode()).hexdigest(), "volumes": len(studies),
           **summary}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(doc))
    return str(folder)


def _pair(tmp_path: Path, seed: int = 0, n: int = 120):
    studies, sa, sb, labels, known = _data(n, seed)
    a = _write(tmp_path / "eval-a", studies, sa, labels, known)
    b = _write(tmp_path / "eval-b", studies, sb, labels, known)
    return a, b, (studies, sa, sb, labels, known)


def _table(a: str, b: str) -> pd.DataFrame:
    """compare's per-finding table of two folders, after its checks."""
    ea, eb = cmp.read_evaluation(a), cmp.read_evaluation(b)
    cmp.check_same_data(ea, eb)
    eb = cmp.align(ea, eb)
    cmp.check_same_labels(ea, eb)
    return cmp.finding_table(ea, eb)


# ---- DeLong against the definition ------------------------------------------------------------------------


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _plain_delong(pos: np.ndarray, neg: np.ndarray):
    """DeLong et al. 1988 as written, O(k^2 m n): theta, V10, V01 by comparing every pair, then
    S = S10 / m + S01 / n with S10, S01 sample covariances (divisor m - 1, n - 1): (theta, S, V10, V01)."""
    k, m, n = pos.shape[0], pos.shape[1], neg.shape[1]
    v10 = np.array(
        [[sum(_psi(pos[r, i], neg[r, j]) for j in range(n)) / n for i in range(m)] for r in range(k)]
    )
    v01 = np.array(
        [[sum(_psi(pos[r, i], neg[r, j]) for i in range(m)) / m for j in range(n)] for r in range(k)]
    )
    theta = np.array([sum(_psi(pos[r, i], neg[r, j]) for i in range(m) for j in range(n)) / (m * n)
                      for r in range(k)])  # fmt: skip
    s10 = [[sum((v10[r, i] - theta[r]) * (v10[s, i] - theta[s]) for i in range(m)) / (m - 1)
            for s in range(k)] for r in range(k)]  # fmt: skip
    s01 = [[sum((v01[r, j] - theta[r]) * (v01[s, j] - theta[s]) for j in range(n)) / (n - 1)
            for s in range(k)] for r in range(k)]  # fmt: skip
    return theta, np.array(s10) / m + np.array(s01) / n, v10, v01


def test_midranks_are_the_average_ranks_of_ties():
    assert cmp.midranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    x = np.random.default_rng(1).integers(0, 7, 40).astype(float)  # many ties
    np.testing.assert_array_equal(cmp.midranks(x), rankdata(x, method="average"))


@pytest.mark.parametrize(("seed", "k", "m", "n"), [(0, 2, 7, 11), (1, 2, 12, 5), (2, 3, 9, 9), (3, 2, 2, 2)])
def test_fast_delong_matches_the_pair_by_pair_definition(seed, k, m, n):
    rng = np.random.default_rng(seed)
    # one decimal: ties within each class and across the classes, which the midranks must count as 1/2
    pos, neg = (rng.random((k, m)) + 0.2).round(1), rng.random((k, n)).round(1)
    theta, plain, v10, v01 = _plain_delong(pos, neg)
    aucs, cov = cmp.delong_covariance(pos, neg)
    for fast, slow in zip(cmp.structural_components(pos, neg), (theta, v10, v01), strict=True):
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    np.testing.assert_allclose(aucs, theta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, plain, rtol=0, atol=1e-10)  # variances and covariances
    for r in range(k):  # and theta is the ROC AUC
        y = np.r_[np.ones(m), np.zeros(n)]
        assert aucs[r] == pytest.approx(roc_auc_score(y, np.r_[pos[r], neg[r]]), abs=1e-12)
    # the test of B - A (rows 0 and 1): Var = S_AA + S_BB - 2 S_AB, p = 2 (1 - Phi(|z|)) = erfc(|z| / sqrt 2)
    test = cmp.delong_test(pos[0], neg[0], pos[1], neg[1])
    var = plain[0, 0] + plain[1, 1] - 2 * plain[0, 1]
    assert test.diff == pytest.approx(theta[1] - theta[0], abs=1e-12)
    if var > 0:
        assert test.se == pytest.approx(math.sqrt(var), abs=1e-10)
        z = (theta[1] - theta[0]) / math.sqrt(var)
        assert test.p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), abs=1e-10)
        assert test.ci_low == pytest.approx(test.diff - 1.959963984540054 * test.se, abs=1e-10)


def test_identical_rankings_give_difference_0_and_p_1():
    rng = np.random.default_rng(4)
    pos, neg = rng.random(30).round(2) + 0.1, rng.random(40).round(2) + 0.1
    for b_pos, b_neg in ((pos, neg), (pos**3, neg**3)):  # the same model, and a monotone transform of it
        test = cmp.delong_test(pos, neg, b_pos, b_neg)
        assert (test.diff, test.se, test.z, test.p, test.ci_low, test.ci_high) == (0, 0, 0, 1, 0, 0)
        assert (
            test.auc_a
            == test.auc_b
            == pytest.approx(roc_auc_score(np.r_[[1] * 30, [0] * 40], np.r_[pos, neg]))
        )
        assert test.reason is None
    # a real difference is tested
    assert cmp.delong_test(pos, neg, pos + 0.2, neg).p < 0.05


def test_without_both_classes_or_with_one_of_a_class_there_is_no_test():
    two, none = np.array([0.2, 0.7]), np.array([])
    no_pos = cmp.delong_test(none, two, none, two)
    assert math.isnan(no_pos.auc_a) and math.isnan(no_pos.p) and no_pos.reason == "no positive"
    one = cmp.delong_test(np.array([0.9]), two, np.array([0.5]), two)
    assert (one.auc_a, one.auc_b, one.diff) == (1.0, 0.5, -0.5)
    assert math.isnan(one.se) and math.isnan(one.p) and "1 known positive" in one.reason
    # both separate perfectly but not alike: Var 0 and diff 0, p = 1; one perfect, one reversed: no test
    pos, neg = np.array([0.8, 0.9]), np.array([0.1, 0.2])
    assert cmp.delong_test(pos, neg, pos[::-1], neg).p == 1.0
    flipped = cmp.delong_test(pos, neg, neg, pos)
    assert flipped.diff == -1.0 and math.isnan(flipped.p) and "variance 0" in flipped.reason


def test_holm_adjusts_across_the_findings_tested():
    adjusted = cmp.holm([0.01, 0.04, 0.03, np.nan, 0.5])
    # 4 tested: 4 x 0.01 = 0.04; 3 x 0.03 = 0.09; 2 x 0.04 = 0.08 -> 0.09 (monotone); 1 x 0.5 = 0.5
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, np.nan, 0.5])
    np.testing.assert_allclose(cmp.holm([0.6, 0.7]), [1.0, 1.0])  # 1.2 capped at 1; max(1, 0.7)
    assert np.isnan(cmp.holm([np.nan, np.nan])).all()


# ---- pairing, unknown labels, summary ---------------------------------------------------------------------


def test_rows_are_paired_by_study_hash_not_by_row_order(tmp_path):
    a, b, (studies, sa, sb, labels, known) = _pair(tmp_path)
    order = np.random.default_rng(5).permutation(len(studies))
    shuffled = _write(tmp_path / "eval-b-shuffled", [studies[i] for i in order], sb[order], labels[order],
                      known[order])  # fmt: skip
    expected = _table(a, b)
    pd.testing.assert_frame_equal(_table(a, shuffled), expected)
    # row order would pair other studies: labels disagree, and B's scores would land on other studies
    ea, eb = cmp.read_evaluation(a), cmp.read_evaluation(shuffled)
    with pytest.raises(DataError, match="labels disagree"):
        cmp.check_same_labels(ea, eb)
    assert not np.array_equal(cmp.finding_table(ea, eb._replace(labels=ea.labels, known=ea.known))["auc_b"],
                              expected["auc_b"])  # fmt: skip


def test_unknown_labels_are_left_out(tmp_path):
    studies, sa, sb, labels, known = _data()
    known[:, 0] = 1
    known[:30, 0] = 0  # 30 unknown: scored high with a stored label 0, they would lower the AUC if counted
    labels[:30, 0], sa[:30, 0], sb[:30, 0] = 0, 0.99, 0.99
    labels_b = labels.copy()
    labels_b[:30, 0] = 1  # a label under known = 0 means nothing: not compared, not refused
    a = _write(tmp_path / "eval-a", studies, sa, labels, known)
    b = _write(tmp_path / "eval-b", studies, sb, labels_b, known)
    row = _table(a, b).iloc[0]
    keep = slice(30, None)
    y = labels[keep, 0]
    assert row.n_known == 90 and row.positives == y.sum()
    assert row.auc_a == pytest.approx(roc_auc_score(y, sa[keep, 0].astype(np.float32)), abs=1e-12)
    assert row.auc_b == pytest.approx(roc_auc_score(y, sb[keep, 0].astype(np.float32)), abs=1e-12)
    assert row.auc_a != pytest.approx(roc_auc_score(labels[:, 0], sa[:, 0].astype(np.float32)), abs=1e-3)


def test_better_and_worse_findings_after_holm(tmp_path):
    studies, sa, _, labels, known = _data(n=200)
    known[:] = 1
    sb = sa.copy()
    sb[:, 0] = labels[:, 0] * 0.5 + 0.5 * np.random.default_rng(6).random(200)  # B separates finding 0
    sb[:, 1] = np.random.default_rng(7).random(200)  # B is noise on finding 1
    labels[:, 2] = 0  # finding 2: no positive
    a = _write(tmp_path / "eval-a", studies, sa, labels, known)
    b = _write(tmp_path / "eval-b", studies, sb, labels, known)
    table = _table(a, b)
    summary = cmp.summarize(table)
    assert table.loc[0, "verdict"] == "better" and table.loc[1, "verdict"] == "worse"
    assert summary["significantly_better"] == [FINDING_IDS[0]]
    assert summary["significantly_worse"] == [FINDING_IDS[1]]
    assert (summary["compared"], summary["tested"]) == (C - 1, C - 1)
    assert (summary["b_higher"], summary["b_lower"], summary["equal"]) == (1, 1, C - 3)
    assert summary["mean_diff"] == pytest.approx(table["diff"].sum() / (C - 1))
    assert summary["no_test"] == {FINDING_IDS[2]: "no positive among the 200 known labels"}
    assert math.isnan(table.loc[2, "auc_a"]) and math.isnan(table.loc[2, "p_holm"])
    # Holm over the C - 1 tested: the smallest p times C - 1, the next times C - 2 (or the first, if larger)
    first, second = table["p"].nsmallest(2).index
    assert table.loc[first, "p_holm"] == pytest.approx((C - 1) * table.loc[first, "p"], rel=1e-12)
    expected = max((C - 1) * table.loc[first, "p"], (C - 2) * table.loc[second, "p"])
    assert table.loc[second, "p_holm"] == pytest.approx(expected, rel=1e-12)
    assert (table.loc[3:, "p"] == 1).all() and (table.loc[3:, "verdict"] == "").all()


def test_paired_bootstrap_uses_the_same_draws_for_both_models(tmp_path):
    a, b, _ = _pair(tmp_path, n=80)
    ea, eb = cmp.read_evaluation(a), cmp.read_evaluation(b)
    diff = cmp.finding_table(ea, eb)["diff"].to_numpy()
    low, high, mean_ci = cmp.bootstrap_difference(ea, eb, diff, 200)
    defined = ~np.isnan(diff)
    assert ((low <= high) | ~defined).all() and np.isnan(low[~defined]).all()
    assert mean_ci[0] < np.nanmean(diff) < mean_ci[1]
    # B vs B: every resample's difference is 0 only when both sides are weighted by the same draw
    same_low, same_high, same_mean = cmp.bootstrap_difference(eb, eb, np.zeros(C), 50)
    assert np.nanmax(np.abs(same_low)) == 0 and np.nanmax(np.abs(same_high)) == 0 and same_mean == [0, 0]
    # A and B swapped: the CIs mirror
    swapped_low, swapped_high, _ = cmp.bootstrap_difference(eb, ea, -diff, 200)
    np.testing.assert_allclose(swapped_low, -high, atol=1e-12)
    np.testing.assert_allclose(swapped_high, -low, atol=1e-12)


def test_reads_the_scores_parquet_evaluate_writes(tmp_path):
    from molre.train.evaluate import _scores_parquet

    studies, sa, _, labels, known = _data(n=10)
    folder = tmp_path / "eval"
    folder.mkdir()
    ids = {"study_hash": studies, "patient_hash": ["p"] * 10}
    (folder / "scores.parquet").write_bytes(_scores_parquet(ids, sa, labels, known))
    (folder / "summary.json").write_text(json.dumps({"manifest_sha256": MANIFEST, "split": "test"}))
    read = cmp.read_evaluation(str(folder))
    assert read.studies.tolist() == studies
    np.testing.assert_array_equal(read.scores, sa.astype(np.float32))
    np.testing.assert_array_equal(read.labels, labels)
    np.testing.assert_array_equal(read.known, known)


# ---- refusals ---------------------------------------------------------------------------------------------


REFUSALS = {  # case: what B's refusal says
    "another manifest": r"scored other data than .*eval-a \(manifest_sha256 cdcd",
    "another split": "scored other split",
    "other studies": r"1 \(study0039\) only in the latter, 1 \(study9999\) only here",
    "a study twice": r"holds 1 \(study0000\) study_hash",
    "a known label differs": f"labels disagree .* 1 studies .* study0003, finding {FINDING_IDS[5]}",
    "a known flag differs": f"labels disagree .* study0007, finding {FINDING_IDS[9]}",
}


def _changed(case: str, studies: list, labels: np.ndarray, known: np.ndarray):
    """B's summary.json keys, studies, labels and known for a refusal ``case`` (A's are the arguments)."""
    studies, labels, known, summary = list(studies), labels.copy(), known.copy(), {}
    if case == "another manifest":
        summary["manifest_sha256"] = "cd" * 32
    elif case == "another split":
        summary["split"] = "val"
    elif case == "other studies":
        studies[-1] = "study9999"
    elif case == "a study twice":
        studies[-1] = studies[0]
    elif case == "a known label differs":
        labels[3, 5] = 1 - labels[3, 5]
    else:
        known[7, 9] = 1 - known[7, 9]
    return summary, studies, labels, known


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_evaluations_that_cannot_be_paired(tmp_path, case, capsys):
    studies, sa, sb, labels, known = _data(n=40)
    known[3, 5] = 1  # the label changed by "a known label differs" is known on both sides
    a = _write(tmp_path / "eval-a", studies, sa, labels, known)
    summary, *parts = _changed(case, studies, labels, known)
    b = _write(tmp_path / "eval-b", parts[0], sb, *parts[1:], **summary)
    with pytest.raises(DataError, match=REFUSALS[case]) as refused:
        cmp.compare(a, b, str(tmp_path / "out"))
    assert refused.value.path == b  # the folder is named
    assert not (tmp_path / "out").exists()
    assert main(["compare", a, b, "--out", str(tmp_path / "out")]) == 2
    assert f"molre compare: error: {b}: " in capsys.readouterr().err


def test_refuses_bad_arguments_and_folders(tmp_path):
    a, b, _ = _pair(tmp_path, n=20)
    with pytest.raises(ConfigError, match="its summary.json would be overwritten"):
        cmp.compare(a, b, b + "/")
    with pytest.raises(ConfigError, match="two different names"):
        cmp.compare(a, b, str(tmp_path / "out"), names=("x", "x"))
    with pytest.raises(ConfigError, match="bootstrap: -1"):
        cmp.compare(a, b, str(tmp_path / "out"), bootstrap=-1)
    with pytest.raises(DataError, match="no such evaluation folder"):
        cmp.compare(str(tmp_path / "missing"), b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no summary.json: not a molre evaluate output folder"):
        cmp.compare(str(tmp_path / "empty"), b)
    (Path(a) / "scores.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a Parquet file"):
        cmp.compare(a, b)


# ---- the command ------------------------------------------------------------------------------------------


def test_cli_writes_the_comparison(tmp_path, capsys):
    a, b, (studies, sa, sb, labels, known) = _pair(tmp_path, n=80)
    out = tmp_path / "cmp"
    assert main(["compare", a, b, "--out", str(out), "--bootstrap", "100", "--names", "LoRA", "MoLRE"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("mean AUC LoRA 0.") and "(MoLRE - LoRA +" in line and line.endswith(str(out))
    table = pd.read_parquet(out / "compare.parquet")
    assert table["finding"].tolist() == list(FINDING_IDS)
    assert {"auc_a", "auc_b", "diff", "se", "p", "p_holm", "boot_ci_low", "verdict", "reason"} <= set(table)
    # the table is the DeLong test of each finding over its known labels
    keep = known[:, 4].astype(bool)
    y, s_a = labels[keep, 4], sa[keep, 4].astype(np.float32)
    assert table.loc[4, "auc_a"] == pytest.approx(roc_auc_score(y, s_a), abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["names"] == {"a": "LoRA", "b": "MoLRE"} and summary["studies"] == 80
    assert summary["a"]["checkpoint"] == "/runs/eval-a/checkpoint_000003"
    assert summary["b"]["checkpoint"] == "/runs/eval-b/checkpoint_000003"
    assert (
        summary["a"]["scores_sha256"] == hashlib.sha256((Path(a) / "scores.parquet").read_bytes()).hexdigest()
    )
    assert summary["b"]["manifest_sha256"] == MANIFEST and summary["bootstrap"]["resamples"] == 100
    assert summary["mean_diff"] == pytest.approx(table["diff"].mean())
    assert len(summary["mean_diff_ci"]) == 2 and summary["adjustment"] == "holm"
    md = (out / "compare.md").read_text()
    assert "# MoLRE vs LoRA (test, 80 studies)" in md and "| MoLRE - LoRA |" in md and "## Refused when" in md
    assert md.count("\n| ") == C + 1  # the header and one row per finding
    # the default output folder: under EVAL_B, named after A's scores
    assert main(["compare", a, b]) == 0
    default = Path(b) / f"compare-{summary['a']['scores_sha256'][:12]}"
    assert str(default) in capsys.readouterr().out and (default / "compare.md").exists()


def test_compare_reads_and_writes_s3(s3_bucket, tmp_path):
    from molre.data import storage

    a, b, _ = _pair(tmp_path, n=30)
    for local in (a, b):
        for name in ("scores.parquet", "summary.json"):
            storage.write_bytes(f"{s3_bucket}/{Path(local).name}/{name}", (Path(local) / name).read_bytes())
    result = cmp.compare(f"{s3_bucket}/eval-a", f"{s3_bucket}/eval-b/", f"{s3_bucket}/cmp")
    assert result["a"]["folder"] == f"{s3_bucket}/eval-a"
    local = cmp.compare(a, b, str(tmp_path / "cmp"))
    assert result["mean_diff"] == local["mean_diff"]
    assert storage.exists(f"{s3_bucket}/cmp/compare.parquet")
