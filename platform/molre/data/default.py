"""The embedded default dataset: synthetic phantoms -> DICOM -> preprocess -> shards, generated once and cached.

Used when a run config leaves ``data.uri`` empty (the README's demo, tests, a first sweep). The cache key holds
every setting, so a change makes a new dataset instead of reusing a stale one; a finished dataset is marked by
its manifest (written last by preprocess), so an interrupted generation simply resumes.

Size of the default: 160 studies of 40x128x128 voxels (1.9 x 1.9 x 4 mm), preprocessed to a coarse grid of
20 x 64 x 64 at 8 x 3.75 x 3.75 mm (a 160 x 240 x 240 mm field of view), so a tiny backbone trains on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from molre.data import storage

DEFAULT = {
    "count": 160,
    "seed": 0,
    "shape": (40, 128, 128),
    "difficulty": 0.5,  # lesions ~1.15x nominal size and 0.85 of the noise: learnable by a tiny model on CPU
    "spacing": (8.0, 3.75, 3.75),
    "grid": (20, 64, 64),
    # part of the cache key: datasets built before the anti-aliasing prefilter existed are not reused
    "antialias": True,
}


def cache_root() -> Path:
    return Path(os.environ.get("MOLRE_CACHE", Path.home() / ".cache" / "molre"))


def dataset_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:12]


def ensure_default_dataset(output_uri: str | None = None, **overrides) -> str:
    """URI of the cached synthetic shard dataset, generating and preprocessing it on first use."""
    from molre.data import synth
    from molre.data.preprocess import preprocess

    settings = {**DEFAULT, **overrides}
    key = dataset_key(settings)
    raw_dir = cache_root() / f"synth-raw-{key}"
    uri = output_uri or str(cache_root() / f"synth-shards-{key}")
    if storage.exists(storage.join(uri, "manifest.json")):
        return uri
    print(f"molre: generating the synthetic dataset ({settings['count']} studies) into {raw_dir}", flush=True)
    labels = synth.generate(raw_dir, settings["count"], seed=settings["seed"], shape=settings["shape"],
                            difficulty=settings["difficulty"])  # fmt: skip
    print(f"molre: preprocessing to {uri}", flush=True)
    preprocess(raw_dir, labels, "generic", uri, spacing=tuple(settings["spacing"]), grid=tuple(settings["grid"]),
               seed=settings["seed"], salt=f"molre-synthetic-{key}",
               antialias=bool(settings["antialias"]))  # fmt: skip
    return uri
