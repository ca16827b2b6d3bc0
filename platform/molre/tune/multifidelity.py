"""Multi-fidelity sweeps: screen every point on cached backbone features, confirm the best end to end.

    spec with multi_fidelity ──> cache slice features once per backbone config (a Ray task on one device)
      ──> <name>-screen: the spec's search (grid or Optuna, ASHA) at the cached fidelity, one device per trial,
          leaderboard of its own (its AUCs are the cheap fidelity's, not the paper's protocol)
      ──> rank points by the search metric (mean over seeds) ──> the ``confirm_top`` best
      ──> <name>: those points x all seeds end to end (TorchTrainer, augmentation, the real protocol)
      ──> multi_fidelity.json: what each stage cost, in device-seconds and in wall seconds

A cached trial skips the frozen backbone's forward pass, which is nearly all of a frozen-backbone trial's
compute, so screening N points costs about one end-to-end trial's worth of backbone passes plus N small head
fits. Compute is counted two ways: summed trial run time x devices held (workers per end-to-end trial, 1 per
screen trial and per cache build; Tune's ``time_total_s``, which leaves out each trial's actor start), and each
stage's wall time (cache build, trial start-up and Tune's own work included; with one trial at a time and one
device per trial that is the device time the stage held). ``bench/multifidelity_bench.py`` compares both with
the exhaustive end-to-end grid.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import ray
import ray.tune

from molre.data import storage
from molre.errors import ConfigError
from molre.findings import FINDING_IDS
from molre.tune.space import SweepSpec, grid_points, random_point, run_config_for
from molre.tune.sweep import (
    REPORT,
    BestEpochAUCs,
    end_to_end_trainable,
    fit_experiment,
    param_metrics,
    table_from_results,
    trial_run_config,
    write_results,
)

SCREEN_SUFFIX = "-screen"
SUMMARY_FILE = "multi_fidelity.json"


# ---- one screen trial -----------------------------------------------------------------------------------------


def run_cached_trial(config: dict, spec: dict, data_uri: str, experiment_uri: str, cache_root: str) -> None:
    """Tune trial at the cached fidelity: epoch metrics via tune.report, then the best epoch's full report."""
    from molre.tune.features import cached_trial

    sweep = SweepSpec.model_validate(spec)
    cfg, point = trial_run_config(
        config, sweep, data_uri, experiment_uri, ray.tune.get_context().get_trial_id()
    )
    # on every report: ASHA may stop it (the parameter counts too: an objective of a multi-objective search)
    tag = {"fidelity": "cached", "point": json.dumps(point, default=str), **param_metrics(cfg)}
    best_aucs = BestEpochAUCs()  # every report carries the best epoch's per-finding AUCs, for the same reason
    result = cached_trial(
        cfg,
        cache_root,
        on_epoch=lambda metrics: ray.tune.report({**epoch_report(metrics, best_aucs, tag), REPORT: "epoch"}),
        augment_copies=augment_copies(sweep),
    )
    best = result.history[result.best_epoch] if result.best_epoch >= 0 else {}
    final = {f"auc/{fid}": best.get(f"val/auc/{fid}", float("nan")) for fid in FINDING_IDS}
    final.update({k: v for k, v in best.items() if k.startswith("val/") and not k.startswith("val/auc/")})
    ray.tune.report({**_numeric(final), "epochs": len(result.history), "best_epoch": result.best_epoch,
                     "val/best_mean_auc": result.best_metric, **tag, REPORT: "final"})  # fmt: skip


def epoch_report(metrics: dict, best: BestEpochAUCs, tag: dict) -> dict:
    """A screen epoch's Tune report: its numbers, the best epoch's per-finding AUCs so far, the trial's tag."""
    return {**_numeric(metrics), **best.update(metrics), **tag}


def augment_copies(spec: SweepSpec) -> int:
    return spec.multi_fidelity.augment_copies if spec.multi_fidelity is not None else 0


def _numeric(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def screen_resources(spec: SweepSpec) -> dict:
    """One device per screen trial: a GPU (or a fraction, as the spec packs trials) when the base config's
    ``scaling.use_gpu`` says so (``auto``: when the cluster has GPUs as the sweep starts)."""
    from molre.train.run import use_gpu

    res = spec.resources
    gpu = use_gpu(run_config_for(spec, {}))  # the same decision as an end-to-end trial's workers
    return {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if gpu else {})}


# ---- caches ---------------------------------------------------------------------------------------------------


def screen_points(spec: SweepSpec, samples: int = 32) -> list[dict]:
    """The points whose feature caches the screen will need: the grid, or a sample of the Optuna space."""
    if spec.search.algorithm == "grid":
        return grid_points(spec)
    rng = np.random.default_rng(0)
    return [{}] + [random_point(spec, rng) for _ in range(samples)]


def build_caches(spec: SweepSpec, data_uri: str, cache_root: str) -> dict:
    """Compute every distinct feature cache the screen needs (one Ray task each, on one device) before any trial,
    so that concurrent trials never compute the same cache twice. A cache missed here (an Optuna point outside
    the sample) is still built by its first trial. Returns ``{"keys", "built", "seconds"}``."""
    from molre.tune.features import build_feature_cache

    copies = augment_copies(spec)
    configs = cache_configs(spec, data_uri)

    def build(cfg):
        cache = build_feature_cache(cfg, cache_root, augment_copies=copies)
        return cache.computed, cache.seconds

    task = ray.remote(build).options(**_task_resources(screen_resources(spec)))
    outcomes = ray.get([task.remote(cfg) for cfg in configs.values()])
    computed = [s for c, s in outcomes if c]
    return {"keys": sorted(configs), "built": len(computed), "seconds": float(sum(computed))}


def cache_configs(spec: SweepSpec, data_uri: str) -> dict:
    """``{feature key: run config}``: one config per distinct cache the screen's points and seeds need (the seed
    makes its own cache only for a random-init backbone, drawn under ``train.seed`` as end to end)."""
    from molre.data import shards
    from molre.tune.features import feature_key

    manifest = storage.read_bytes(storage.join(data_uri, shards.MANIFEST))  # once, not once per point
    copies = augment_copies(spec)
    configs = {}
    for point in screen_points(spec):
        for seed in spec.search.seeds:
            cfg = run_config_for(spec, point, seed)
            cfg.data.uri = data_uri
            configs.setdefault(feature_key(cfg, manifest_bytes=manifest, augment_copies=copies), cfg)
    return configs


def _task_resources(resources: dict) -> dict:
    return {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0)}


# ---- the two stages -------------------------------------------------------------------------------------------


def screen_trainable(spec: SweepSpec, data_uri: str, experiment_uri: str, cache_root: str):
    """``run_cached_trial`` bound to the screen's spec, on one device per trial (``screen_resources``)."""
    return ray.tune.with_resources(
        ray.tune.with_parameters(run_cached_trial, spec=spec.model_dump(mode="json"), data_uri=data_uri,
                                 experiment_uri=experiment_uri, cache_root=cache_root),
        screen_resources(spec),
    )  # fmt: skip


def top_points(table: pd.DataFrame, metric: str, mode: str, k: int) -> list[dict]:
    """The ``k`` best points of a finished stage, each scored by its mean ``metric`` over seeds."""
    done = table[(table["status"] == "TERMINATED") & table[metric].notna()] if metric in table else table[:0]
    if done.empty:
        raise ConfigError(f"the screen finished no trial with {metric}: nothing to confirm")
    scores = done.groupby("point", sort=False)[metric].mean()
    ranked = scores.sort_values(ascending=(mode == "min"), kind="stable")
    return [json.loads(p) for p in ranked.index[:k]]


def device_seconds(table: pd.DataFrame, devices_per_trial: float) -> float:
    """Sum of the trials' wall time x the devices each held."""
    return float(table["seconds"].fillna(0).sum() * devices_per_trial)


def run_multi_fidelity(spec: SweepSpec, storage_root: str, data_uri: str, resume: bool = False):
    """Screen on cached features, then confirm the best points end to end; returns the end-to-end table."""
    mf = spec.multi_fidelity
    cache_root = mf.cache or storage_root  # the cache lies in <root>/features/<key>/ (features.cache_uri)
    screen = spec.model_copy(deep=True, update={"name": spec.name + SCREEN_SUFFIX})
    screen.resources.num_workers = 1  # a screen trial is one small fit on one device
    screen_uri = storage.join(storage_root, screen.name)

    started = time.perf_counter()
    caches = build_caches(screen, data_uri, cache_root)
    trainable = screen_trainable(screen, data_uri, screen_uri, cache_root)
    screened = fit_experiment(screen, trainable, storage_root, resume, data_uri=data_uri)
    screen_table = _with_points(table_from_results(screened, screen, data_uri), screened)
    write_results(screen_table, screen_uri, screen)
    screen_wall, started = time.perf_counter() - started, time.perf_counter()

    chosen = top_points(screen_table, spec.search.metric, spec.search.mode, mf.confirm_top)
    print(f"molre sweep {spec.name}: confirming {len(chosen)} of {screen_table['point'].nunique()} screened "
          f"points end to end: {chosen}", flush=True)  # fmt: skip
    experiment_uri = storage.join(storage_root, spec.name)
    confirmed = fit_experiment(spec, end_to_end_trainable(spec, data_uri, experiment_uri), storage_root,
                               resume, points=chosen, data_uri=data_uri)  # fmt: skip
    table = table_from_results(confirmed, spec, data_uri)
    paths = write_results(table, experiment_uri, spec)
    summary = {
        "screen": {"experiment": screen_uri, "trials": len(screen_table), "cache": caches,
                   "device_seconds": device_seconds(screen_table, 1) + caches["seconds"],
                   "wall_seconds": screen_wall},
        "confirm": {"experiment": experiment_uri, "points": chosen, "trials": len(table),
                    "device_seconds": device_seconds(table, spec.resources.num_workers),
                    "wall_seconds": time.perf_counter() - started},
    }  # fmt: skip
    for total in ("device_seconds", "wall_seconds"):
        summary[total] = summary["screen"][total] + summary["confirm"][total]
    # a resumed sweep's wall seconds are this run's only; device seconds sum every trial, resumed ones included
    summary["resumed"] = resume
    storage.write_bytes(
        storage.join(experiment_uri, SUMMARY_FILE), (json.dumps(summary, indent=1) + "\n").encode()
    )
    paths["multi_fidelity"] = storage.join(experiment_uri, SUMMARY_FILE)
    return table, paths


def _with_points(table: pd.DataFrame, results) -> pd.DataFrame:
    """The trials table plus each trial's point (JSON, as every screen report carries it), to rank by."""
    return table.assign(point=[(r.metrics or {}).get("point") for r in results])
