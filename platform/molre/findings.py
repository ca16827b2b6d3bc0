"""The 75-finding head CT taxonomy (paper Table 1), loaded once from ``findings.yaml``.

Everything that names a finding (Parquet label columns, metrics, leaderboards, synthetic generators) goes
through this module, so ids and their order are the same everywhere. ``FINDING_IDS[i]`` is output ``i``
of the classifier head.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

# Category -> expected size (paper Table 1); checked at import so an edit to the YAML cannot drift silently.
CATEGORY_SIZES = {
    "hemorrhage": 12,
    "vascular": 8,
    "trauma": 6,
    "mass_lesion": 9,
    "structural": 11,
    "chronic_other": 29,
}
CATEGORY_NAMES = {
    "hemorrhage": "Hemorrhage",
    "vascular": "Vascular",
    "trauma": "Trauma",
    "mass_lesion": "Mass/Lesion",
    "structural": "Structural",
    "chronic_other": "Chronic/Other",
}


@dataclass(frozen=True)
class Finding:
    index: int  # position in the classifier output and label vector
    id: str  # stable snake_case id, also the Parquet label column name
    name: str  # display name
    category: str  # one of CATEGORY_SIZES


def _load() -> tuple[Finding, ...]:
    raw = yaml.safe_load(resources.files("molre").joinpath("findings.yaml").read_text())
    if list(raw) != list(CATEGORY_SIZES):
        raise ValueError(f"findings.yaml categories {list(raw)} != {list(CATEGORY_SIZES)}")
    out: list[Finding] = []
    for category, entries in raw.items():
        if len(entries) != CATEGORY_SIZES[category]:
            raise ValueError(
                f"findings.yaml: {category} has {len(entries)} findings, expected {CATEGORY_SIZES[category]}"
            )
        for fid, name in entries.items():
            out.append(Finding(len(out), fid, name, category))
    ids = [f.id for f in out]
    if len(set(ids)) != len(ids):
        raise ValueError("findings.yaml: duplicate finding ids")
    return tuple(out)


FINDINGS: tuple[Finding, ...] = _load()
FINDING_IDS: tuple[str, ...] = tuple(f.id for f in FINDINGS)
NUM_FINDINGS = len(FINDINGS)  # 75
BY_ID: dict[str, Finding] = {f.id: f for f in FINDINGS}


def finding(fid: str) -> Finding:
    """Look a finding up by id; an unknown id is an error that lists where to look."""
    try:
        return BY_ID[fid]
    except KeyError:
        raise KeyError(f"unknown finding id {fid!r} (see molre/findings.yaml for the 75 ids)") from None


def category_of(fid: str) -> str:
    return finding(fid).category


def ids_in(category: str) -> list[str]:
    if category not in CATEGORY_SIZES:
        raise KeyError(f"unknown category {category!r}; expected one of {list(CATEGORY_SIZES)}")
    return [f.id for f in FINDINGS if f.category == category]
