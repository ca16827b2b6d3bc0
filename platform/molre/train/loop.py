"""The per-worker training loop that Ray Train runs (one process per GPU, or per CPU slot with gloo).

Per epoch: stream this worker's train shard with Repeat Factor Sampling -> window + augment on the device ->
model (bf16 autocast on GPU) -> focal loss (+ balance loss) -> AdamW step; then score this worker's part of the
validation split, gather every worker's predictions (each volume scored exactly once), compute per-finding AUC
on every rank (so all ranks report the same numbers), checkpoint, early-stop.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from molre.config import RunConfig, build_config
from molre.data.augment import augment_batch
from molre.data.dataset import rfs_batches, to_tensors
from molre.errors import WeightsError
from molre.findings import FINDING_IDS
from molre.models import build_model, parameter_groups
from molre.train.checkpoint import (
    TrainState,
    load_trainable_state,
    read_config,
    read_state,
    read_weights,
    save_checkpoint,
    trainable_state,
)
from molre.train.loss import FocalLoss
from molre.train.metrics import per_finding_auc, summarize

METRIC = "val/mean_auc"


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with the paper's two learning rates (head/pooling 1e-3, LoRA/MoLRE 1e-4) and one for full fine-tuning."""
    lrs = {"head": cfg.optim.lr_head, "adapter": cfg.optim.lr_adapter, "backbone": cfg.optim.lr_backbone}
    groups = [
        {"params": ps, "lr": lrs[name], "name": name} for name, ps in parameter_groups(model).items() if ps
    ]
    return torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)


def autocast(cfg: RunConfig, device: torch.device):
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _generator(seed: int, epoch: int, rank: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])
    )


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
    # RFS copies are drawn per (seed, epoch, study): the same whichever worker holds the study
    batches = rfs_batches(
        shard, np.asarray(setup["class_factors"]), epoch, cfg.train.seed, cfg.train.batch_size
    )
    join = _join(model)
    total, count, steps = 0.0, 0, 0
    with join:
        for step, batch in enumerate(batches):
            _maybe_inject_failure(fault, epoch, step, rank)
            hu, labels, known = to_tensors(batch, device)
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
            total, count, steps = total + loss.item() * len(hu), count + len(hu), steps + 1
    total, count = _all_reduce_sum([total, count], device)
    return {"train/loss": total / max(count, 1), "train/volumes": int(count), "train/steps_rank0": steps}


def _join(model):
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.join import Join

        return Join([model])  # RFS gives workers uneven step counts; Join shadows the missing all-reduces
    return contextlib.nullcontext()


@torch.no_grad()
def score_shard(core, cfg, shard, setup, device) -> dict[str, np.ndarray]:
    """Scores of this worker's validation rows: probabilities, labels, known, mean routing weights, ids.

    Runs the unwrapped model: DDP's forward syncs with the other ranks, which hold a different number of rows.
    """
    core.eval()
    out = {"scores": [], "labels": [], "known": [], "router": [], "study_hash": []}
    gen = _generator(cfg.train.seed, 0, 0, 1)
    for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
        hu, labels, known = to_tensors(batch, device)
        x = augment_batch(hu, cfg.data, gen, train=False, out_size=setup["input_size"])
        with autocast(cfg, device):
            probs = torch.sigmoid(core(x).float())
        out["scores"].append(probs.cpu().numpy())
        out["labels"].append(labels.cpu().numpy())
        out["known"].append(known.cpu().numpy())
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
    if cfg.train.compile:  # in place: core keeps its methods (aux_loss, router_weights), forward is compiled
        core.compile()
    model = ray.train.torch.prepare_model(core)
    optimizer = make_optimizer(core, cfg)
    loss_fn = FocalLoss(cfg.loss.gamma, _alpha(cfg, setup)).to(device)
    state, best_weights, best_outputs = TrainState(), trainable_state(core), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state, best_weights, best_outputs = _restore(d, core, optimizer, cfg, device)
    if state.finished:  # a re-run of a finished run name: report its result again instead of retraining
        ray.train.report({**state.history[-1], "epoch": state.epoch, "best_epoch": state.best_epoch,
                          "val/best_mean_auc": state.best_metric, "resumed_finished": True})  # fmt: skip
        return
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    writer = _tensorboard(cfg) if ray.train.get_context().get_world_rank() == 0 else None
    for epoch in range(state.epoch + 1, cfg.train.max_epochs):
        metrics = train_one_epoch(
            model, core, optimizer, loss_fn, cfg, train_shard, setup, epoch, device, fault
        )
        val_metrics, outputs = evaluate_all(core, cfg, val_shard, setup, device)
        metrics.update(val_metrics)
        if state.record(epoch, _scalars(metrics), METRIC):
            best_weights, best_outputs = trainable_state(core), outputs
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


def _alpha(cfg: RunConfig, setup: dict):
    if cfg.loss.alpha == "prevalence":
        return np.asarray(setup["alpha"], dtype=np.float32)
    return cfg.loss.alpha


def _scalars(metrics: dict) -> dict:
    """The metrics kept in the checkpoint's history (summary values, not the 75 per-finding AUCs)."""
    return {k: v for k, v in metrics.items() if not k.startswith("val/auc/")}


def _restore(directory, core, optimizer, cfg, device):
    saved = read_config(directory)
    if saved.backbone.preset != cfg.backbone.preset:
        raise WeightsError(
            f"run {cfg.train.run_name}: its checkpoint {directory} was trained with preset {saved.backbone.preset}, "
            f"this config asks for {cfg.backbone.preset}; use another train.run_name"
        )
    state = read_state(directory)
    load_trainable_state(core, read_weights(directory, "last"), directory)
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
