"""A cached-feature trial vs the end-to-end trial it stands in for (issue 8, multi-fidelity sweeps).

Same frozen-backbone configuration (``backbone.finetune=frozen``, MoLRE on the features), same data, epochs and
batch: the end-to-end trial is a Ray Train run (``train_epoch.run_epochs``: prepare + TorchTrainer.fit on a Ray
that is already up, as in a sweep), the cached trial is ``molre.tune.features.train_on_features`` in-process on
the cache that ``build_feature_cache`` computed once (its cost is reported apart: a sweep pays it once per
backbone configuration, not per trial).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch
from harness import emit, loadavg
from train_epoch import epoch_throughput, run_epochs, start_ray, write_bench_dataset


def features_case(
    preset: str = "tiny-vit",
    grid=(8, 64, 64),
    spacing=(4.0, 4.0, 4.0),
    counts=None,
    epochs: int = 4,
    batch_size: int = 2,
    device: torch.device | None = None,
    num_cpus: int | None = None,
    common: dict | None = None,
) -> list[dict]:
    from molre.config import build_config
    from molre.tune.features import build_feature_cache, train_on_features

    device = device or torch.device("cpu")
    gpu = device.type == "cuda"
    counts = counts or {"train": 48, "val": 16}
    root = tempfile.mkdtemp(prefix="molre-bench-features-")
    try:
        data = write_bench_dataset(os.path.join(root, "data"), grid, spacing, counts)
        cpus = max(1, (os.cpu_count() or 1) - (1 if gpu else 0))
        cfg = build_config({
            "backbone": {"preset": preset, "finetune": "frozen"},
            "data": {"uri": data},
            "train": {"max_epochs": epochs, "min_epochs": 0, "patience": epochs, "batch_size": batch_size,
                      "seed": 0, "run_name": f"bench-features-{preset}", "storage": os.path.join(root, "runs")},
            "scaling": {"num_workers": 1, "cpus_per_worker": cpus, "use_gpu": gpu},
        })  # fmt: skip
        cache = build_feature_cache(cfg, os.path.join(root, "store"), device=device)
        start = time.perf_counter()
        cached = train_on_features(cfg, cache, device=device)
        cached_s = time.perf_counter() - start
        start_ray(num_cpus)
        start = time.perf_counter()
        stamps, setup = run_epochs(cfg, os.path.join(root, "stamps.jsonl"), num_cpus)
        e2e_s = time.perf_counter() - start
        e2e_epoch = epoch_throughput(stamps)
        cached_epochs = len(cached.history)
        row = {
            "case": "features",
            "preset": preset,
            "input": f"{batch_size}x{'x'.join(map(str, setup['input_size']))}",
            "device": str(device),
            "train_volumes": counts["train"],
            "val_volumes": counts["val"],
            "epochs": epochs,
            "cache_build_s": round(cache.seconds, 2),
            "cache_mib": round(sum(s.features.numel() * 4 for s in cache.splits.values()) / 2**20, 2),
            "cached_trial_s": round(cached_s, 3),
            "cached_epoch_s": round(cached_s / max(cached_epochs, 1), 4),
            "e2e_trial_s": round(e2e_s, 2),
            "e2e_epoch_s": e2e_epoch["epoch_s"],
            "e2e_over_cached": round(e2e_s / cached_s, 1),
            "e2e_epoch_over_cached_epoch": round(
                e2e_epoch["epoch_s"] / (cached_s / max(cached_epochs, 1)), 1
            ),
            "cached_best_mean_auc": round(cached.best_metric, 4),
            "loadavg": loadavg(),
            **(common or {}),
        }
        return [emit(row)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
