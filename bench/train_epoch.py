"""Full Ray Train epoch throughput vs the pure model step on the same preset, batch and input size.

The run goes through the same driver path as ``molre.train.run.train`` (``ensure_ray -> prepare -> build_trainer
-> fit``), with one extra ``ray.train.UserCallback`` that records every epoch's report on the controller: its
wall time and the worker's own figures (the loop's ``train/volumes``, ``train/steps_rank0``, ``time/train_s`` and
``time/val_s``, measured on the worker). Epoch 0 (worker start-up, compile, the one read of the shards) is left
out; figures are medians over epochs >= 1.

- **train pass** (the primary figure): the epoch's train volumes / ``time/train_s``, the worker's own clock over
  its train pass: RFS batching, decoding, host->device copy, windowing + augmentation on the device, the steps and
  DDP, i.e. what every step costs beyond the bare step. It does not depend on the epoch's length, so
  ``train_over_step`` (train pass / pure step) is what the ">= 90 % of the pure step" target is judged on.
- **fixed per-epoch cost**: wall epoch - ``time/train_s`` = validation (``time/val_s``, the worker's clock) + the
  rest (checkpoint write, report and Ray Train's hand-over of it). It does not shrink with a faster step; an
  epoch of E train volumes gets E / (E / train-pass rate + fixed) volumes/s, so it is reported apart, in seconds.
- **wall epoch** (kept for reference): train volumes / the interval between two report stamps on the controller.
  The controller takes one report per poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: Ray's default 2 s; molre's
  ``build_trainer`` sets 0.25 s unless the variable is set), so each stamp is up to one poll late and an interval
  is +- one poll; an epoch shorter than the poll lasts the poll. ``fast_poll_s`` adds a run with another poll
  interval; ``controller_poll_s`` in each row says which one a run had. At the bench's epoch lengths (tens to a
  few hundred volumes) the wall figure is mostly the fixed cost, which is why it is not the judged one.

The pure step is the worker loop's step alone (``model_step.make_step``: forward, focal loss, backward, clip,
AdamW) on a resident random batch of the same shape, with the loop's device settings (bf16 frozen weights and
regional compile on a GPU, per ``train.precision`` / ``train.compile``), in this process with all of its
threads; "step + augment" adds ``augment_batch`` from int16 HU (the on-device part the train pass also pays).
Ratios are volumes/s over pure-step volumes/s for the machine as a whole (with 2 workers each worker gets half of
the cores). The loop reads the validation shard once per run and keeps the train shard's rows after epoch 0 when
they fit ``train.cache_train_gb`` (``molre.train.loop.ShardCache``), so epochs >= 1 re-read nothing from storage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import emit, loadavg, median, time_steps
from model_step import StepShape, Variant, make_step, molre_model, uses_bf16

try:
    from ray.train import UserCallback
except ImportError:  # pragma: no cover - Ray is a dependency of molre.train
    UserCallback = object


class EpochStamps(UserCallback):
    """Appends ``{"t", "epoch", "volumes", ...}`` per report to a JSON-lines file (runs on the Train controller)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0] if metrics else {}  # rank 0's report (volumes are summed over the ranks)
        train_s, val_s = first.get("time/train_s"), first.get("time/val_s")
        row = {"t": time.time(), "epoch": first.get("epoch"), "volumes": first.get("train/volumes"),
               "steps": first.get("train/steps_rank0"), "train_s": train_s, "val_s": val_s,
               "worker_s": (train_s or 0.0) + (val_s or 0.0), "cached": first.get("data/train_cached")}  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def write_bench_dataset(root: str, grid=(8, 64, 64), spacing=(4.0, 4.0, 4.0), counts=None, seed=0) -> str:
    """Shards of random head-like int16 volumes with ~10% positive labels (throughput only; nothing to learn)."""
    from molre.data import shards
    from molre.findings import NUM_FINDINGS

    counts = counts or {"train": 48, "val": 8}
    rng = np.random.default_rng(seed)
    d, h, w = grid
    yy, xx = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    head = (yy**2 + xx**2) < (0.4 * min(h, w)) ** 2
    rows_by_split = {}
    for split, n in counts.items():
        rows = []
        for i in range(n):
            vol = np.where(head, 35.0, -1000.0)[None] + rng.normal(0, 10, (d, h, w))
            labels = (rng.random(NUM_FINDINGS) < 0.1).astype(np.uint8)
            rows.append(shards.make_row(f"{split}{i:05d}", f"p{split}{i}", split, vol.astype(np.int16), spacing,
                                        labels, np.ones(NUM_FINDINGS, np.uint8)))  # fmt: skip
        rows_by_split[split] = rows
    shards.write_dataset(root, rows_by_split, {"grid": list(grid), "spacing": list(spacing)}, "bench")
    return root


def start_ray(num_cpus: int | None = None) -> None:
    """``ensure_ray``; a local Ray started here is ensure_ray's, minus the worker logs on the driver."""
    import ray

    from molre.train.run import ensure_ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        ray.init(
            num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False
        )
    ensure_ray(num_cpus)


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def run_epochs(
    cfg, stamps_path: str, num_cpus: int | None = None, poll_s: float | None = None
) -> tuple[list[dict], dict]:
    """Fit ``cfg`` like ``molre.train.run.train`` does, plus the epoch stamps; returns (stamps, setup).

    ``poll_s``: the Train controller's poll interval for this fit (None: Ray's default or the environment's).
    """
    import sys

    from ray import cloudpickle

    from molre.train.run import build_trainer, prepare

    start_ray(num_cpus)
    # the controller process cannot import bench/ modules: ship EpochStamps by value
    cloudpickle.register_pickle_by_value(sys.modules[EpochStamps.__module__])
    cfg.train.storage = os.path.abspath(cfg.train.storage)
    setup = prepare(cfg)
    before = os.environ.get(POLL_ENV)
    if poll_s is not None:
        os.environ[POLL_ENV] = str(poll_s)
    try:
        result = build_trainer(cfg, setup, callbacks=[EpochStamps(stamps_path)]).fit()
    finally:
        if poll_s is not None and before is None:
            del os.environ[POLL_ENV]
        elif poll_s is not None:
            os.environ[POLL_ENV] = before
    if result.error:
        raise result.error
    return [json.loads(line) for line in Path(stamps_path).read_text().splitlines()], setup


def epoch_throughput(stamps: list[dict]) -> dict:
    """Steady-state epoch figures from the report stamps (epoch 0 excluded), medians over epochs >= 1.

    ``train_volumes_per_s``: the worker's train pass (volumes / ``time/train_s``); ``epoch_fixed_s``: wall epoch -
    ``time/train_s`` (``val_s`` + ``epoch_rest_s``); ``epoch_volumes_per_s``: volumes / wall interval.
    """
    stamps = sorted(stamps, key=lambda s: s["epoch"])
    steady = [(b["t"] - a["t"], b) for a, b in zip(stamps, stamps[1:], strict=False)]
    if not steady:
        raise RuntimeError("need at least 2 epochs to time a steady-state epoch")
    rates = [s["volumes"] / dt for dt, s in steady]
    volumes = median(s["volumes"] for _, s in steady)
    worker_s = [s.get("worker_s") or float("nan") for _, s in steady]
    out = {
        "epoch_volumes_per_s": round(median(rates), 3),
        "epoch_volumes_per_s_max": round(max(rates), 3),
        "epoch_s": round(median(dt for dt, _ in steady), 3),
        "worker_epoch_s": round(median(worker_s), 3),  # the worker's train pass + validation
        "worker_volumes_per_s": round(volumes / median(worker_s), 3),
        "train_cached": all(bool(s.get("cached")) for _, s in steady),
        "train_volumes_per_epoch": int(volumes),
        "epochs_timed": len(steady),
    }
    if all(s.get("train_s") for _, s in steady):  # the worker's own clock (older loops: not reported)
        out.update({
            "train_s": round(median(s["train_s"] for _, s in steady), 3),
            "train_volumes_per_s": round(median(s["volumes"] / s["train_s"] for _, s in steady), 3),
            "val_s": round(median(s.get("val_s") or 0.0 for _, s in steady), 3),
            "epoch_fixed_s": round(median(dt - s["train_s"] for dt, s in steady), 3),
            "epoch_rest_s": round(median(dt - s["train_s"] - (s.get("val_s") or 0.0) for dt, s in steady), 3),
        })  # fmt: skip
        if all(s.get("steps") for _, s in steady):
            out["train_steps_per_epoch"] = int(median(s["steps"] for _, s in steady))
    return out


def pure_step(cfg, input_size, batch_size: int, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """volumes/s of the bare step and of step + on-device augmentation, for ``cfg``'s model at ``input_size``."""
    from molre.data.augment import augment_batch
    from molre.models.runtime import compile_mode
    from molre.train.loss import FocalLoss

    depth, side, _ = input_size
    shape = StepShape(cfg.backbone.preset, batch_size, depth, side)
    torch.manual_seed(0)
    mode = compile_mode(cfg.train.compile, device)  # as the workers run it
    model, opt = molre_model(cfg, device, compile="regional" if mode == "regional" else "off")
    mode = {"off": "eager", "model": "compiled"}.get(mode, mode)  # make_step compiles the whole model itself
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, depth, side, side, generator=g).to(device)
    labels = (torch.rand(batch_size, 75, generator=g) < 0.1).float().to(device)
    batch = (x, labels, torch.ones_like(labels))
    variant = Variant(f"molre/{mode}", "molre", mode, model, opt, uses_bf16(cfg, device))
    step = make_step(variant, batch, FocalLoss(2.0, 0.25), device)
    hu = torch.randint(-1000, 1500, (batch_size, *input_size), generator=g).to(torch.int16).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step_with_augment():
        batch[0].copy_(augment_batch(hu, cfg.data, gen, train=True, out_size=input_size))
        return step()

    for _ in range(warmup + (0 if mode == "eager" else 2)):
        step(), step_with_augment()
    bare, augmented = [], []
    for _ in range(3):  # interleaved rounds
        bare += time_steps(step, repeats, device)
        augmented += time_steps(step_with_augment, repeats, device)
    return {
        "step_volumes_per_s": round(batch_size / median(bare), 3),
        "step_augment_volumes_per_s": round(batch_size / median(augmented), 3),
        "step_ms": round(median(bare) * 1e3, 2),
        "step_ms_min": round(min(bare) * 1e3, 2),
        "step_mode": mode,
        "shape": shape.label(),
    }


def train_epoch_case(
    preset: str = "tiny-vit",
    grid=(8, 64, 64),
    spacing=(4.0, 4.0, 4.0),
    counts=None,
    batch_size: int = 2,
    workers=(1, 2),
    epochs: int = 4,
    device: torch.device | None = None,
    repeats: int = 5,
    num_cpus: int | None = None,
    common: dict | None = None,
    fast_poll_s: float | None = None,
) -> list[dict]:
    """One JSON row per worker count (and one more for ``workers[0]`` with the controller polled every
    ``fast_poll_s``): the worker's train pass and the wall epoch (volumes/s) and the fixed per-epoch cost (s) vs
    the pure step's volumes/s, measured right after the run, and their ratios."""
    from molre.config import build_config

    common = common or {}
    device = device or torch.device("cpu")
    threads = torch.get_num_threads()
    gpu = device.type == "cuda"
    counts = counts or {"train": 48, "val": 8}
    root = tempfile.mkdtemp(prefix="molre-bench-epoch-")
    rows = []
    try:
        data = write_bench_dataset(os.path.join(root, "data"), grid, spacing, counts)
        runs = [(n, None) for n in workers] + ([(workers[0], fast_poll_s)] if fast_poll_s else [])
        for n, poll in runs:
            cpus = max(1, (os.cpu_count() or 1) // n) if not gpu else max(1, (os.cpu_count() or 1) // n - 1)
            cfg = build_config({
                "backbone": {"preset": preset},
                "data": {"uri": data},
                "train": {"max_epochs": epochs, "min_epochs": 0, "batch_size": batch_size, "seed": 0,
                          "run_name": f"bench-epoch-{preset}-{n}w-{poll}", "storage": os.path.join(root, "runs")},
                "scaling": {"num_workers": n, "cpus_per_worker": cpus, "use_gpu": gpu},
            })  # fmt: skip
            stamps_path = os.path.join(root, f"stamps-{n}-{poll}.jsonl")
            t0 = time.perf_counter()
            stamps, setup = run_epochs(cfg, stamps_path, num_cpus, poll)
            wall = time.perf_counter() - t0
            epoch = epoch_throughput(stamps)
            # the same model, batch and input size as the workers run, right after (load drifts on shared hosts)
            ref = pure_step(cfg, tuple(setup["input_size"]), batch_size, device, repeats)
            row = {
                "case": "train_epoch",
                "preset": preset,
                "grid": list(grid),
                "input": ref["shape"],
                "device": str(device),
                "workers": n,
                "cpus_per_worker": cpus,
                "controller_poll_s": float(poll or os.environ.get(POLL_ENV, 2.0)),
                "batch_per_worker": batch_size,
                **epoch,
                "run_wall_s": round(wall, 1),
                "val_volumes": counts["val"],
                **ref,
                "train_volumes_stored": counts["train"],  # before RFS (the epoch: train_volumes_per_epoch)
                "epoch_over_step": round(epoch["epoch_volumes_per_s"] / ref["step_volumes_per_s"], 3),
                "epoch_over_step_augment": round(
                    epoch["epoch_volumes_per_s"] / ref["step_augment_volumes_per_s"], 3
                ),
                "worker_over_step_augment": round(
                    epoch["worker_volumes_per_s"] / ref["step_augment_volumes_per_s"], 3
                ),
                **_train_ratios(epoch, ref),
                "step_threads": threads,
                "loadavg": loadavg(),
                **common,
            }
            rows.append(emit(row))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _train_ratios(epoch: dict, ref: dict) -> dict:
    """The worker's train pass over the pure step (and over step + augment): the judged epoch figure."""
    if "train_volumes_per_s" not in epoch:
        return {}
    rate = epoch["train_volumes_per_s"]
    return {"train_over_step": round(rate / ref["step_volumes_per_s"], 3),
            "train_over_step_augment": round(rate / ref["step_augment_volumes_per_s"], 3)}  # fmt: skip
