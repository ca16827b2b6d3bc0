"""A cached-feature trial vs the end-to-end trial it stands in for (issue 8, multi-fidelity sweeps).

Same frozen-backbone configuration (``backbone.finetune=frozen``, MoLRE on the features), same data, epochs and
batch: the end-to-end trial is a Ray Train run (``train_epoch.run_epochs``: prepare + TorchTrainer.fit on a Ray
that is already up, as in a sweep), the cached trial is ``molre.tune.features.train_on_features`` in-process on
the cache that ``build_feature_cache`` computed once (its cost is reported apart: a sweep pays it once per
backbone configuration, not per trial).

Three figures, because the ratio depends on the trial's length:

- **per trial** (``e2e_over_cached``): end-to-end trial wall / cached trial wall. The end-to-end side carries a
  fixed start-up (worker group, CUDA init, Ray Data split, epoch 0's compile and first read of the shards) that
  the in-process cached call does not have (nor Tune's own per-trial cost, which a sweep adds to both), so at
  a few short epochs this ratio is mostly that start-up.
- **per epoch** (``e2e_epoch_over_cached_epoch``): the end-to-end steady epoch (median interval between report
  stamps over epochs >= 1, validation included) over the cached trial's steady epoch (median interval between
  its ``on_epoch`` calls over epochs >= 1): the part that grows with the epoch's length (the backbone's forward
  and the augmentation the cache skips).
- **fixed start-up** (``e2e_fixed_s`` / ``cached_fixed_s``): trial wall - epochs x steady epoch, per side.

``train_volumes`` / ``val_volumes`` / ``epochs`` state the trial's length (``e2e_train_volumes_per_epoch``: after
RFS); ``bench/run.py --features-train N`` sets the train volumes, for an epoch of realistic length.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch
from harness import emit, loadavg, median
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
        ends: list[float] = []

        def stamp(_metrics: dict) -> None:
            if gpu:
                torch.cuda.synchronize(device)
            ends.append(time.perf_counter())

        start = time.perf_counter()
        cached = train_on_features(cfg, cache, device=device, on_epoch=stamp)
        cached_s = time.perf_counter() - start
        start_ray(num_cpus)
        start = time.perf_counter()
        stamps, setup = run_epochs(cfg, os.path.join(root, "stamps.jsonl"), num_cpus)
        e2e_s = time.perf_counter() - start
        e2e = epoch_throughput(stamps)
        cached_epochs, e2e_epochs = len(cached.history), len(stamps)
        # steady epoch of the cached trial: between its epoch ends (epoch 0 carries the head's set-up)
        steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        cached_epoch_s = median(steps) if steps else cached_s / max(cached_epochs, 1)
        row = {
            "case": "features",
            "preset": preset,
            "input": f"{batch_size}x{'x'.join(map(str, setup['input_size']))}",
            "device": str(device),
            "train_volumes": counts["train"],
            "val_volumes": counts["val"],
            "epochs": epochs,
            "epochs_run": e2e_epochs,
            "cached_epochs_run": cached_epochs,
            "e2e_train_volumes_per_epoch": e2e["train_volumes_per_epoch"],
            "cache_build_s": round(cache.seconds, 2),
            "cache_mib": round(sum(s.features.numel() * 4 for s in cache.splits.values()) / 2**20, 2),
            "cached_trial_s": round(cached_s, 3),
            "cached_epoch_s": round(cached_epoch_s, 4),
            "cached_fixed_s": round(cached_s - cached_epochs * cached_epoch_s, 3),
            "e2e_trial_s": round(e2e_s, 2),
            "e2e_epoch_s": e2e["epoch_s"],
            "e2e_fixed_s": round(e2e_s - e2e_epochs * e2e["epoch_s"], 2),
            **({"e2e_train_s": e2e["train_s"], "e2e_val_s": e2e["val_s"]} if "train_s" in e2e else {}),
            "e2e_over_cached": round(e2e_s / cached_s, 1),  # per trial
            "e2e_epoch_over_cached_epoch": round(e2e["epoch_s"] / cached_epoch_s, 2),  # per epoch
            "cached_best_mean_auc": round(cached.best_metric, 4),
            "loadavg": loadavg(),
            **(common or {}),
        }
        return [emit(row)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
