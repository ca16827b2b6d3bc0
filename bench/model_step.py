"""The model step: forward + backward + AdamW step of the molre classifier vs a hand-written timm + peft peer.

One step = ``zero_grad -> forward (bf16 autocast on GPU, fp32 on CPU) -> focal loss -> backward -> clip grad norm
1.0 -> AdamW step``, the worker loop's step without data and augmentation. Input ``[B, 3, S, H, W]``.

- molre: ``molre.models.build_model`` of a run config (LoRA r=8 alpha=16 in the attention linears + MoLRE K=6
  r=8 on the slice features, attention pooling, linear head) with the worker loop's device settings
  (``molre.models.runtime.prepare_runtime``: frozen weights stored in bf16 under bf16 autocast, TF32 on CUDA) and
  optimizer (``molre.train.loop.make_optimizer``: fused AdamW on CUDA).
- peer: the same timm architecture with peft's LoRA (``inject_adapter_in_model``, r=8, alpha=16) on the attention
  linears, then attention pooling + linear head written out here (no MoLRE; no molre code in its forward).
  ``target_modules`` are the suffixes ``attn.qkv`` / ``attn.proj``: peft matches a bare ``"proj"`` against
  *every* module named ``proj``, which in timm's ViT includes the patch-embedding Conv2d ``patch_embed.proj``.

Modes, for both sides: ``eager``; ``compiled`` = ``torch.compile`` of the whole model; ``regional`` = each
transformer block compiled in place (``molre.models.runtime.compile_regions``; what ``train.compile=auto`` runs on
a GPU). Ablations (``ablations=True``, eager, molre only) switch one fast path off to measure what it gives:
``molre-fp32-frozen`` (frozen weights kept fp32 and re-cast by autocast every step; only under bf16) and
``molre-foreach-adamw`` / ``molre-fused-adamw`` (the other AdamW implementation than the device's default).
``fp8=True`` adds ``molre-fp8`` in every mode: molre with ``train.frozen_matmul=fp8`` (the frozen linears' products
on e4m3 operands, ``molre.models.fp8``), a fast path that changes the numbers, so it is a variant of its own.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward + backward (the
optimizer's elementwise work is not counted); achieved FLOP/s = counted FLOPs per step / median step time.
Variants are timed in interleaved rounds in one process, so a change in the machine's load hits all of them alike.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from harness import PeakMemory, emit, loadavg, median, resident_bytes, time_steps
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

NUM_CLASSES = 75
PEER_TARGETS = ["attn.qkv", "attn.proj"]
# Regionally compiled models of one architecture share their block's code object, and Dynamo keeps at most
# recompile_limit (8) graphs per code object before running it eager: one process here compiles the blocks of up
# to 7 models (molre, peer, LoRA, blocks by slice / token; two ViT presets), so raise it.
torch._dynamo.config.recompile_limit = 64


@dataclass(frozen=True)
class StepShape:
    preset: str
    volumes: int  # B
    slices: int  # S
    image_size: int | None = None  # slice side; None = the preset's native size

    def side(self) -> int:
        from molre.models import get_preset

        return self.image_size or get_preset(self.preset).image_size

    def label(self) -> str:
        return f"{self.volumes}x{self.slices}x{self.side()}^2"


@dataclass
class Variant:
    name: str  # e.g. "molre/eager"
    impl: str  # molre | peer | lora | molre-blocks | ...
    mode: str  # eager | compiled | regional
    model: nn.Module  # for regional: compiled in place
    optimizer: torch.optim.Optimizer
    bf16: bool = False  # bf16 autocast
    flop_model: nn.Module | None = None  # an eager twin to count FLOPs on (default: model)
    compile_kwargs: dict = field(default_factory=dict)  # torch.compile options (tests: backend="aot_eager")
    step: object = None
    flops: int = 0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    memory: dict = field(default_factory=dict)


def run_config(
    shape: StepShape, kind: str = "molre", placement: str = "features", finetune: str | None = None,
    route_by: str = "slice", precision: str = "auto", frozen_matmul: str = "auto",
):  # fmt: skip
    from molre.config import build_config

    return build_config({
        "backbone": {"preset": shape.preset, "image_size": shape.image_size, "finetune": finetune},
        "adapter": {"kind": kind, "molre": {"placement": placement, "route_by": route_by}},
        "data": {"num_slices": shape.slices},
        "train": {"precision": precision, "frozen_matmul": frozen_matmul},
    })  # fmt: skip


def molre_model(
    cfg, device: torch.device, compile: str = "off", cast_frozen: bool = True, fused: bool | None = None,
    **compile_kwargs,
):  # fmt: skip
    """The molre classifier of ``cfg`` on ``device`` with the worker loop's device settings and optimizer.

    ``compile="regional"`` compiles its blocks in place; ``cast_frozen`` / ``fused`` are the ablation switches.
    """
    from molre.models import build_model
    from molre.models.runtime import prepare_runtime
    from molre.train.loop import make_optimizer

    model = build_model(cfg).to(device)
    prepare_runtime(model, cfg, device, compile=compile, cast_frozen=cast_frozen, **compile_kwargs)
    return model, make_optimizer(model, cfg, fused=fused)


def uses_bf16(cfg, device: torch.device) -> bool:
    from molre.models.runtime import uses_bf16 as _uses_bf16

    return _uses_bf16(cfg.train.precision, device)


class PeerClassifier(nn.Module):
    """timm backbone + peft LoRA -> [B*S, d] -> attention pooling over slices -> linear, written by hand."""

    def __init__(self, preset_name: str, image_size: int, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        from molre.models import get_preset

        preset = get_preset(preset_name)
        net = preset.make(preset, image_size, 0)  # the preset's timm.create_model call, random init
        width = preset.project_to or net.num_features
        self.net = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEER_TARGETS), net
        )  # freezes everything but lora_A / lora_B
        self.proj = (
            nn.Linear(net.num_features, width, bias=False).requires_grad_(False)
            if preset.project_to
            else None
        )
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, s, h, w = x.shape
        feats = self.net(x.transpose(1, 2).reshape(b * s, c, h, w))  # [B*S, d]
        if self.proj is not None:
            feats = self.proj(feats)
        feats = feats.reshape(b, s, -1)
        alpha = torch.softmax(feats @ self.query / math.sqrt(feats.shape[-1]), dim=-1)  # [B, S]
        return self.head(torch.einsum("bs,bsd->bd", alpha, feats))

    def optimizer(self) -> torch.optim.AdamW:
        head = [self.query, *self.head.parameters()]
        lora = [p for n, p in self.net.named_parameters() if "lora_" in n and p.requires_grad]
        return torch.optim.AdamW(
            [{"params": head, "lr": 1e-3}, {"params": lora, "lr": 1e-4}], weight_decay=0.01
        )


def peer_model(shape: StepShape, device: torch.device, regional: bool = False, **compile_kwargs):
    """The peer and its AdamW; ``regional``: its attention blocks compiled in place, as molre's."""
    from molre.models.runtime import compile_regions

    model = PeerClassifier(shape.preset, shape.side()).to(device)
    if regional:
        compile_regions(model.net, PEER_TARGETS, **compile_kwargs)
    return model, model.optimizer()


def make_batch(shape: StepShape, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = shape.side()
    x = torch.rand(shape.volumes, 3, shape.slices, side, side, generator=g)
    labels = (torch.rand(shape.volumes, NUM_CLASSES, generator=g) < 0.1).float()
    known = torch.ones_like(labels)
    return x.to(device), labels.to(device), known.to(device)


def _autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(variant: Variant, batch, loss_fn, device: torch.device):
    x, labels, known = batch
    forward = variant.model
    if variant.mode == "compiled":
        forward = torch.compile(variant.model, **variant.compile_kwargs)
    params = [p for p in variant.model.parameters() if p.requires_grad]
    optimizer = variant.optimizer

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, variant.bf16):
            logits = forward(x)
        loss = loss_fn(logits.float(), labels, known)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    return step


def count_flops(model: nn.Module, batch, loss_fn, device: torch.device, bf16: bool = False) -> int:
    """FLOPs of one eager forward + backward, counted op by op (matmul, conv, attention)."""
    x, labels, known = batch
    with FlopCounterMode(display=False) as counter:
        with _autocast(device, bf16):
            logits = model(x)
        loss_fn(logits.float(), labels, known).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure(
    variants: list[Variant], batch, device: torch.device, rounds: int, repeats: int, warmup: int
) -> None:
    """Fill each variant's flops, step times (``rounds`` x ``repeats``, interleaved) and peak memory."""
    from molre.train.loss import FocalLoss

    loss_fn = FocalLoss(2.0, 0.25)
    flops_of: dict[int, int] = {}
    for v in variants:  # FLOPs once per eager model (compile does not change the math)
        counted = v.flop_model or v.model
        if id(counted) not in flops_of:
            flops_of[id(counted)] = count_flops(counted, batch, loss_fn, device, v.bf16)
        v.flops = flops_of[id(counted)]
        v.step = make_step(v, batch, loss_fn, device)
        for _ in range(warmup + (0 if v.mode == "eager" else 2)):
            v.step()
    for r in range(rounds):
        for v in variants:
            if r == 0:
                v.optimizer.zero_grad(set_to_none=True)
                with PeakMemory(device) as pm:
                    v.times += time_steps(v.step, repeats, device, v.cpu_times)
                resident = resident_bytes(v.model, v.optimizer, *batch)
                v.memory = {"peak_bytes": resident + pm.transient, "resident_bytes": resident,
                            "transient_bytes": pm.transient, "method": pm.method}  # fmt: skip
            else:
                v.times += time_steps(v.step, repeats, device, v.cpu_times)


def variant_row(case: str, v: Variant, shape: StepShape, device: torch.device, common: dict) -> dict:
    step_s = median(v.times)
    slices = shape.volumes * shape.slices
    return {
        "case": case,
        "preset": shape.preset,
        "input": shape.label(),
        "impl": v.impl,
        "mode": v.mode,
        "device": str(device),
        "slices_per_s": round(slices / step_s, 2),
        "volumes_per_s": round(shape.volumes / step_s, 3),
        "step_ms": round(step_s * 1e3, 2),
        "step_ms_min": round(min(v.times) * 1e3, 2),
        "cpu_ms_per_step": round(median(v.cpu_times) * 1e3, 2),
        "threads": torch.get_num_threads(),
        "steps_timed": len(v.times),
        "gflop_per_slice_step": round(v.flops / slices / 1e9, 4),
        "achieved_gflops": round(v.flops / step_s / 1e9, 3),
        "achieved_gflops_best": round(v.flops / min(v.times) / 1e9, 3),
        "peak_mem_mib": round(v.memory["peak_bytes"] / 2**20, 1),
        "mem_method": v.memory["method"],
        "trainable_params": sum(p.numel() for p in v.model.parameters() if p.requires_grad),
        "loadavg": loadavg(),
        **common,
    }


def _ratios(summary: dict, rows: list[dict], num: tuple, den: tuple, key: str) -> None:
    """``summary[key]`` = throughput of variant ``num`` over ``den`` ((impl, mode) pairs), from the median wall
    step, and ``key_from_min`` / ``key_from_cpu`` from the fastest step / CPU time per step."""
    by = {(r["impl"], r["mode"]): r for r in rows}
    a, b = by[num], by[den]
    summary[key] = round(a["slices_per_s"] / b["slices_per_s"], 3)
    summary[f"{key}_from_min"] = round(b["step_ms_min"] / a["step_ms_min"], 3)
    summary[f"{key}_from_cpu"] = round(b["cpu_ms_per_step"] / a["cpu_ms_per_step"], 3)


def model_step_case(
    shape: StepShape, device: torch.device, modes=("eager", "compiled"), rounds=3, repeats=5, warmup=2,
    common: dict | None = None, ablations: bool = False, precision: str = "auto",
    compile_kwargs: dict | None = None, fp8: bool = False,
) -> list[dict]:  # fmt: skip
    """molre vs peer, each in ``modes``; one JSON row per variant and one summary row with the ratios.

    ``ablations``: also molre eager with each fast path switched off (see the module docstring).
    ``fp8``: also ``molre-fp8`` in each mode (``train.frozen_matmul=fp8``: frozen linears as e4m3).
    ``precision``: the molre config's (``auto`` = bf16 on CUDA); the peer runs under the same autocast.
    """
    common, ck = common or {}, compile_kwargs or {}
    torch.manual_seed(0)
    cfg = run_config(shape, precision=precision)
    bf16 = uses_bf16(cfg, device)
    m_model, m_opt = molre_model(cfg, device)
    p_model, p_opt = peer_model(shape, device)
    variants = []
    for mode in modes:
        if mode == "regional":  # compiled in place: own instances (same seed, same weights)
            torch.manual_seed(0)
            rm, rm_opt = molre_model(cfg, device, compile="regional", **ck)
            rp, rp_opt = peer_model(shape, device, regional=True, **ck)
            variants += [Variant("molre/regional", "molre", mode, rm, rm_opt, bf16, m_model, ck),
                         Variant("peer/regional", "peer", mode, rp, rp_opt, bf16, p_model, ck)]  # fmt: skip
            continue
        opts = (m_opt, p_opt) if mode == "eager" else (_clone_opt(m_opt), _clone_opt(p_opt))
        variants += [Variant(f"molre/{mode}", "molre", mode, m_model, opts[0], bf16, compile_kwargs=ck),
                     Variant(f"peer/{mode}", "peer", mode, p_model, opts[1], bf16, compile_kwargs=ck)]  # fmt: skip
    if fp8:  # the frozen linears as e4m3 (train.frozen_matmul=fp8): own instances, same seed and weights
        fp8_cfg = run_config(shape, precision=precision, frozen_matmul="fp8")
        torch.manual_seed(0)
        f_model, f_opt = molre_model(fp8_cfg, device)  # eager; FLOPs are counted on it for every mode
        for mode in modes:
            fm, fm_opt = f_model, f_opt if mode == "eager" else _clone_opt(f_opt)
            if mode == "regional":
                torch.manual_seed(0)
                fm, fm_opt = molre_model(fp8_cfg, device, compile="regional", **ck)
            variants.append(Variant(f"molre-fp8/{mode}", "molre-fp8", mode, fm, fm_opt, bf16, f_model, ck))
    ablated = []
    if ablations:
        if bf16:  # frozen weights left fp32: autocast re-casts them at every step
            torch.manual_seed(0)
            fm, fm_opt = molre_model(cfg, device, cast_frozen=False)
            ablated.append(Variant("molre-fp32-frozen/eager", "molre-fp32-frozen", "eager", fm, fm_opt, bf16))
        other = "foreach" if m_opt.defaults.get("fused") else "fused"  # the other AdamW than the default
        opt = make_optimizer_like(m_model, cfg, fused=other == "fused")
        ablated.append(
            Variant(f"molre-{other}-adamw/eager", f"molre-{other}-adamw", "eager", m_model, opt, bf16)
        )
    variants += ablated
    batch = make_batch(shape, device)
    measure(variants, batch, device, rounds, repeats, warmup)
    rows = [emit(variant_row("model_step", v, shape, device, common)) for v in variants]
    summary = {
        "case": "model_step_ratio",
        "preset": shape.preset,
        "input": shape.label(),
        "device": str(device),
        "bf16": bf16,
    }
    for mode in modes:
        _ratios(summary, rows, ("molre", mode), ("peer", mode), f"molre_over_peer_{mode}")
        if fp8:
            _ratios(summary, rows, ("molre-fp8", mode), ("peer", mode), f"fp8_over_peer_{mode}")
            _ratios(summary, rows, ("molre-fp8", mode), ("molre", mode), f"fp8_over_molre_{mode}")
    by = {(r["impl"], r["mode"]): r["slices_per_s"] for r in rows}
    best = {impl: max(v for (i, _), v in by.items() if i == impl) for impl in {i for i, _ in by}}
    summary["best_molre_over_best_peer"] = round(best["molre"] / best["peer"], 3)
    if fp8:
        summary["best_fp8_over_best_peer"] = round(best["molre-fp8"] / best["peer"], 3)
    if "eager" in modes:  # what each fast path gives: molre eager over molre eager without it
        for v in ablated:
            name = v.impl.removeprefix("molre-")
            _ratios(summary, rows, ("molre", "eager"), (v.impl, "eager"), f"speedup_vs_{name}")
    summary.update({"loadavg": loadavg(), **common})
    rows.append(emit(summary))
    del variants, m_model, p_model
    return rows


def make_optimizer_like(model: nn.Module, cfg, fused: bool) -> torch.optim.Optimizer:
    from molre.train.loop import make_optimizer

    return make_optimizer(model, cfg, fused=fused)


def blocks_overhead_case(
    shape: StepShape, device: torch.device, modes=("eager",), rounds=3, repeats=5, warmup=2,
    common: dict | None = None, precision: str = "auto", compile_kwargs: dict | None = None,
) -> list[dict]:  # fmt: skip
    """Step time of MoLRE inside the attention linears (``placement=blocks``), routed by slice (the default) and
    by token, vs LoRA alone (``kind=none``); one summary row per mode with both overheads and the counted FLOPs."""
    common, ck = common or {}, compile_kwargs or {}
    configs = {
        "lora": run_config(shape, kind="none", precision=precision),
        "blocks-slice": run_config(shape, placement="blocks", route_by="slice", precision=precision),
        "blocks-token": run_config(shape, placement="blocks", route_by="token", precision=precision),
    }
    bf16 = uses_bf16(configs["lora"], device)
    variants = []
    for impl, cfg in configs.items():
        torch.manual_seed(0)
        model, opt = molre_model(cfg, device)
        for mode in modes:
            if mode == "regional":
                torch.manual_seed(0)
                rm, r_opt = molre_model(cfg, device, compile="regional", **ck)
                variants.append(Variant(f"{impl}/{mode}", impl, mode, rm, r_opt, bf16, model, ck))
            else:
                o = opt if mode == "eager" else _clone_opt(opt)
                variants.append(Variant(f"{impl}/{mode}", impl, mode, model, o, bf16, compile_kwargs=ck))
    batch = make_batch(shape, device)
    measure(variants, batch, device, rounds, repeats, warmup)
    rows = [emit(variant_row("blocks_step", v, shape, device, common)) for v in variants]
    by = {(r["impl"], r["mode"]): r for r in rows}
    for mode in modes:
        summary = {"case": "blocks_overhead", "preset": shape.preset, "input": shape.label(),
                   "device": str(device), "mode": mode, "bf16": bf16}  # fmt: skip
        lora = by["lora", mode]
        summary["lora_step_ms"] = lora["step_ms"]
        summary["lora_gflop_per_slice_step"] = lora["gflop_per_slice_step"]
        for route in ("slice", "token"):
            r = by[f"blocks-{route}", mode]
            summary[f"{route}_step_ms"] = r["step_ms"]
            summary[f"{route}_overhead_pct"] = round((r["step_ms"] / lora["step_ms"] - 1) * 100, 1)
            summary[f"{route}_overhead_pct_from_min"] = round(
                (r["step_ms_min"] / lora["step_ms_min"] - 1) * 100, 1
            )
            summary[f"{route}_overhead_pct_from_cpu"] = round(
                (r["cpu_ms_per_step"] / lora["cpu_ms_per_step"] - 1) * 100, 1
            )
            summary[f"{route}_gflop_per_slice_step"] = r["gflop_per_slice_step"]
            summary[f"{route}_flop_overhead_pct"] = round(
                (r["gflop_per_slice_step"] / lora["gflop_per_slice_step"] - 1) * 100, 2
            )
        summary.update({"loadavg": loadavg(), **common})
        rows.append(emit(summary))
    return rows


def _clone_opt(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class and groups (its own state), for a second variant of one model."""
    groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
    return type(optimizer)(groups)


def flops_case(
    shapes: list[StepShape], limit_tflops: float = 800.0, common: dict | None = None
) -> list[dict]:
    """FLOPs per slice-step of molre, the peer, LoRA alone and MoLRE ``blocks`` (by slice, by token), counted on
    the meta device.

    Gives the GPU suite's denominators on any machine: ``slices_per_s_at_limit`` = the step rate a device
    sustaining ``limit_tflops`` (the issue's ~800 TFLOP/s bf16 for an H100) would reach.
    """
    from molre.train.loss import FocalLoss

    rows = []
    meta = torch.device("meta")
    for shape in shapes:
        side, n = shape.side(), shape.volumes * shape.slices
        with meta:
            models = {
                "molre": molre_model(run_config(shape), meta)[0],
                "peer": PeerClassifier(shape.preset, side),
                "lora": molre_model(run_config(shape, kind="none"), meta)[0],
                "blocks": molre_model(run_config(shape, placement="blocks", route_by="slice"), meta)[0],
                "blocks_token": molre_model(run_config(shape, placement="blocks", route_by="token"), meta)[0],
            }
            x = torch.empty(shape.volumes, 3, shape.slices, side, side)
            labels = torch.empty(shape.volumes, NUM_CLASSES)
        row = {"case": "flops", "preset": shape.preset, "input": shape.label(), "device": "meta"}
        for name, model in models.items():
            flops = count_flops(model, (x, labels, torch.ones_like(labels)), FocalLoss(2.0, 0.25), meta)
            row[f"{name}_gflop_per_slice_step"] = round(flops / n / 1e9, 3)
            row[f"{name}_trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row[f"{name}_slices_per_s_at_limit"] = round(limit_tflops * 1e12 / (flops / n), 1)
            row[f"_{name}_flops"] = flops
        for name in ("blocks", "blocks_token"):  # from the exact counts (the rounded GFLOP hide tiny presets)
            row[f"{name}_flop_overhead_pct"] = round(
                (row[f"_{name}_flops"] / row["_lora_flops"] - 1) * 100, 2
            )
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        row.update({"limit_tflops": limit_tflops, "loadavg": loadavg(), **(common or {})})
        rows.append(emit(row))
    return rows
