"""Patient-level train/val/test split, stratified on findings, seeded and deterministic.

Every study of a patient lands in the same split. Stratification is iterative stratification (Sechidis et al.,
2011) over patients: take the finding with the fewest positive patients still unassigned, give each of those
patients to the split that most lacks that finding (ties: the split most below its size target), repeat; patients
without positives fill the splits up to their size targets. Targets are in studies, so a patient with many
studies counts for what it weighs. Patients already placed by an earlier run (``fixed``) keep their split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from molre.errors import DataError

DEFAULT_SPLITS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate ``{split: fraction}``: non-empty, each in [0, 1], summing to 1."""
    fractions = {str(k): float(v) for k, v in fractions.items()}
    if not fractions or any(not 0.0 <= v <= 1.0 for v in fractions.values()):
        raise ValueError(f"split fractions must be in [0, 1], got {fractions}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must sum to 1, got {fractions} (sum {sum(fractions.values()):.4f})"
        )
    if any(not k.isidentifier() for k in fractions):
        raise ValueError(f"split names must be simple identifiers, got {list(fractions)}")
    return fractions


def parse_fractions(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ``{"train": 0.8, ...}`` (validated)."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"split {item!r} is not name=fraction")
        out[name.strip()] = float(value)
    return check_fractions(out)


def split_patients(
    patients: Sequence[str],
    positives: np.ndarray,
    fractions: Mapping[str, float] = DEFAULT_SPLITS,
    seed: int = 0,
    fixed: Mapping[str, str] | None = None,
) -> list[str]:
    """Split name for each study.

    ``patients[i]`` is study i's (hashed) patient id, ``positives`` [N, F] its 0/1 findings (unknown = 0).
    ``fixed`` pins patients to splits (e.g. placed by an earlier, interrupted run).
    """
    fractions = check_fractions(fractions)
    names = list(fractions)
    fixed = dict(fixed or {})
    unknown_split = {s for s in fixed.values() if s not in fractions}
    if unknown_split:
        raise ValueError(f"fixed patients use splits {sorted(unknown_split)} not in {names}")
    if not len(patients):
        return []
    positives = np.asarray(positives).astype(np.int64).reshape(len(patients), -1)

    # per patient: studies [P], positive studies per finding [P, F]
    keys = sorted(set(patients))
    index = {p: i for i, p in enumerate(keys)}
    rows = np.array([index[p] for p in patients], dtype=np.int64)
    studies = np.bincount(rows, minlength=len(keys))
    counts = np.zeros((len(keys), positives.shape[1]), dtype=np.int64)
    np.add.at(counts, rows, positives)

    frac = np.array([fractions[s] for s in names])
    want_total = frac * len(patients)  # studies still wanted per split [S]
    want = frac[:, None] * counts.sum(axis=0)[None, :]  # positive studies still wanted [S, F]
    assigned = np.full(len(keys), -1, dtype=np.int64)
    for patient, split in fixed.items():
        if patient in index:
            i = index[patient]
            assigned[i] = names.index(split)
            want_total[assigned[i]] -= studies[i]
            want[assigned[i]] -= counts[i]

    order = np.random.default_rng(seed).permutation(len(keys))

    def place(i: int, finding: int | None) -> None:
        score = want_total if finding is None else want[:, finding] + 1e-9 * want_total
        score = np.where(frac > 0, score, -np.inf)
        s = int(np.argmax(score))
        assigned[i] = s
        want_total[s] -= studies[i]
        want[s] -= counts[i]

    while True:
        free = assigned < 0
        has = (counts[free] > 0).sum(axis=0)  # unassigned patients positive for each finding [F]
        if not has.any():
            break
        finding = int(np.argmin(np.where(has > 0, has, np.iinfo(np.int64).max)))
        for i in order:
            if assigned[i] < 0 and counts[i, finding] > 0:
                place(int(i), finding)
    for i in order:
        if assigned[i] < 0:
            place(int(i), None)
    _fill_empty_splits(assigned, studies, frac, set(index[p] for p in fixed if p in index))
    return [names[assigned[r]] for r in rows]


def _fill_empty_splits(assigned: np.ndarray, studies: np.ndarray, frac: np.ndarray, pinned: set[int]) -> None:
    """Give each split with a positive fraction at least one patient when there are enough patients: move the
    smallest free patient of the most crowded split."""
    for s in np.flatnonzero(frac > 0):
        if (assigned == s).any():
            continue
        sizes = np.bincount(assigned, minlength=len(frac))
        donors = [
            i
            for i in range(len(assigned))
            if i not in pinned and sizes[assigned[i]] > 1 and frac[assigned[i]] > 0
        ]
        if not donors:
            return
        crowded = max(donors, key=lambda i: (sizes[assigned[i]] / frac[assigned[i]], -studies[i], -i))
        assigned[crowded] = s


def assert_no_patient_leak(patients: Sequence[str], splits: Sequence[str], where: str = "splits") -> None:
    """Raise ``DataError`` if any (hashed) patient has studies in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for patient, split in zip(patients, splits, strict=True):
        seen[patient].add(split)
    leaks = sorted(p for p, s in seen.items() if len(s) > 1)
    if leaks:
        raise DataError(
            where,
            f"{len(leaks)} patient(s) appear in more than one split, e.g. patient_hash {leaks[0]} in "
            f"{sorted(seen[leaks[0]])}",
        )
