"""Repeat Factor Sampling (LVIS, Gupta et al. 2019) for multi-label volumes.

    r(c) = max(1, sqrt(t / f(c)))       f(c): fraction of training volumes positive for finding c
    r(v) = max over v's positive findings of r(c)   (1 for a volume with no positive finding)

Each epoch a volume appears floor(r) times plus once more with probability r - floor(r) (stochastic rounding),
drawn from a generator seeded by (seed, epoch) so every worker and every restart sees the same epoch.
"""

from __future__ import annotations

import numpy as np


def class_repeat_factors(labels: np.ndarray, threshold: float, known: np.ndarray | None = None) -> np.ndarray:
    """``r(c)`` ``[C]`` from ``[N, C]`` 0/1 labels. Findings never positive get factor 1."""
    labels = np.asarray(labels, dtype=np.float64)
    known = np.ones_like(labels) if known is None else np.asarray(known, dtype=np.float64)
    freq = (labels * known).sum(0) / np.maximum(known.sum(0), 1.0)
    with np.errstate(divide="ignore"):
        r = np.sqrt(threshold / freq)
    return np.where(freq > 0, np.maximum(1.0, r), 1.0)


def image_repeat_factors(labels: np.ndarray, threshold: float, known: np.ndarray | None = None) -> np.ndarray:
    """``r(v)`` ``[N]``: the max of ``r(c)`` over each volume's positive (and known) findings."""
    labels = np.asarray(labels)
    known = np.ones_like(labels) if known is None else np.asarray(known)
    r_c = class_repeat_factors(labels, threshold, known)
    positive = (labels > 0) & (known > 0)
    return np.where(positive, r_c[None, :], 1.0).max(axis=1)


def epoch_indices(repeat_factors: np.ndarray, epoch: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """Indices into the training set for one epoch, with stochastic rounding of each repeat factor."""
    rng = np.random.default_rng([seed, epoch])
    r = np.asarray(repeat_factors, dtype=np.float64)
    counts = np.floor(r).astype(np.int64) + (rng.random(r.shape) < (r - np.floor(r)))
    idx = np.repeat(np.arange(r.size), counts)
    return rng.permutation(idx) if shuffle else idx
