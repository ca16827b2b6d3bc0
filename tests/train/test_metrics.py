import numpy as np
from sklearn.metrics import roc_auc_score

from molre.findings import FINDING_IDS
from molre.train.metrics import per_finding_auc, summarize


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
