"""Per-finding ROC AUC and the paper's summaries (mean +- std, counts >= 0.90 and 0.80-0.90).

A finding whose evaluated set holds one class only (or whose labels are all unknown) has no AUC: it is NaN and
reported as undefined, never counted as 0.5 and never part of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from molre.findings import FINDING_IDS


def per_finding_auc(scores: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """``[C]`` ROC AUCs from ``[N, C]`` scores and 0/1 labels; NaN where a finding is undefined."""
    # imported here, not with the module: sklearn (+ scipy) costs ~1 s per process, and every Ray Train controller
    # of a sweep trial imports this module (its report callback) without ever scoring anything
    from sklearn.metrics import roc_auc_score

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    known = np.ones_like(labels, dtype=bool) if known is None else np.asarray(known).astype(bool)
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        y, s = labels[known[:, c], c], scores[known[:, c], c]
        if y.size and 0 < y.sum() < y.size:
            out[c] = roc_auc_score(y, s)
    return out


HIGH, MODERATE = 0.90, 0.80  # paper Fig. 2 bands: AUC >= 0.90 and 0.80 <= AUC < 0.90
# compare at 12 decimals: float noise is ~1e-16 (sklearn's 4/5 is 0.7999999999999999, mean(0.85, 0.95) is
# 0.8999999999999999) and no real AUC difference is that small (4/5 - 1e-12 needs over 10^6 pairs)
BAND_DECIMALS = 12


def band_counts(aucs) -> tuple[int, int]:
    """(AUC >= 0.90, 0.80 <= AUC < 0.90) over the defined (non-NaN) AUCs, compared after rounding to 12 decimals,
    so that a value on a threshold up to float error lands in the band it belongs to."""
    a = np.asarray(aucs, dtype=np.float64)
    a = np.round(a[~np.isnan(a)], BAND_DECIMALS)
    return int((a >= HIGH).sum()), int(((a >= MODERATE) & (a < HIGH)).sum())


@dataclass
class AUCSummary:
    mean: float  # over defined findings
    std: float
    n_defined: int
    n_high: int  # AUC >= 0.90
    n_moderate: int  # 0.80 <= AUC < 0.90
    undefined: list[str]

    def as_dict(self, prefix: str = "") -> dict:
        return {
            f"{prefix}mean_auc": self.mean,
            f"{prefix}std_auc": self.std,
            f"{prefix}n_defined": self.n_defined,
            f"{prefix}n_auc_ge_090": self.n_high,
            f"{prefix}n_auc_080_090": self.n_moderate,
        }


def summarize(aucs: np.ndarray, ids=FINDING_IDS) -> AUCSummary:
    aucs = np.asarray(aucs, dtype=np.float64)
    defined = aucs[~np.isnan(aucs)]
    n_high, n_moderate = band_counts(defined)
    return AUCSummary(
        mean=float(defined.mean()) if defined.size else float("nan"),
        std=float(defined.std()) if defined.size else float("nan"),
        n_defined=int(defined.size),
        n_high=n_high,
        n_moderate=n_moderate,
        undefined=[fid for fid, a in zip(ids, aucs, strict=True) if np.isnan(a)],
    )
