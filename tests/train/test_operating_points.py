"""Operating points and calibration on hand-computed cases (molre.train.operating_points)."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest

from molre.errors import ConfigError
from molre.train import operating_points as op

# one finding, 10 positives and 4 negatives; two positives and a negative tie at 0.3
POSITIVES = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.1]
NEGATIVES = [0.85, 0.3, 0.2, 0.05]


def _finding(positives=POSITIVES, negatives=NEGATIVES):
    """scores [N, 1], labels [N, 1], known [N, 1] of one finding, every label known."""
    scores = np.array(positives + negatives, dtype=np.float32)[:, None]
    labels = np.array([1] * len(positives) + [0] * len(negatives), dtype=np.uint8)[:, None]
    return scores, labels, np.ones_like(labels)


def _chosen(rule: str, scores, labels, known) -> tuple[float, str | None]:
    thresholds, reasons = op.choose_thresholds(scores, labels, known, op.parse_rule(rule), "split val")
    return float(thresholds[0]), reasons[0]


def test_the_sensitivity_threshold_is_the_highest_score_reaching_the_target_ties_flagged_together():
    data = _finding()
    # >= 0.4 flags 7 positives (0.7 < 0.9); >= 0.3 flags 9 (both tied positives): exactly 0.9
    threshold, why = _chosen("sensitivity=0.9", *data)
    assert threshold == pytest.approx(0.3) and why is None
    counts = op.confusion(*data, [threshold])
    # the negative tied at 0.3 is flagged too: FP = 0.85 and 0.3
    assert {k: v.tolist() for k, v in counts.items()} == {"tp": [9], "fp": [2], "tn": [2], "fn": [1]}
    measured = op.rates(**counts)
    assert measured["sensitivity"][0] == pytest.approx(0.9) and measured["specificity"][0] == 0.5
    assert measured["ppv"][0] == pytest.approx(9 / 11) and measured["npv"][0] == pytest.approx(2 / 3)
    # ties are not split: 8 of 10 is not reachable, the threshold giving at least 0.8 flags 9
    assert _chosen("sensitivity=0.8", *data)[0] == pytest.approx(0.3)
    assert _chosen("sensitivity=0.7", *data)[0] == pytest.approx(0.4)  # 7 of 10, exactly
    assert _chosen("sensitivity=1", *data)[0] == pytest.approx(0.1)
    # every positive above every negative: the ROC points at sensitivity 1/4, 2/4, 3/4 lie on one vertical
    # segment (roc_curve's drop_intermediate would drop them); sensitivity 0.5 is reached at 0.8, not 0.6
    assert _chosen("sensitivity=0.5", *_finding([0.9, 0.8, 0.7, 0.6], [0.5, 0.4]))[0] == pytest.approx(0.8)


def test_specificity_and_youden_rules():
    data = _finding()
    # specificity >= 0.75: at most 1 of the 4 negatives flagged; the lowest such threshold: 0.4 (0.3 flags 2)
    assert _chosen("specificity=0.75", *data)[0] == pytest.approx(0.4)
    assert _chosen("specificity=0.5", *data)[0] == pytest.approx(0.3)
    # J = TP/10 - FP/4: 0.45 at 0.4 (7 - 1), 0.40 at 0.3 (9 - 2), 0.25 at 0.1 (10 - 3)
    assert _chosen("youden", *data)[0] == pytest.approx(0.4)
    # a tie in J goes to the highest threshold: J = 0.5 at 0.8 (1 - 0) and at 0.6 (2 - 1)
    tied = _finding([0.8, 0.6], [0.7, 0.1])
    assert _chosen("youden", *tied)[0] == pytest.approx(0.8)


def test_unknown_labels_are_ignored_when_choosing_and_counting():
    scores, labels, known = _finding()
    # unknown rows that would move everything if counted: a low "positive" (sensitivity 9/11 at 0.3) and a
    # high "negative"
    scores = np.concatenate([scores, [[0.01], [0.99]]]).astype(np.float32)
    labels = np.concatenate([labels, [[1], [0]]]).astype(np.uint8)
    known = np.concatenate([known, [[0], [0]]]).astype(np.uint8)
    threshold, _ = _chosen("sensitivity=0.9", scores, labels, known)
    assert threshold == pytest.approx(0.3)
    counts = op.confusion(scores, labels, known, [threshold])
    assert {k: v.tolist() for k, v in counts.items()} == {"tp": [9], "fp": [2], "tn": [2], "fn": [1]}
    np.testing.assert_allclose(op.brier_scores(scores, labels, known), op.brier_scores(*_finding()))
    np.testing.assert_allclose(
        op.expected_calibration_error(scores, labels, known), op.expected_calibration_error(*_finding())
    )


def test_a_finding_without_both_classes_gets_no_threshold_and_says_why():
    scores = np.array(
        [[0.2, 0.2, 0.2, 0.9], [0.7, 0.7, 0.7, 0.1], [0.4, 0.4, 0.4, 0.5]], np.float32
    )  # [3, 4]
    labels = np.array([[0, 1, 1, 0], [0, 1, 0, 1], [0, 1, 1, 1]], np.uint8)
    known = np.array([[1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 0, 1]], np.uint8)
    # finding 3: the top score is a negative, so specificity 1 flags no study (roc_curve's inf cut)
    thresholds, reasons = op.choose_thresholds(
        scores, labels, known, op.parse_rule("specificity=1"), "split val"
    )
    assert np.isnan(thresholds).all()
    assert reasons == [
        "no positive among the 3 known labels of split val",
        "no negative among the 3 known labels of split val",
        "no known label in split val",
        "only flagging no study reaches specificity=1 on split val",
    ]
    counts = op.confusion(scores, labels, known, thresholds)
    assert all(np.isnan(column).all() for column in counts.values())  # no threshold: no counts, not zeros
    assert all(np.isnan(column).all() for column in op.rates(**counts).values())
    # scores ranking the negative above every positive: no threshold has J > 0
    threshold, why = _chosen("youden", *_finding([0.1, 0.2], [0.9]))
    assert math.isnan(threshold) and why == "no threshold has Youden's J > 0 on split val"


def test_rates_are_nan_where_their_denominator_is_zero():
    measured = op.rates(tp=np.array([0.0, 3.0]), fp=np.array([0.0, 1.0]), tn=np.array([5.0, 0.0]),
                        fn=np.array([0.0, 1.0]))  # fmt: skip
    assert np.isnan(measured["sensitivity"][0]) and np.isnan(measured["ppv"][0])  # no positive, none flagged
    assert measured["specificity"][0] == 1.0 and measured["npv"][0] == 1.0
    assert measured["specificity"][1] == 0.0 and measured["sensitivity"][1] == 0.75
    assert measured["ppv"][1] == 0.75 and measured["npv"][1] == 0.0


@pytest.mark.parametrize(
    ("text", "rule"),
    [("sensitivity=0.9", ("sensitivity", 0.9)), (" Specificity = 0.95 ", ("specificity", 0.95)),
     ("youden", ("youden", None)), ("sensitivity=1", ("sensitivity", 1.0))],
)  # fmt: skip
def test_rules_parse(text, rule):
    assert op.parse_rule(text) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [("sensitivity=1.5", "outside"), ("specificity=0", "outside"), ("sensitivity=-0.1", "outside"),
     ("sensitivity=nan", "outside"), ("sensitivity=high", "'high' is not a number"),
     ("ppv=0.5", "unknown rule"), ("sensitivity", "sensitivity needs a target"),
     ("youden=0.5", "youden takes no target")],
)  # fmt: skip
def test_bad_rules_are_config_errors_saying_what_to_give(text, message):
    with pytest.raises(ConfigError, match=message) as refused:
        op.parse_rule(text)
    assert "youden" in str(refused.value) and repr(text) in str(refused.value)


def test_ece_is_zero_for_calibrated_scores_and_the_gap_for_miscalibrated_ones():
    # bin 2 (0.25): 1 of 4 positive; bin 7 (0.75): 3 of 4 positive; perfectly calibrated
    calibrated = np.array([0.25] * 4 + [0.75] * 4, np.float32)[:, None]
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0], np.uint8)[:, None]
    known = np.ones_like(labels)
    assert op.expected_calibration_error(calibrated, labels, known)[0] == pytest.approx(0.0, abs=1e-7)
    # Brier: 6 studies off by 0.25, 2 by 0.75 -> (6 * 0.0625 + 2 * 0.5625) / 8
    assert op.brier_scores(calibrated, labels, known)[0] == pytest.approx(0.1875)
    # every score 0.9, no positive: ECE = |0 - 0.9|, Brier = 0.81
    sure = np.full((8, 1), 0.9, np.float32)
    assert op.expected_calibration_error(sure, np.zeros_like(labels), known)[0] == pytest.approx(0.9)
    assert op.brier_scores(sure, np.zeros_like(labels), known)[0] == pytest.approx(0.81)
    # two bins: bin 0 |1 - 0.1| + bin 9 |2 - 1.9|, over 4 studies
    two = np.array([[0.05], [0.05], [0.95], [0.95]], np.float32)
    assert op.expected_calibration_error(two, np.array([[0], [1], [1], [1]]), np.ones((4, 1)))[0] == (
        pytest.approx(0.25)
    )
    # a score of 1.0 is in the last bin [0.9, 1]: |(0 + 1) - (1.0 + 0.95)| / 2, not (|0 - 1| + |1 - 0.95|) / 2
    top = np.array([[1.0], [0.95]], np.float32)
    assert op.expected_calibration_error(top, np.array([[0], [1]]), np.ones((2, 1)))[0] == pytest.approx(
        0.475
    )
    # no known label: NaN, not 0
    assert np.isnan(op.expected_calibration_error(top, np.array([[0], [1]]), np.zeros((2, 1)))).all()
    assert np.isnan(op.brier_scores(top, np.array([[0], [1]]), np.zeros((2, 1)))).all()


def test_bootstrap_rate_cis_count_each_drawn_study_as_a_repeated_row():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((30, 3)), 1).astype(np.float32)  # ties at the thresholds
    labels = (rng.random((30, 3)) < 0.4).astype(np.uint8)
    known = (rng.random((30, 3)) < 0.8).astype(np.uint8)
    labels[:, 2] = 0  # finding 2: no positive, so no sensitivity
    thresholds = np.array([0.5, 0.3, 0.6])
    cis = op.bootstrap_rate_cis(scores, labels, known, thresholds, 40, seed=1)
    # the same resamples drawn by hand: each drawn study repeated, rates recomputed on those rows
    boot = {"sensitivity": [], "specificity": []}
    for counts in op.study_resamples(30, 40, seed=1):
        for drawn in counts.astype(int):
            rows = np.repeat(np.arange(30), drawn)
            measured = op.rates(**op.confusion(scores[rows], labels[rows], known[rows], thresholds))
            for name, values in boot.items():
                values.append(measured[name])
    for name, values in boot.items():
        defined = [0, 1] if name == "sensitivity" else [0, 1, 2]
        low, high = np.nanpercentile(np.array(values)[:, defined], [2.5, 97.5], axis=0)
        np.testing.assert_allclose(cis[name][0][defined], low)
        np.testing.assert_allclose(cis[name][1][defined], high)
    assert np.isnan(cis["sensitivity"][0][2]) and np.isnan(cis["sensitivity"][1][2])
    assert cis["sensitivity"][2][0] <= cis["sensitivity"][2][1]  # the mean's CI


# ---- CIs that re-choose the thresholds on each resample of the threshold split ---------------------------


def _split(n: int, findings: int, seed: int, decimals: int | None = None):
    """scores, labels, known [n, findings]: positives score higher on average; ``decimals`` rounds the
    scores (ties); about 1 label in 7 unknown."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, findings)) < 0.35).astype(np.uint8)
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, findings)) + 1.5 * labels - 0.5)))
    scores = (scores if decimals is None else np.round(scores, decimals)).astype(np.float32)
    return scores, labels, (rng.random((n, findings)) < 0.85).astype(np.uint8)


@pytest.mark.parametrize("rule", ["sensitivity=0.8", "specificity=0.7", "youden", "specificity=1"])
@pytest.mark.parametrize("same_split", [False, True])
def test_rechosen_rates_are_the_rule_rerun_on_the_drawn_studies_repeated(rule, same_split):
    rule = op.parse_rule(rule)
    evaluated = _split(24, 3, seed=1, decimals=1)  # ties at every threshold
    there = evaluated if same_split else _split(15, 3, seed=2, decimals=1)
    there[1][:, 2] = 0  # finding 2: no positive where the thresholds are chosen, so no threshold
    thresholds, _ = op.choose_thresholds(*there, rule)
    boot = op.bootstrap_rates(*evaluated, thresholds, 60, seed=3, rule=rule,
                              chosen_on=None if same_split else there)  # fmt: skip
    # by hand: each replicate draws the threshold split's studies (the same draws when it is the evaluated
    # split; otherwise its own, seed [3, 1]), chooses thresholds on those rows repeated, applies them to the
    # evaluated split's drawn rows repeated
    draws = op.study_resamples(24, 60, 3)
    pairs = (
        ((d, d) for d in draws) if same_split else zip(draws, op.study_resamples(15, 60, [3, 1]), strict=True)
    )
    expected = {"sensitivity": [], "specificity": []}
    for counts, counts_there in pairs:
        for drawn, drawn_there in zip(counts.astype(int), counts_there.astype(int), strict=True):
            rows, rows_there = (np.repeat(np.arange(len(d)), d) for d in (drawn, drawn_there))
            chosen, _ = op.choose_thresholds(*(m[rows_there] for m in there), rule)
            measured = op.rates(**op.confusion(*(m[rows] for m in evaluated), chosen))
            for name, values in expected.items():
                values.append(measured[name])
    for name, values in expected.items():
        np.testing.assert_array_equal(boot[name], np.array(values))
    assert np.isnan(boot["sensitivity"][:, 2]).all() and np.isnan(boot["specificity"][:, 2]).all()
    assert not np.isnan(boot["specificity"][:, :2]).all(axis=0).any()  # defined in most replicates


def test_rechosen_thresholds_on_the_whole_split_are_choose_thresholds():
    scores, labels, known = _split(200, 4, seed=4, decimals=2)
    every_study_once = np.ones((1, 200))
    for text in ("sensitivity=0.9", "specificity=0.95", "youden", "specificity=1", "sensitivity=1"):
        rule = op.parse_rule(text)
        chosen, _ = op.choose_thresholds(scores, labels, known, rule)
        again = [op.resampled_thresholds(scores[:, c], labels[:, c], known[:, c], rule, every_study_once)[0]
                 for c in range(4)]  # fmt: skip
        np.testing.assert_array_equal(again, chosen)


@pytest.mark.parametrize("rule", ["sensitivity=0.9", "specificity=0.9"])
def test_rechosen_cis_are_wider_for_a_small_threshold_split_and_alike_for_a_huge_one(rule):
    rule = op.parse_rule(rule)
    evaluated = _split(500, 1, seed=5)
    widths = {}
    for n in (30, 20_000):
        there = _split(n, 1, seed=105)
        thresholds, _ = op.choose_thresholds(*there, rule)
        fixed = op.bootstrap_rate_cis(*evaluated, thresholds, 400)
        rechosen = op.bootstrap_rate_cis(*evaluated, thresholds, 400, rule=rule, chosen_on=there)
        widths[n] = {name: (rechosen[name][1] - rechosen[name][0])[0] / (fixed[name][1] - fixed[name][0])[0]
                     for name in fixed}  # fmt: skip
    # 30 studies (a handful of positives) place a threshold loosely: CIs 3-5 times the fixed ones' width here
    assert min(widths[30].values()) > 2, widths
    # 20,000 place it tightly: the evaluated split's 500 studies make nearly all of the uncertainty (0.98-1.09)
    assert all(0.9 < ratio < 1.15 for ratio in widths[20_000].values()), widths


def test_rechosen_cis_are_seeded():
    rule = op.parse_rule("youden")
    evaluated, there = _split(300, 3, seed=7), _split(100, 3, seed=8)
    thresholds, _ = op.choose_thresholds(*there, rule)
    first, again, other = (op.bootstrap_rates(*evaluated, thresholds, 300, seed=seed, rule=rule, chosen_on=there)
                           for seed in (0, 0, 1))  # fmt: skip
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name], equal_nan=True)


def test_percentile_cis_leave_undefined_findings_and_resamples_out():
    boot = np.array([[0.1, np.nan, np.nan], [0.3, 0.5, np.nan], [0.2, 0.7, np.nan]])  # [3 resamples, 3]
    low, high, mean_ci = op.percentile_cis(boot, np.array([0.2, 0.6, np.nan]), level=0.5)
    np.testing.assert_allclose(low[:2], [0.15, 0.55])  # 25th / 75th percentiles, linear
    np.testing.assert_allclose(high[:2], [0.25, 0.65])
    assert np.isnan(low[2]) and np.isnan(high[2])
    # per-resample means over the defined findings: 0.1 (finding 1 undefined there), 0.4, 0.45
    assert mean_ci == pytest.approx([0.25, 0.425])
    assert op.percentile_cis(boot, np.full(3, np.nan))[2] is None


# ---- thresholds.json read back, and checked against the model about to score -----------------------------


def _thresholds_doc(**model) -> dict:
    """A thresholds.json as evaluate writes it (``_thresholds_file``), its records in reverse id order (the
    reader matches them by id), finding 1 without a threshold."""
    from molre.findings import FINDING_IDS

    records = {fid: {"threshold": 0.01 * (c % 90 + 1), "reason": None} for c, fid in enumerate(FINDING_IDS)}
    records[FINDING_IDS[1]] = {
        "threshold": None,
        "reason": "no positive among the 24 known labels of split val",
    }
    return {"format": op.THRESHOLDS_FORMAT, "rule": "youden", "split": "val", "checkpoint": "runs/a/ckpt",
            "precision": "fp32", **model, "thresholds": dict(reversed(records.items()))}  # fmt: skip


def _write(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_a_thresholds_file_is_read_by_finding_id_and_a_foreign_or_broken_one_is_refused(tmp_path):
    from molre.errors import DataError
    from molre.findings import FINDING_IDS

    doc = _thresholds_doc(trained_sha256="a" * 64)
    read = op.read_thresholds(_write(tmp_path / "t.json", doc))
    assert read.values[0] == 0.01 and read.values[2] == 0.03 and len(read.values) == len(FINDING_IDS)
    assert np.isnan(read.values[1]) and read.reasons[1].startswith("no positive") and read.reasons[0] is None
    assert read.sha256 == hashlib.sha256((tmp_path / "t.json").read_bytes()).hexdigest()
    assert read.applied()["thresholds_sha256"] == read.sha256 and read.applied()["rule"] == "youden"

    foreign = {**doc, "thresholds": {**doc["thresholds"], "made_up": {"threshold": 0.5}}}
    del foreign["thresholds"][FINDING_IDS[3]]
    for bad, message in (
        (foreign, f"not this molre's 75: 1 ({FINDING_IDS[3]}) missing, 1 (made_up) unknown"),
        ({**doc, "format": "molre-thresholds/9"}, "not a molre thresholds file"),
        ({**doc, "thresholds": {**doc["thresholds"], FINDING_IDS[0]: {"threshold": "0.5"}}},
         f"finding {FINDING_IDS[0]}: threshold '0.5' is neither a number nor null"),
    ):  # fmt: skip
        with pytest.raises(DataError, match=re.escape(message)) as refused:
            op.read_thresholds(_write(tmp_path / "bad.json", bad))
        assert refused.value.path == str(tmp_path / "bad.json")
    with pytest.raises(DataError, match="is a folder; give the thresholds.json file in it"):
        op.read_thresholds(str(tmp_path))
    with pytest.raises(DataError, match="no such thresholds file"):
        op.read_thresholds(str(tmp_path / "missing.json"))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(DataError, match="not a JSON file"):
        op.read_thresholds(str(tmp_path / "text.json"))


def test_thresholds_of_another_model_are_refused_and_an_older_file_is_applied_with_a_warning(
    tmp_path, caplog
):
    here = {"trained_sha256": "a" * 64, "frozen_sha256": "f" * 64}
    same = op.read_thresholds(_write(tmp_path / "same.json", _thresholds_doc(**here)))
    assert op.check_thresholds_model(same, here, "ckpt", "fp32") is True
    assert not caplog.records
    for key in op.MODEL_KEYS:  # either digest differing is another model
        other = op.read_thresholds(
            _write(tmp_path / f"{key}.json", _thresholds_doc(**{**here, key: "b" * 64}))
        )
        with pytest.raises(ConfigError, match=f"{key} bbbbbbbbbbbb... in the file vs"):
            op.check_thresholds_model(other, here, "ckpt", "fp32")
    # a checkpoint from before frozen_sha256: only the trained weights compared
    assert op.check_thresholds_model(same, {**here, "frozen_sha256": None}, "ckpt", "fp32") is True
    # a file from before trained_sha256: applied, with a warning naming both checkpoints; bf16 vs fp32: a warning
    older = op.read_thresholds(_write(tmp_path / "older.json", _thresholds_doc()))
    assert op.check_thresholds_model(older, here, "ckpt", "bf16") is False
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("record no trained_sha256" in m and "runs/a/ckpt" in m for m in warned)
    assert any("chosen on fp32 scores, applied to bf16 ones" in m for m in warned)
