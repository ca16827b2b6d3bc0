"""Patient-level stratified split: no leaks, deterministic, sizes and finding prevalence near their targets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from molre.data.split import (
    DEFAULT_SPLITS,
    assert_no_patient_leak,
    check_fractions,
    parse_fractions,
    split_patients,
)
from molre.errors import DataError


def cohort(n_patients=300, n_findings=12, seed=0):
    """1-3 studies per patient; finding f has prevalence 0.3 * 0.7**f (30 % down to ~0.6 %)."""
    rng = np.random.default_rng(seed)
    patients, rows = [], []
    for p in range(n_patients):
        for _ in range(rng.integers(1, 4)):
            patients.append(f"p{p:04d}")
            rows.append(rng.random(n_findings) < 0.3 * 0.7 ** np.arange(n_findings))
    return patients, np.array(rows, dtype=np.uint8)


def test_no_patient_in_two_splits_and_sizes_near_target():
    patients, y = cohort()
    splits = split_patients(patients, y, seed=1)
    assert_no_patient_leak(patients, splits)
    sizes = Counter(splits)
    for name, frac in DEFAULT_SPLITS.items():
        assert abs(sizes[name] / len(splits) - frac) < 0.03, sizes


def prevalence_error(y, splits, common):
    """Largest |share of a finding's positives in a split - that split's fraction| over common findings."""
    total = y.sum(axis=0)[common]
    return max(
        np.abs(y[splits == n].sum(axis=0)[common] / total - f).max() for n, f in DEFAULT_SPLITS.items()
    )


def test_stratified_prevalence_beats_random_patient_split():
    patients, y = cohort()
    splits = np.array(split_patients(patients, y, seed=1))
    common = y.sum(axis=0) >= 10
    stratified = prevalence_error(y, splits, common)
    assert stratified < 0.08
    keys = sorted(set(patients))
    random_errors = []
    for seed in range(5):
        draw = dict(zip(keys, np.random.default_rng(seed).random(len(keys)), strict=True))
        rand = np.array(["train" if draw[p] < 0.8 else "val" if draw[p] < 0.9 else "test" for p in patients])
        random_errors.append(prevalence_error(y, rand, common))
    assert stratified < np.mean(random_errors), (stratified, random_errors)
    # every finding with >= 10 positives shows up in every split
    for name in DEFAULT_SPLITS:
        assert (y[splits == name].sum(axis=0)[common] > 0).all(), name


def test_deterministic_and_seeded():
    patients, y = cohort(120)
    assert split_patients(patients, y, seed=3) == split_patients(patients, y, seed=3)
    assert split_patients(patients, y, seed=3) != split_patients(patients, y, seed=4)
    # input order does not matter
    perm = np.random.default_rng(0).permutation(len(patients))
    shuffled = split_patients([patients[i] for i in perm], y[perm], seed=3)
    original = split_patients(patients, y, seed=3)
    assert [original[i] for i in perm] == shuffled


def test_fixed_patients_keep_their_split():
    patients, y = cohort(100)
    first = split_patients(patients, y, seed=0)
    pinned = {
        p: ("test" if s == "train" else "train") for p, s in zip(patients[:20], first[:20], strict=True)
    }
    again = split_patients(patients, y, seed=0, fixed=pinned)
    for p, s in zip(patients, again, strict=True):
        if p in pinned:
            assert s == pinned[p]
    assert_no_patient_leak(patients, again)


def test_tiny_cohort_fills_every_split():
    patients = ["a", "a", "b", "c", "d", "e", "f"]
    y = np.zeros((7, 75), dtype=np.uint8)
    splits = split_patients(patients, y, seed=0)
    assert set(splits) == {"train", "val", "test"}
    assert_no_patient_leak(patients, splits)


def test_empty_cohort():
    assert split_patients([], np.zeros((0, 75))) == []


def test_leak_is_reported_by_hash():
    with pytest.raises(DataError, match=r"1 patient\(s\).*patient_hash b in \['test', 'train'\]"):
        assert_no_patient_leak(["a", "b", "b"], ["train", "train", "test"])


def test_fraction_parsing_and_validation():
    assert parse_fractions("train=0.7, val=0.15,test=0.15") == {"train": 0.7, "val": 0.15, "test": 0.15}
    with pytest.raises(ValueError, match="sum to 1"):
        check_fractions({"train": 0.9, "val": 0.2})
    with pytest.raises(ValueError, match="name=fraction"):
        parse_fractions("train:0.8")
    with pytest.raises(ValueError, match="not in"):
        split_patients(["a"], np.zeros((1, 3)), fixed={"a": "holdout"})
