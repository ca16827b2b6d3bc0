"""The driver of one training run: check the data and the config, build a TorchTrainer, fit, return the result.

Used by ``molre train``, ``jobs/train.py`` and every sweep trial. Locally it starts a Ray for you; under
``ray job submit`` it joins the cluster it runs on. A re-run with the same ``train.run_name`` and storage
resumes from the latest checkpoint (Ray Train V2 restores the run's snapshot); a finished run is not retrained.
Resuming needs the same run: ``prepare`` compares this config and dataset with the fingerprint of the checkpoint
it would resume (``molre.train.checkpoint.run_fingerprint``) and refuses another, naming what changed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from molre.config import RunConfig, config_to_dict, load_config
from molre.data import dataset, shards, storage
from molre.errors import ModelError, MolreError
from molre.models import build_model
from molre.ray_init import existing_cluster, start_or_join
from molre.train.checkpoint import (
    FINGERPRINT_KEY,
    check_same_run,
    checkpoint_uri,
    preprocessing_facts,
    run_fingerprint,
)
from molre.train.loop import METRIC, train_loop_per_worker

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@dataclass
class TrainResult:
    metrics: dict  # last reported metrics
    best_metric: float
    checkpoint_path: str | None  # latest checkpoint (its best.safetensors holds the best epoch)
    path: str  # the run directory


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join a running cluster (``ray job submit``, RAY_ADDRESS, ``ray start``) or start a private local Ray.

    A local Ray gets at least 4 logical CPUs: a trial, its Train workers and Ray Data's read tasks each hold a
    CPU slot, and on a 2-core machine two slots would starve the data reads. It runs the dashboard, on
    127.0.0.1 only (~1.5 s more start-up): Ray Train's placement-group cleaner asks the dashboard's state API
    whether a trial's Train controller is still alive, so without it the workers' CPUs / GPUs of a trial that
    ASHA stopped (its controller killed with it) stay reserved until the sweep ends, and on a one-GPU machine
    the next trial waits for them for ever.
    """
    import ray

    if ray.is_initialized():
        return
    start_or_join(num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1")


def model_input_size(cfg: RunConfig, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """(slices, H, W) the model takes: 2D slices at the backbone's image size; 3D volumes at its depth."""
    from molre.models import get_preset

    preset = get_preset(cfg.backbone.preset)
    side = cfg.backbone.image_size or preset.image_size
    depth = cfg.data.num_slices or (grid[0] if preset.dims == 2 else preset.depth)
    return (depth, side, side)


def check_model_fits(cfg: RunConfig, input_size: tuple[int, int, int]) -> None:
    """Build the model on the meta device and push one meta batch through: catches grid mismatches up front."""
    try:
        with torch.device("meta"):
            model = build_model(cfg, load_weights=False)
            model(torch.empty(1, len(cfg.data.windows), *input_size))
    except ModelError as err:
        raise ModelError(
            f"backbone {cfg.backbone.preset} cannot take the volume grid {input_size}: {err}"
        ) from None


SHARDS_KEY = "shards"  # prepare() -> build_trainer(): the checked shards of each split (not sent to workers)
# Ray Train V2's run snapshot in the run folder (ray.train.v2._internal.constants): what a re-run restores from
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def prepare(cfg: RunConfig, verify: bool = True) -> dict:
    """Driver-side facts for the workers (grid, spacing, input size, RFS factors, focal alpha, the run's
    fingerprint); validates data, and that a checkpoint under the run name belongs to this run (``check_resume``).

    The manifest is read once and each shard checked once (footer schema; sha256 when ``verify``); the checked
    shards travel under ``setup["shards"]`` to ``build_trainer``, which takes them out before the setup goes to
    the workers."""
    if not cfg.data.uri:
        from molre.data.default import ensure_default_dataset

        cfg.data.uri = ensure_default_dataset()
    manifest, manifest_sha256 = shards.read_manifest_and_sha256(cfg.data.uri)
    grid, spacing = tuple(manifest.config["grid"]), tuple(manifest.config["spacing"])
    train_rows = sum(s.rows for s in manifest.shards_of("train"))
    keep = dataset.keeps_train_shard(
        train_rows, grid, cfg.scaling.num_workers, int(cfg.train.cache_train_gb * 2**30)
    )
    fingerprint = run_fingerprint(cfg, manifest_sha256, dataset.train_order(keep))
    check_resume(cfg, fingerprint)  # before the shard checks: a refused re-run costs no data reads
    checked = {s: dataset.checked_shards(cfg.data.uri, s, verify, manifest) for s in ("train", "val")}
    input_size = model_input_size(cfg, grid)
    check_model_fits(cfg, input_size)
    train_uris = [s.uri for s in checked["train"]]
    stats = dataset.training_statistics(cfg.data.uri, cfg.data.rfs_threshold, cfg.loss.alpha_clip, train_uris)
    return {**stats, "grid": list(grid), "spacing": list(spacing), "input_size": list(input_size),
            **preprocessing_facts(manifest.config), dataset.KEEP_TRAIN_SHARD: keep,
            FINGERPRINT_KEY: fingerprint, SHARDS_KEY: checked}  # fmt: skip


def latest_checkpoint(cfg: RunConfig) -> str | None:
    """The URI of the checkpoint a run of ``cfg`` would resume (the latest of its run folder's Ray Train
    snapshot); None when the run folder holds none."""
    import ray.train

    run_dir = storage.join(cfg.train.storage, cfg.train.run_name)
    if not storage.exists(storage.join(run_dir, RAY_SNAPSHOT)):
        return None
    fs, path = dataset.arrow_filesystem(run_dir)
    result = ray.train.Result.from_path(path, storage_filesystem=fs)
    return checkpoint_uri(result.checkpoint.path, cfg.train.storage) if result.checkpoint else None


def check_resume(cfg: RunConfig, fingerprint: dict) -> None:
    """A re-run under an existing run name resumes (or, finished, reports) that run: refuse it, naming the
    changed keys, when its config or dataset differ from the checkpoint's (``check_same_run``)."""
    latest = latest_checkpoint(cfg)
    if latest is not None:
        check_same_run(latest, cfg, fingerprint)


def use_gpu(cfg: RunConfig) -> bool:
    if cfg.scaling.use_gpu != "auto":
        return bool(cfg.scaling.use_gpu)
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def build_trainer(
    cfg: RunConfig,
    setup: dict,
    fault: dict | None = None,
    callbacks: list | None = None,
    storage_env: dict[str, str] | None = None,
):
    """The TorchTrainer of one run. ``setup``: from ``prepare`` (its checked shards are used, not re-listed).
    ``storage_env``: variables for the Train workers and the data read tasks (``storage.forwarded_env()``, when
    they may not have inherited them)."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions
    from ray.train.torch import TorchTrainer

    # Ray Train V2's controller takes one worker report per poll (every 2 s by default): an epoch can never be
    # shorter than that. 0.25 s keeps short epochs (CPU runs, small sweeps) from waiting on it; Train propagates
    # the variable to its controller; an operator's own setting wins.
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.25")

    DataContext.get_current().enable_progress_bars = (
        False  # Tune / the run report progress; keep logs readable
    )

    setup = dict(setup)
    checked = setup.pop(SHARDS_KEY, None) or {}
    env = {"env_vars": dict(storage_env)} if storage_env else None
    gpu = use_gpu(cfg)
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if gpu else {})}
    fs, path = dataset.arrow_filesystem(cfg.train.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": config_to_dict(cfg), "setup": setup, "fault": fault},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            worker_runtime_env=env,
        ),
        datasets={
            split: dataset.read_split(
                cfg.data.uri, split, verify=False, checked=checked.get(split), runtime_env=env
            )
            for split in ("train", "val")
        },
        dataset_config=dataset.ExactSplitDataConfig(
            execution_options=ExecutionOptions(
                preserve_order=True
            ),  # deterministic shard -> worker assignment
            train_rows=setup.get("train_volumes"),
        ),
    )


def train(cfg: RunConfig, fault: dict | None = None, num_cpus: int | None = None) -> TrainResult:
    """Run (or resume) one training run to its end and return its result."""
    ray = sys.modules.get("ray")
    # a Ray started elsewhere (`ray start`, RAY_ADDRESS, a test's) has workers that may lack the storage variables
    foreign = existing_cluster() is not None or (ray is not None and ray.is_initialized())
    # the bucket first: Ray's storage check (s3fs mkdir) would create a mistyped one
    storage.check_bucket(cfg.train.storage)
    ensure_ray(num_cpus)
    if not storage.is_s3(cfg.train.storage):
        cfg.train.storage = os.path.abspath(cfg.train.storage)
    setup = prepare(cfg)
    trainer = build_trainer(cfg, setup, fault, storage_env=worker_storage_env(cfg) if foreign else None)
    result = fit(trainer)
    # Ray's paths are inside the filesystem it was given: an s3:// storage's lose their scheme
    checkpoint = checkpoint_uri(result.checkpoint.path, cfg.train.storage) if result.checkpoint else None
    metrics = result.metrics or {}
    return TrainResult(metrics, float(metrics.get("val/best_mean_auc", metrics.get(METRIC, float("nan")))),
                       checkpoint, checkpoint_uri(result.path, cfg.train.storage))  # fmt: skip


def fit(trainer):
    """``trainer.fit()``; a failure raises molre's own error behind it (a shard that cannot be read ...), not only
    Ray's word that a worker died."""
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception as err:
        cause = molre_cause(err)
        if cause is None:
            raise
        raise cause from err
    return result


def worker_storage_env(cfg: RunConfig) -> dict[str, str]:
    """The storage variables to forward to workers: the AWS ones only when the run touches s3:// (data, storage,
    backbone weights), ``MOLRE_STORAGE_RETRY`` whenever it is set."""
    env = storage.forwarded_env()
    if not any(storage.is_s3(u or "") for u in (cfg.data.uri, cfg.train.storage, cfg.backbone.weights)):
        env = {k: v for k, v in env.items() if k == storage.RETRY_ENV}
    return env


def molre_cause(error: BaseException) -> MolreError | None:
    """The first of molre's own errors behind a Ray Train failure (raised in a worker, or in a Ray Data read task
    feeding it), or None."""
    todo, seen = [error], set()
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # RayTaskError: the exception the task raised
        if isinstance(cause, MolreError):
            return cause
        if isinstance(err, MolreError):
            return err
        todo += [*getattr(err, "worker_failures", {}).values(), getattr(err, "controller_failure", None), cause,
                 err.__cause__, err.__context__]  # fmt: skip
    return None


# ---- CLI ------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="run config YAML (defaults: the paper's settings on tiny-vit)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. adapter.molre.experts=4"
    )


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    print(f"run {cfg.train.run_name}: best {METRIC} = {result.best_metric:.4f}")
    print(f"checkpoint: {result.checkpoint_path}")
    return 0
