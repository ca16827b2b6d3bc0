import numpy as np
from sklearn.metrics import roc_auc_score

from molre.findings import FINDING_IDS
from molre.train.metrics import band_counts, per_finding_auc, summarize


def test_aucs_equal_sklearn_and_undefined_findings_are_nan():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 75)) < 0.3).astype(np.uint8)
    scores = rng.random((60, 75)) + labels * rng.random((1, 75))
    labels[:, 4] = 0  # one class only -> undefined
    known = np.ones_like(labels)
    known[:, 7] = 0  # never annotated -> undefined
    known[:30, 9] = 0  # half annotated -> AUC over the annotated half
    aucs = per_finding_auc(scores, labels, known)
    assert np.isnan(aucs[4]) and np.isnan(aucs[7])
    assert aucs[0] == roc_auc_score(labels[:, 0], scores[:, 0])
    assert aucs[9] == roc_auc_score(labels[30:, 9], scores[30:, 9])
    summary = summarize(aucs)
    defined = aucs[~np.isnan(aucs)]
    assert summary.n_defined == 73 and summary.mean == defined.mean() and summary.std == defined.std()
    assert summary.undefined == [FINDING_IDS[4], FINDING_IDS[7]]


def test_stratified_counts():
    aucs = np.array([0.95, 0.90, 0.89, 0.80, 0.79, np.nan])
    s = summarize(aucs, ids=list("abcdef"))
    assert (s.n_high, s.n_moderate, s.n_defined, s.undefined) == (2, 2, 5, ["f"])
    assert s.as_dict("val/")["val/n_auc_ge_090"] == 2


def _exact_four_fifths() -> tuple[np.ndarray, np.ndarray]:
    """One positive above 6 of 10 negatives and tied with 4: AUC = (6 + 4 / 2) / 10 = 4/5 exactly."""
    labels = np.array([1] + [0] * 10)
    scores = np.array([4.0, 0, 3, 4, 4, 2, 2, 4, 3, 4, 2])
    return scores, labels


def test_auc_exactly_on_a_band_threshold_is_counted_in_that_band():
    scores, labels = _exact_four_fifths()
    four_fifths = roc_auc_score(labels, scores)
    assert four_fifths == 0.7999999999999999  # sklearn's trapezoid sums leave 4/5 just below 0.8
    nine_tenths = float(np.mean([0.85, 0.95]))  # e.g. a seed-averaged AUC
    assert nine_tenths == 0.8999999999999999
    assert band_counts([four_fifths, nine_tenths, 0.79, np.nan]) == (1, 1)
    s = summarize(np.array([four_fifths, nine_tenths, 0.79]), ids=list("abc"))
    assert (s.n_high, s.n_moderate) == (1, 1)
