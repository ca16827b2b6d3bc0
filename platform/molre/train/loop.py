"""The per-worker training loop that Ray Train runs (one process per GPU, or per CPU slot with gloo).

Per epoch: stream this worker's train shard with Repeat Factor Sampling -> window + augment on the device ->
model (bf16 autocast on GPU) -> focal loss (+ balance loss) -> AdamW step; then score this worker's part of the
validation split, gather every worker's predictions (each volume scored exactly once), compute per-finding AUC
on every rank (so all ranks report the same numbers), checkpoint, early-stop.

Speed (issue 8): the model gets its device settings from ``molre.models.runtime`` (bf16 frozen weights under bf16
autocast, regional ``torch.compile`` on GPU, TF32) and AdamW is fused on CUDA. Ray Data re-executes a dataset on
every pass over it (streaming executor start-up, read tasks, the split coordinator): seconds per dataset per
epoch whatever its size, which for a short epoch is most of it. So each worker reads its validation shard once
per run and keeps it decoded (int16, host RAM; ``train.cache_val``), and keeps its train shard's rows from its
first pass when every worker's share fits ``train.cache_train_gb`` (decided by the driver:
``dataset.keeps_train_shard``; no re-read).
The step does not wait on the device: the epoch's loss is summed on the device and read once at the end.

Train order (``epoch_batches``): a streamed epoch reads the worker's shard in the split's read order, the same
every epoch, and shuffles within a 32-row buffer. Epochs >= 1 of a kept shard are shuffled whole (rows and RFS
repeats) from (seed, epoch, rank): each epoch's batches are drawn afresh. Epoch 0 streams even then, its reads
overlapping its steps; a run resumed at epoch k reads its shard first and shuffles epoch k as an uninterrupted
run did.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from molre.config import RunConfig, build_config
from molre.data.augment import augment_batch
from molre.data.dataset import KEEP_TRAIN_SHARD, SHUFFLE_ROWS, decode_batch, rfs_batches
from molre.data.prefetch import device_batches
from molre.findings import FINDING_IDS
from molre.models import build_model, parameter_groups
from molre.models.runtime import prepare_runtime, uses_bf16
from molre.train.checkpoint import (
    FINGERPRINT_KEY,
    FROZEN_SHA256,
    TrainState,
    check_frozen,
    check_same_run,
    checkpoint_uri,
    frozen_digest,
    load_trained_state,
    read_setup,
    read_state,
    read_weights,
    save_checkpoint,
    trained_state,
)
from molre.train.loss import FocalLoss
from molre.train.metrics import per_finding_auc, summarize

METRIC = "val/mean_auc"
TRAIN_KEYS = ("hu", "labels", "known")  # the columns a training step needs on the device


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the paper's two learning rates (head/pooling 1e-3, LoRA/MoLRE 1e-4) and one for full fine-tuning.

    ``fused`` (None = when every trainable parameter is on CUDA): one kernel for the whole update instead of
    torch's default multi-tensor (foreach) path, same math. Call it after the model is on its device.
    """
    lrs = {"head": cfg.optim.lr_head, "adapter": cfg.optim.lr_adapter, "backbone": cfg.optim.lr_backbone}
    groups = [
        {"params": ps, "lr": lrs[name], "name": name} for name, ps in parameter_groups(model).items() if ps
    ]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    return torch.optim.AdamW(
        groups, weight_decay=cfg.optim.weight_decay, **({"fused": True} if fused else {})
    )


def autocast(cfg: RunConfig, device: torch.device):
    if uses_bf16(cfg.train.precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _stream_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """Streams: 0 augmentation, 1 validation, 2 the global RNG (dropout); 3 is the train order's (``rfs_batches``
    seeds numpy with the same sequence)."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


def _generator(seed: int, epoch: int, rank: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_stream_seed(seed, epoch, rank, stream))


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj):
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _maybe_inject_failure(fault: dict | None, epoch: int, step: int, rank: int) -> None:
    """Test hook: kill this worker process once at (epoch, step, rank); a marker file makes it happen once."""
    if not fault or (epoch, step, rank) != (fault["epoch"], fault["step"], fault.get("rank", 0)):
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.write_text(f"killed at epoch {epoch} step {step}\n")
        os._exit(1)


def train_one_epoch(model, core, optimizer, loss_fn, cfg, shard, setup, epoch, device, fault=None) -> dict:
    model.train()
    rank = ray.train.get_context().get_world_rank()
    gen = _generator(cfg.train.seed, epoch, rank, 0)
    # the global RNG (dropout in LoRA / MoLRE) from (seed, epoch, rank) too: a run resumed at this epoch draws
    # the masks an uninterrupted run would have, and each rank its own masks
    torch.manual_seed(_stream_seed(cfg.train.seed, epoch, rank, 2))
    # RFS copies are drawn per (seed, epoch, study): the same whichever worker holds the study
    batches = epoch_batches(
        shard, np.asarray(setup["class_factors"]), epoch, cfg.train.seed, rank, cfg.train.batch_size
    )
    join = _join(model)
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device
    trained, count, steps = 0, 0, 0
    with join:
        # decoded and (on CUDA) pinned in a thread, copied on a side stream one step ahead (molre.data.prefetch)
        for step, ((hu, labels, known), host) in enumerate(
            device_batches(batches, device, TRAIN_KEYS, decode_batch)
        ):
            _maybe_inject_failure(fault, epoch, step, rank)
            x = augment_batch(
                hu, cfg.data, gen, train=True, out_size=setup["input_size"], spacing_zyx=setup["spacing"]
            )
            with autocast(cfg, device):
                logits = model(x)
            loss = loss_fn(logits, labels, known)
            aux = core.aux_loss()
            if aux is not None and cfg.adapter.molre.balance_loss_weight > 0:
                loss = loss + cfg.adapter.molre.balance_loss_weight * aux.float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
                )
            optimizer.step()
            total += loss.detach().double() * len(hu)
            trained, steps = trained + len(hu), steps + 1
            count += len(hu) - int(
                host["top_up"].sum()
            )  # the epoch's own volumes (not the last batch's fill)
    total, trained, count = _all_reduce_sum([total.item(), trained, count], device)  # the one loss read
    return {"train/loss": total / max(trained, 1), "train/volumes": int(count), "train/steps_rank0": steps}


def epoch_batches(shard: ShardCache, class_factors, epoch: int, seed: int, rank: int, batch_size: int):
    """The epoch's training batches (``rfs_batches``). A shard that keeps its rows is shuffled whole from epoch 1
    on (read first when not yet kept: a resumed run's first epoch); epoch 0 and a streamed shard go through the
    32-row shuffle buffer, in read order. An epoch's order hangs on (seed, epoch, rank, the worker's rows) only,
    not on which pass of this process it is: a resumed run trains as an uninterrupted one."""
    whole = shard.keep and epoch > 0
    return rfs_batches(
        shard, class_factors, epoch, seed, batch_size, buffer_size=None if whole else SHUFFLE_ROWS, rank=rank
    )


def _join(model):
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.join import Join

        return Join([model])  # RFS gives workers uneven step counts; Join shadows the missing all-reduces
    return contextlib.nullcontext()


@torch.no_grad()
def score_shard(core, cfg, shard, setup, device) -> dict[str, np.ndarray]:
    """Scores of this worker's validation rows: probabilities, labels, known, mean routing weights, ids.

    ``shard`` yields decoded batches (``decode_batch``), e.g. a ``ShardCache`` with that transform.
    Runs the unwrapped model: DDP's forward syncs with the other ranks, which hold a different number of rows.
    """
    core.eval()
    out = {"scores": [], "labels": [], "known": [], "router": [], "study_hash": []}
    gen = _generator(cfg.train.seed, 0, 0, 1)
    for (hu,), batch in device_batches(shard.iter_batches(batch_size=cfg.train.batch_size), device, ("hu",)):
        x = augment_batch(hu, cfg.data, gen, train=False, out_size=setup["input_size"])
        with autocast(cfg, device):
            probs = torch.sigmoid(core(x).float())
        out["scores"].append(probs.cpu().numpy())
        out["labels"].append(batch["labels"])  # host arrays: only the scores need the device
        out["known"].append(batch["known"])
        routing = core.router_weights()
        if routing is not None:
            out["router"].append(
                (routing.float().mean(dim=1) if routing.dim() == 3 else routing.float()).cpu().numpy()
            )
        out["study_hash"].append(np.asarray(batch["study_hash"]).astype(str))
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def evaluate_all(core, cfg, shard, setup, device) -> tuple[dict, dict[str, np.ndarray]]:
    """Score the validation split across workers; every rank returns the same metrics."""
    parts = _gather(score_shard(core, cfg, shard, setup, device))
    parts = [p for p in parts if len(p["scores"])]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    if not merged:
        return {METRIC: float("nan"), "val/volumes": 0}, {}
    order = np.argsort(merged["study_hash"], kind="stable")  # worker-independent order
    merged = {k: v[order] if len(v) == len(order) else v for k, v in merged.items()}
    aucs = per_finding_auc(merged["scores"], merged["labels"], merged["known"])
    metrics = {**summarize(aucs).as_dict("val/"), "val/volumes": len(order)}
    metrics.update({f"val/auc/{fid}": float(a) for fid, a in zip(FINDING_IDS, aucs, strict=True)})
    return metrics, merged


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: ``loop_config = {"run": config dict, "setup": data facts from the driver, "fault": ...}``."""
    cfg = build_config(loop_config["run"])
    setup, fault = loop_config["setup"], loop_config.get("fault")
    torch.manual_seed(cfg.train.seed)  # every rank builds identical initial weights
    device = ray.train.torch.get_device()
    core = build_model(cfg)
    setup = {**setup, FROZEN_SHA256: frozen_digest(core)}  # as built: before the bf16 / FP8 conversions
    # bf16 frozen weights, TF32, compile (in place: core keeps its methods, e.g. aux_loss, router_weights)
    prepare_runtime(core, cfg, device)
    model = ray.train.torch.prepare_model(core)
    optimizer = make_optimizer(core, cfg)
    loss_fn = FocalLoss(cfg.loss.gamma, _alpha(cfg, setup)).to(device)
    state, best_weights, best_outputs = TrainState(), trained_state(core), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            name = checkpoint_uri(checkpoint.path, cfg.train.storage)
            state, best_weights, best_outputs = _restore(d, core, optimizer, cfg, device, setup, name)
    # a re-run of a finished run (same fingerprint: _restore refused any other) reports its result again
    if state.finished:
        ray.train.report({**state.history[-1], "epoch": state.epoch, "best_epoch": state.best_epoch,
                          "val/best_mean_auc": state.best_metric, "resumed_finished": True})  # fmt: skip
        return
    train_shard = ShardCache(ray.train.get_dataset_shard("train"), setup[KEEP_TRAIN_SHARD])
    val_shard = ShardCache(ray.train.get_dataset_shard("val"), cfg.train.cache_val, decode_batch)
    writer = _tensorboard(cfg) if ray.train.get_context().get_world_rank() == 0 else None
    for epoch in range(state.epoch + 1, cfg.train.max_epochs):
        start = time.perf_counter()
        metrics = train_one_epoch(
            model, core, optimizer, loss_fn, cfg, train_shard, setup, epoch, device, fault
        )
        trained = time.perf_counter()
        val_metrics, outputs = evaluate_all(core, cfg, val_shard, setup, device)
        metrics.update(val_metrics)
        metrics.update({"time/train_s": trained - start, "time/val_s": time.perf_counter() - trained,
                        "data/train_cached": int(train_shard.keep)})  # fmt: skip
        if state.record(epoch, _scalars(metrics), METRIC):
            best_weights, best_outputs = trained_state(core), outputs
        state.finished = state.should_stop(cfg.train.min_epochs, cfg.train.patience, cfg.train.max_epochs)
        report = {
            **metrics,
            "epoch": epoch,
            "best_epoch": state.best_epoch,
            "val/best_mean_auc": state.best_metric,
        }
        _report(report, core, optimizer, state, cfg, best_weights, best_outputs, setup, writer)
        if state.finished:
            break
    if writer is not None:
        writer.close()


class ShardCache:
    """A worker's dataset shard that is read from Ray Data once and replayed from host memory afterwards.

    With ``keep``, the first pass streams the shard (``iter_batches`` as Ray Data's) and keeps its batches, after
    ``transform``; every later pass with the same ``batch_size`` replays them in the order read (a pass with
    another batch size streams again). Without, every pass streams. ``keep`` must be the same on every worker
    (``dataset.keeps_train_shard``, decided by the driver), since a streaming split's next pass needs every worker
    to start it.
    """

    def __init__(self, shard, keep: bool, transform: Callable[[dict], dict] | None = None):
        self.shard, self.keep, self.transform = shard, bool(keep), transform
        self.batches: list[dict] | None = None  # the kept pass, once read to its end
        self.batch_size: int | None = None

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy") -> Iterator[dict]:
        if self.batches is not None and batch_size == self.batch_size:
            yield from self.batches
            return
        collect = self.keep and self.batches is None  # the first pass
        kept = []
        for batch in self.shard.iter_batches(batch_size=batch_size, batch_format=batch_format):
            if self.transform is not None:
                batch = self.transform(batch)
            if collect:  # own copies: Ray Data's arrays may be views of object-store blocks
                kept.append({k: np.array(v, copy=True) for k, v in batch.items()})
            yield batch
        if collect:  # reached only when the pass ran to its end
            self.batches, self.batch_size = kept, batch_size


def _alpha(cfg: RunConfig, setup: dict):
    if cfg.loss.alpha == "prevalence":
        return np.asarray(setup["alpha"], dtype=np.float32)
    return cfg.loss.alpha


def _scalars(metrics: dict) -> dict:
    """The metrics kept in the checkpoint's history (summary values, not the 75 per-finding AUCs)."""
    return {k: v for k, v in metrics.items() if not k.startswith("val/auc/")}


def _restore(directory, core, optimizer, cfg, device, setup: dict, name: str | None = None):
    """State, best weights and best outputs of the checkpoint at ``directory`` (``name``: its URI), after checking
    that it belongs to this run (the driver checked before building the trainer; this guards other callers)."""
    check_same_run(directory, cfg, setup.get(FINGERPRINT_KEY), name)
    if FROZEN_SHA256 in setup:  # the weights file replaced between two epochs' runs: not the same run
        check_frozen(
            setup[FROZEN_SHA256], read_setup(directory), name or str(directory), cfg.backbone.weights
        )
    state = read_state(directory)
    load_trained_state(core, read_weights(directory, "last"), directory)
    optimizer.load_state_dict(
        torch.load(Path(directory) / "optimizer.pt", map_location=device, weights_only=True)
    )
    outputs_path = Path(directory) / "val_outputs.npz"
    outputs = dict(np.load(outputs_path)) if outputs_path.exists() else None
    return state, read_weights(directory, "best"), outputs


def _report(metrics, core, optimizer, state, cfg, best_weights, best_outputs, setup, writer) -> None:
    """Rank 0 writes the checkpoint; every rank calls report (Ray Train V2 needs all of them)."""
    if writer is not None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value) and not key.startswith("val/auc/"):
                writer.add_scalar(key, value, metrics["epoch"])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(tmp, core, optimizer, state, cfg, best_weights, best_outputs, setup)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _tensorboard(cfg: RunConfig):
    from tensorboardX import SummaryWriter

    from molre.data.storage import is_s3, join

    root = cfg.train.storage if is_s3(cfg.train.storage) else os.path.abspath(cfg.train.storage)
    try:
        return SummaryWriter(join(root, cfg.train.run_name, "tensorboard"))
    except Exception:  # TensorBoard is a convenience: never fail a run over it
        return None
