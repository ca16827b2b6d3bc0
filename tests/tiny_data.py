"""A tiny learnable shard dataset written straight with the shard writer (no DICOM, no preprocess run).

Volumes [8, 64, 64] at 4 mm: a soft-tissue head disc; finding 0 plants a hyperdense disc
(blood, 70 HU), finding 1 a hypodense one (-30 HU, infarct-like), finding 2 an air pocket (-700 HU); the rest are always 0.

``head_ct``: the HU head volume that the ingest / preprocess tests write as DICOM or NIfTI (each suite with its own
size and shape parameters).
"""

from __future__ import annotations

import numpy as np

from molre.data import shards
from molre.findings import NUM_FINDINGS

GRID = (8, 64, 64)
SPACING = (4.0, 4.0, 4.0)
PLANTED = {0: 70, 1: -30, 2: -700}  # finding index -> HU of its blob


def head_ct(
    seed: int, shape, radii, jitter: float, jitter_scale, brain: float, blob: bool = False
) -> np.ndarray:
    """An off-centre ellipsoidal head in HU that passes ingest validation: bone shell (1100), brain (35) inside
    ``brain`` x the ``radii`` (voxels, z y x), air around, noise std 4; the centre moves by up to ``jitter`` x
    ``jitter_scale`` voxels per axis; ``blob``: a hyperdense (70 HU) sphere of radius 3 six voxels off-centre."""
    rng = np.random.default_rng(seed)
    centre = np.array([(n - 1) / 2 for n in shape]) + rng.uniform(-jitter, jitter, 3) * jitter_scale
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(
        sum(((axis - c) / radius) ** 2 for axis, c, radius in zip((zz, yy, xx), centre, radii, strict=True))
    )
    hu = np.where(r < 1.0, 1100.0, -1000.0)
    hu[r < brain] = 35.0
    hu += rng.normal(0, 4, shape)
    if blob:
        hu[((zz - centre[0]) ** 2 + (yy - centre[1] - 6) ** 2 + (xx - centre[2]) ** 2) < 9] = 70.0
    return hu.astype(np.float32)


def tiny_volume(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij")
    head = ((y - 32) ** 2 + (x - 32) ** 2) < 26**2
    vol = np.where(head, 35.0, -1000.0) + rng.normal(0, 8, GRID)
    for finding, hu in PLANTED.items():
        if labels[finding]:  # a disc of 12 px: its edges cross patches, which survives the ViT's LayerNorm
            cy, cx = rng.integers(22, 42, size=2)
            disc = ((y - cy) ** 2 + (x - cx) ** 2 < 12**2) & (z >= 2) & (z < 6)
            vol[disc] = hu + rng.normal(0, 5, disc.sum())
    return np.clip(vol, -1024, 3071).astype(np.int16)


def write_tiny_dataset(root: str, counts=None, seed: int = 0) -> str:
    counts = counts or {"train": 48, "val": 24, "test": 12}
    rng = np.random.default_rng(seed)
    rows_by_split = {}
    for split, n in counts.items():
        rows = []
        for i in range(n):
            labels = np.zeros(NUM_FINDINGS, np.uint8)
            labels[list(PLANTED)] = rng.random(len(PLANTED)) < 0.4
            known = np.ones(NUM_FINDINGS, np.uint8)
            rows.append(shards.make_row(f"{split}{i:04d}", f"p{split}{i}", split, tiny_volume(rng, labels),
                                        SPACING, labels, known))  # fmt: skip
        rows_by_split[split] = rows
    shards.write_dataset(root, rows_by_split, {"grid": list(GRID), "spacing": list(SPACING)}, "test")
    return root
