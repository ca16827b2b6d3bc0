"""The model step: forward + backward + AdamW step of the molre classifier vs a hand-written timm + peft peer.

One step = ``zero_grad -> forward (bf16 autocast on GPU, fp32 on CPU) -> focal loss -> backward -> clip grad norm
1.0 -> AdamW step``, the worker loop's step without data and augmentation. Input ``[B, 3, S, H, W]``.

- molre: ``molre.models.build_model`` of a run config (LoRA r=8 alpha=16 in the attention linears + MoLRE K=6
  r=8 on the slice features, attention pooling, linear head) with the worker loop's device settings
  (``molre.models.runtime.prepare_runtime``: frozen weights stored in bf16 under bf16 autocast, TF32 on CUDA) and
  optimizer (``molre.train.loop.make_optimizer``: fused AdamW on CUDA).
- peer (the issue's peer): the same timm architecture with peft's LoRA (``inject_adapter_in_model``, r=8,
  alpha=16) on the attention linears, then attention pooling + linear head written out here (no MoLRE; no molre
  code in its forward); fp32 frozen weights under autocast and torch's default (foreach) AdamW, as people write
  it. ``target_modules`` are the suffixes ``attn.qkv`` / ``attn.proj``: peft matches a bare ``"proj"`` against
  *every* module named ``proj``, which in timm's ViT includes the patch-embedding Conv2d ``patch_embed.proj``.
  peft's LoRA layer casts the branch's input to the LoRA weights' dtype (``_cast_input_dtype``: fp32) before
  ``lora_A``; both peers keep that, as people run it.
- peer+ (``peer_plus=True``): the peer with molre's two device settings, frozen weights stored in bf16 under bf16
  autocast (``cast_frozen_weights``) and the optimizer implementation molre's ``make_optimizer`` picks (fused
  AdamW on CUDA); left out of an fp32 CPU run, where it would be the peer. molre / peer+ is the ratio without
  those two fast paths.

Modes, for every side: ``eager``; ``compiled`` = ``torch.compile`` of the whole model (static shapes);
``regional`` = each transformer block compiled in place (``molre.models.runtime.compile_regions``; what
``train.compile=auto`` runs on a GPU). Ablations (``ablations=True``, eager only: skipped when ``eager`` is not
among the modes, since they are read against molre eager) switch one fast path of molre off:
``molre-fp32-frozen`` (frozen weights kept fp32 and re-cast by autocast every step; only under bf16) and
``molre-foreach-adamw`` / ``molre-fused-adamw`` (the other AdamW implementation than the device's default);
``molre-recompute`` switches a memory path on instead: ``train.activation_checkpointing`` (its cost is the ratio,
what it saves the peak memory column; at a shape where molre does not fit, molre's row is the out-of-memory error).
``fp8=True`` adds ``molre-fp8`` in every mode: molre with ``train.frozen_matmul=fp8`` (the frozen linears' products
on e4m3 operands, ``molre.models.fp8``), a fast path that changes the numbers, so it is a variant of its own.

FLOPs (one basis throughout): model FLOPs of one forward + backward, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (``meta_flops``, the ``flops`` case's count; no
attention recompute, the optimizer's elementwise work not counted). Every variant of an implementation gets its
implementation's count: ``molre-fp8`` and the ablations molre's (the unpadded problem: FP8 pads rows to a multiple
of 16, which is not model work), ``peer+`` the peer's. Achieved FLOP/s = that count per step / median step time;
for ``molre-fp8`` it is not comparable with a bf16 peak (its frozen products run on FP8 tensor cores).

Variants are timed in interleaved rounds in one process, so a change in the machine's load hits all of them
alike. A variant that raises while it is built, warmed up or timed (or is skipped because the stage's time limit
is near: ``deadline``) gets a row with ``error`` and the other variants go on.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
from harness import PeakMemory, emit, loadavg, median, resident_bytes, sync, time_steps
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

NUM_CLASSES = 75
PEER_TARGETS = ["attn.qkv", "attn.proj"]
# Regionally compiled models of one architecture share their block's code object, and Dynamo keeps at most
# recompile_limit (8) graphs per code object before running it eager: one process here compiles the blocks of up
# to 8 models (molre, peer, peer+, FP8, LoRA, blocks by slice / token; two ViT presets), so raise it.
torch._dynamo.config.recompile_limit = 64
COMMON_KEYS = ("suite", "compile_mode")  # run-level fields copied onto derived rows


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
    impl: str  # molre | peer | peer+ | molre-fp8 | lora | blocks-slice | ...
    mode: str  # eager | compiled | regional
    model: nn.Module | None  # for regional: compiled in place; None when it could not be built
    optimizer: torch.optim.Optimizer | None
    bf16: bool = False  # bf16 autocast
    compile_kwargs: dict = field(default_factory=dict)  # torch.compile options (tests: backend="aot_eager")
    step: object = None
    flops: int | None = None  # model FLOPs per step (meta_flops of flop_key(impl))
    flop_error: str | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    error: str | None = None  # set when it failed or was skipped; the row then carries only this
    warmup_s: float = 0.0
    step_s_estimate: float = 0.0  # the last warm-up step


def run_config(
    shape: StepShape, kind: str = "molre", placement: str = "features", finetune: str | None = None,
    route_by: str = "slice", precision: str = "auto", frozen_matmul: str = "auto", recompute: bool = False,
):  # fmt: skip
    from molre.config import build_config

    return build_config({
        "backbone": {"preset": shape.preset, "image_size": shape.image_size, "finetune": finetune},
        "adapter": {"kind": kind, "molre": {"placement": placement, "route_by": route_by}},
        "data": {"num_slices": shape.slices},
        "train": {"precision": precision, "frozen_matmul": frozen_matmul, "activation_checkpointing": recompute},
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

    def optimizer(self, fused: bool = False) -> torch.optim.AdamW:
        """torch's default AdamW (foreach), or the fused one (``fused``: peer+ on CUDA, as molre's)."""
        head = [self.query, *self.head.parameters()]
        lora = [p for n, p in self.net.named_parameters() if "lora_" in n and p.requires_grad]
        return torch.optim.AdamW(
            [{"params": head, "lr": 1e-3}, {"params": lora, "lr": 1e-4}],
            weight_decay=0.01,
            **({"fused": True} if fused else {}),
        )


def peer_model(
    shape: StepShape, device: torch.device, regional: bool = False, plus: bool = False, bf16: bool = False,
    **compile_kwargs,
):  # fmt: skip
    """The peer and its AdamW; ``regional``: its attention blocks compiled in place, as molre's.

    ``plus`` (peer+): molre's device settings on the peer: frozen weights stored in bf16 when ``bf16`` (the run's
    autocast) and the AdamW implementation ``make_optimizer`` would pick (fused when on CUDA).
    """
    from molre.models.runtime import cast_frozen_weights, compile_regions

    model = PeerClassifier(shape.preset, shape.side()).to(device)
    if plus and bf16:
        cast_frozen_weights(model, torch.bfloat16)
    if regional:
        compile_regions(model.net, PEER_TARGETS, **compile_kwargs)
    return model, model.optimizer(fused=plus and torch.device(device).type == "cuda")


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
        forward = torch.compile(variant.model, **{"dynamic": False, **variant.compile_kwargs})
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


# ---- FLOPs ---------------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, batch, loss_fn, device: torch.device, bf16: bool = False) -> int:
    """FLOPs of one eager forward + backward, counted op by op (matmul, conv, attention)."""
    x, labels, known = batch
    with FlopCounterMode(display=False) as counter:
        with _autocast(device, bf16):
            logits = model(x)
        loss_fn(logits.float(), labels, known).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flop_key(impl: str) -> str:
    """The implementation whose model FLOPs a variant is given: ablations and FP8 are molre's math, peer+ the
    peer's; ``lora`` / ``blocks-slice`` / ``blocks-token`` their own."""
    if impl in ("peer", "peer+"):
        return "peer"
    if impl.startswith("molre"):
        return "molre"
    return impl


def _meta_model(shape: StepShape, key: str) -> nn.Module:
    meta = torch.device("meta")
    if key == "peer":
        return PeerClassifier(shape.preset, shape.side())
    configs = {
        "molre": lambda: run_config(shape),
        "lora": lambda: run_config(shape, kind="none"),
        "blocks-slice": lambda: run_config(shape, placement="blocks", route_by="slice"),
        "blocks-token": lambda: run_config(shape, placement="blocks", route_by="token"),
    }
    return molre_model(configs[key](), meta)[0]


@functools.cache
def meta_count(shape: StepShape, key: str) -> tuple[int, int]:
    """(model FLOPs of one forward + backward, trainable parameters) of ``key`` at ``shape``, on the meta device
    (no memory, no compute: any machine gives the GPU shapes' counts)."""
    from molre.train.loss import FocalLoss

    meta = torch.device("meta")
    side = shape.side()
    with meta:
        model = _meta_model(shape, key)
        x = torch.empty(shape.volumes, 3, shape.slices, side, side)
        labels = torch.empty(shape.volumes, NUM_CLASSES)
    flops = count_flops(model, (x, labels, torch.ones_like(labels)), FocalLoss(2.0, 0.25), meta)
    return flops, sum(p.numel() for p in model.parameters() if p.requires_grad)


def meta_flops(shape: StepShape, key: str) -> int:
    return meta_count(shape, key)[0]


def fill_flops(variants: list[Variant], shape: StepShape) -> None:
    """Each built variant's model FLOPs (``flop_key``); a count that fails leaves ``flops`` None (the variant is
    still timed)."""
    for v in variants:
        if v.error:
            continue
        try:
            v.flops = meta_flops(shape, flop_key(v.impl))
        except Exception as err:  # a missing count must not cost the timing
            traceback.print_exc(file=sys.stderr)
            v.flop_error = _message(err)


# ---- timing --------------------------------------------------------------------------------------------------


def _message(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _fail(v: Variant, err: BaseException, device: torch.device) -> None:
    """Mark ``v`` failed (the traceback goes to stderr) and free what it holds on the device."""
    traceback.print_exc(file=sys.stderr)
    v.error = _message(err)
    v.step, v.times, v.cpu_times = None, [], []
    if v.optimizer is not None:
        with contextlib.suppress(Exception):
            v.optimizer.zero_grad(set_to_none=True)
    _release(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    variants: list[Variant], batch, device: torch.device, rounds: int, repeats: int, warmup: int,
    deadline: float | None = None,
) -> None:  # fmt: skip
    """Warm each variant up, then time them in ``rounds`` interleaved rounds of ``repeats`` steps; peak memory in
    the first round.

    Per variant: one that raises gets ``error`` and the others go on. ``deadline`` (``time.time()`` seconds): a
    variant is not started when the time left is less than ~1.25x the longest warm-up so far plus the timing
    rounds of the variants already warm (it gets ``error = "skipped: ..."``), and no round is started after it
    (the rows then say how many steps were timed).
    """
    from molre.train.loss import FocalLoss

    loss_fn = FocalLoss(2.0, 0.25)
    warm: list[Variant] = []
    for v in variants:
        if v.error:
            continue
        if deadline is not None:
            left = deadline - time.time()
            per_step = [w.step_s_estimate for w in warm]
            need = 1.25 * max((w.warmup_s for w in warm), default=0.0) + rounds * repeats * (
                sum(per_step) + max(per_step, default=0.0)
            )
            if left < need:
                v.error = (f"skipped: {left:.0f} s left before the stage's time limit, ~{need:.0f} s needed to "
                           "warm it up and time it")  # fmt: skip
                print(f"model_step: {v.name} {v.error}", file=sys.stderr, flush=True)
                continue
        try:
            start = time.perf_counter()
            v.step = make_step(v, batch, loss_fn, device)
            for _ in range(warmup + (0 if v.mode == "eager" else 2)):
                t = time.perf_counter()
                v.step()
                sync(device)
                v.step_s_estimate = time.perf_counter() - t
            v.warmup_s = time.perf_counter() - start
            warm.append(v)
        except Exception as err:
            _fail(v, err, device)
    for r in range(rounds):
        if r > 0 and deadline is not None and time.time() > deadline:
            print(f"model_step: time limit near, {r} of {rounds} rounds timed", file=sys.stderr, flush=True)
            break
        for v in warm:
            if v.error:
                continue
            try:
                if r == 0:
                    v.optimizer.zero_grad(set_to_none=True)
                    with PeakMemory(device) as pm:
                        v.times += time_steps(v.step, repeats, device, v.cpu_times)
                    resident = resident_bytes(v.model, v.optimizer, *batch)
                    v.memory = {"peak_bytes": resident + pm.transient, "resident_bytes": resident,
                                "transient_bytes": pm.transient, "method": pm.method}  # fmt: skip
                else:
                    v.times += time_steps(v.step, repeats, device, v.cpu_times)
            except Exception as err:
                _fail(v, err, device)


def variant_row(case: str, v: Variant, shape: StepShape, device: torch.device, common: dict) -> dict:
    """The JSON row of one variant: its figures, or (``v.error``) only what failed."""
    head = {"case": case, "preset": shape.preset, "input": shape.label(), "impl": v.impl, "mode": v.mode,
            "device": str(device)}  # fmt: skip
    if v.error:
        return {**head, "error": v.error, "loadavg": loadavg(), **common}
    step_s = median(v.times)
    slices = shape.volumes * shape.slices
    flops = v.flops
    row = {
        **head,
        "bf16": v.bf16,
        "slices_per_s": round(slices / step_s, 2),
        "volumes_per_s": round(shape.volumes / step_s, 3),
        "step_ms": round(step_s * 1e3, 2),
        "step_ms_min": round(min(v.times) * 1e3, 2),
        "cpu_ms_per_step": round(median(v.cpu_times) * 1e3, 2),
        "threads": torch.get_num_threads(),
        "steps_timed": len(v.times),
        "warmup_s": round(v.warmup_s, 1),
        "flop_basis": "meta",  # model FLOPs counted on the meta device (meta_flops)
        "flops_per_step": flops,
        "gflop_per_slice_step": round(flops / slices / 1e9, 4) if flops else None,
        "achieved_gflops": round(flops / step_s / 1e9, 3) if flops else None,
        "achieved_gflops_best": round(flops / min(v.times) / 1e9, 3) if flops else None,
        "peak_mem_mib": round(v.memory["peak_bytes"] / 2**20, 1),
        "mem_method": v.memory["method"],
        "trainable_params": sum(p.numel() for p in v.model.parameters() if p.requires_grad),
        "loadavg": loadavg(),
        **common,
    }
    if v.flop_error:
        row["flop_error"] = v.flop_error
    if v.impl == "molre-fp8":  # molre's model FLOPs over a step whose frozen products run on FP8 tensor cores
        row["achieved_vs_bf16_peak"] = False
    return row


def _ratio(summary: dict, a: dict, b: dict, key: str) -> None:
    """``summary[key]`` = throughput of row ``a`` over row ``b`` from the median wall step, and ``key_from_min`` /
    ``key_from_cpu`` from the fastest step / CPU time per step."""
    summary[key] = round(a["slices_per_s"] / b["slices_per_s"], 3)
    summary[f"{key}_from_min"] = round(b["step_ms_min"] / a["step_ms_min"], 3)
    summary[f"{key}_from_cpu"] = round(b["cpu_ms_per_step"] / a["cpu_ms_per_step"], 3)


# (numerator impl, denominator impl, key): per mode as f"{key}_{mode}", best over modes as f"best_{...}"
PAIRS = (
    ("molre", "peer", "molre_over_peer"),
    ("molre", "peer+", "molre_over_peerplus"),
    ("molre-fp8", "peer", "fp8_over_peer"),
    ("molre-fp8", "molre", "fp8_over_molre"),
)
BEST = (
    ("molre", "peer", "best_molre_over_best_peer"),
    ("molre", "peer+", "best_molre_over_best_peerplus"),
    ("molre-fp8", "peer", "best_fp8_over_best_peer"),
)


def is_ablation(impl: str) -> bool:
    return impl.startswith("molre-") and impl != "molre-fp8"


def step_ratios(rows: list[dict]) -> list[dict]:
    """One ``model_step_ratio`` row per (preset, input) of the ``model_step`` rows given (error rows left out).

    A ratio is given only where both of its variants have a row: molre over peer, peer+ and FP8 per mode, the
    best mode of each over the best of the other, and (against molre eager) what each ablated fast path gives.
    bench/run.py recomputes these rows from the merged step rows, so they always match the step table.
    """
    steps = [r for r in rows if r.get("case") == "model_step" and "error" not in r]
    out = []
    for preset, inp in dict.fromkeys((r["preset"], r["input"]) for r in steps):
        good = [r for r in steps if (r["preset"], r["input"]) == (preset, inp)]
        by = {(r["impl"], r["mode"]): r for r in good}
        summary = {
            "case": "model_step_ratio",
            "preset": preset,
            "input": inp,
            "device": good[-1].get("device"),
        }
        if any("bf16" in r for r in good):
            summary["bf16"] = any(r.get("bf16") for r in good)
        for mode in dict.fromkeys(r["mode"] for r in good):
            for num, den, key in PAIRS:
                if (num, mode) in by and (den, mode) in by:
                    _ratio(summary, by[num, mode], by[den, mode], f"{key}_{mode}")
        best: dict[str, float] = {}
        for r in good:
            best[r["impl"]] = max(best.get(r["impl"], 0.0), r["slices_per_s"])
        for num, den, key in BEST:
            if num in best and den in best:
                summary[key] = round(best[num] / best[den], 3)
        if ("molre", "eager") in by:  # what each fast path gives: molre eager over molre eager without it
            for r in good:
                if r["mode"] == "eager" and is_ablation(r["impl"]):
                    name = r["impl"].removeprefix("molre-")
                    _ratio(summary, by["molre", "eager"], r, f"speedup_vs_{name}")
        summary["loadavg"] = good[-1]["loadavg"]
        summary.update({k: good[-1][k] for k in COMMON_KEYS if k in good[-1]})
        out.append(summary)
    return out


class _Once:
    """``fn()`` called at most once; its value (or its exception) handed to every caller."""

    def __init__(self, fn):
        self.fn, self.done, self.value, self.err = fn, False, None, None

    def __call__(self):
        if not self.done:
            self.done = True
            try:
                self.value = self.fn()
            except Exception as err:
                self.err = err
        if self.err is not None:
            raise self.err
        return self.value


def _seeded(fn, *args, **kwargs):
    def build():
        torch.manual_seed(0)  # every instance of one implementation starts from the same weights
        return fn(*args, **kwargs)

    return build


def _add(
    variants: list[Variant], name: str, impl: str, mode: str, build, bf16: bool, ck: dict, device
) -> None:
    """Build one variant (``build() -> (model, optimizer)``); one that raises is kept with its error."""
    try:
        model, opt = build()
        variants.append(Variant(name, impl, mode, model, opt, bf16, ck if mode != "eager" else {}))
    except Exception as err:
        v = Variant(name, impl, mode, None, None, bf16)
        _fail(v, err, device)
        variants.append(v)


def model_step_case(
    shape: StepShape, device: torch.device, modes=("eager", "compiled"), rounds=3, repeats=5, warmup=2,
    common: dict | None = None, ablations: bool = False, precision: str = "auto",
    compile_kwargs: dict | None = None, fp8: bool = False, peer_plus: bool = True, deadline: float | None = None,
) -> list[dict]:  # fmt: skip
    """molre vs peer (and peer+), each in ``modes``; one JSON row per variant (an ``error`` row for a variant that
    failed) and one summary row with the ratios (``step_ratios``).

    ``ablations``: also molre eager with each fast path switched off (only when ``eager`` is in ``modes``).
    ``fp8``: also ``molre-fp8`` in each mode (``train.frozen_matmul=fp8``: frozen linears as e4m3).
    ``precision``: the molre config's (``auto`` = bf16 on CUDA); the peers run under the same autocast.
    Order (what a ``deadline`` skips last): molre, peer, peer+ in each mode, then FP8, then the ablations.
    """
    common, ck = common or {}, compile_kwargs or {}
    cfg = run_config(shape, precision=precision)
    bf16 = uses_bf16(cfg, device)
    fp8_cfg = run_config(shape, precision=precision, frozen_matmul="fp8") if fp8 else None

    def make(impl: str, regional: bool):
        extra = {"compile": "regional", **ck} if regional else {}
        if impl == "molre":
            return molre_model(cfg, device, **extra)
        if impl == "molre-fp8":
            return molre_model(fp8_cfg, device, **extra)
        plus = impl == "peer+"
        return peer_model(shape, device, regional=regional, plus=plus, bf16=bf16, **(ck if regional else {}))

    # peer+ differs from the peer only under bf16 (frozen weights) or on CUDA (fused AdamW): else it is the peer
    impls = ["molre", "peer"] + (["peer+"] if peer_plus and (bf16 or device.type == "cuda") else [])
    eager = {
        impl: _Once(_seeded(make, impl, False)) for impl in [*impls, "molre-fp8"]
    }  # shared by eager/compiled

    def build(impl: str, mode: str):
        if mode == "regional":  # compiled in place: its own instance (same seed, same weights)
            return _seeded(make, impl, True)()
        model, opt = eager[impl]()
        return model, opt if mode == "eager" else _clone_opt(opt)

    variants: list[Variant] = []
    for impl, mode in [*[(i, m) for m in modes for i in impls], *[("molre-fp8", m) for m in modes if fp8]]:
        _add(variants, f"{impl}/{mode}", impl, mode, functools.partial(build, impl, mode), bf16, ck, device)
    if ablations and "eager" in modes:
        if bf16:  # frozen weights left fp32: autocast re-casts them at every step
            build_fp32 = _seeded(molre_model, cfg, device, cast_frozen=False)
            _add(
                variants,
                "molre-fp32-frozen/eager",
                "molre-fp32-frozen",
                "eager",
                build_fp32,
                bf16,
                ck,
                device,
            )

        def other_adamw():
            model, opt = eager["molre"]()
            return model, make_optimizer_like(model, cfg, fused=not opt.defaults.get("fused"))

        recompute = _seeded(molre_model, run_config(shape, precision=precision, recompute=True), device)
        _add(variants, "molre-recompute/eager", "molre-recompute", "eager", recompute, bf16, ck, device)
        other = (
            "foreach" if device.type == "cuda" else "fused"
        )  # the other AdamW than make_optimizer's default
        _add(
            variants,
            f"molre-{other}-adamw/eager",
            f"molre-{other}-adamw",
            "eager",
            other_adamw,
            bf16,
            ck,
            device,
        )
    fill_flops(variants, shape)
    batch = make_batch(shape, device)
    measure(variants, batch, device, rounds, repeats, warmup, deadline)
    rows = [emit(variant_row("model_step", v, shape, device, common)) for v in variants]
    rows += [emit(r) for r in step_ratios(rows)]
    variants.clear()  # the models go before the next shape's are built
    eager.clear()
    _release(device)
    return rows


def make_optimizer_like(model: nn.Module, cfg, fused: bool) -> torch.optim.Optimizer:
    from molre.train.loop import make_optimizer

    return make_optimizer(model, cfg, fused=fused)


def blocks_summaries(rows: list[dict]) -> list[dict]:
    """One ``blocks_overhead`` row per (preset, input, mode) of the ``blocks_step`` rows given that has a LoRA row:
    step time and counted FLOPs of ``blocks`` routed by slice and by token over LoRA (a route without a row is left
    out). bench/run.py recomputes these from the merged step rows."""
    steps = [r for r in rows if r.get("case") == "blocks_step" and "error" not in r]
    by = {(r["preset"], r["input"], r["impl"], r["mode"]): r for r in steps}
    out = []
    for (preset, inp, impl, mode), lora in by.items():
        if impl != "lora":
            continue
        summary = {"case": "blocks_overhead", "preset": preset, "input": inp, "device": lora.get("device"),
                   "mode": mode}  # fmt: skip
        if "bf16" in lora:
            summary["bf16"] = lora["bf16"]
        summary["lora_step_ms"] = lora["step_ms"]
        summary["lora_gflop_per_slice_step"] = lora["gflop_per_slice_step"]
        for route in ("slice", "token"):
            r = by.get((preset, inp, f"blocks-{route}", mode))
            if r is None:
                continue
            summary[f"{route}_step_ms"] = r["step_ms"]
            summary[f"{route}_overhead_pct"] = round((r["step_ms"] / lora["step_ms"] - 1) * 100, 1)
            summary[f"{route}_overhead_pct_from_min"] = round(
                (r["step_ms_min"] / lora["step_ms_min"] - 1) * 100, 1
            )
            summary[f"{route}_overhead_pct_from_cpu"] = round(
                (r["cpu_ms_per_step"] / lora["cpu_ms_per_step"] - 1) * 100, 1
            )
            summary[f"{route}_gflop_per_slice_step"] = r["gflop_per_slice_step"]
            exact = "flops_per_step" if r.get("flops_per_step") and lora.get("flops_per_step") else None
            key = exact or "gflop_per_slice_step"  # the exact counts where rows have them (tiny presets)
            if r.get(key) and lora.get(key):
                summary[f"{route}_flop_overhead_pct"] = round((r[key] / lora[key] - 1) * 100, 2)
        summary["loadavg"] = lora["loadavg"]
        summary.update({k: lora[k] for k in COMMON_KEYS if k in lora})
        out.append(summary)
    return out


def blocks_overhead_case(
    shape: StepShape, device: torch.device, modes=("eager",), rounds=3, repeats=5, warmup=2,
    common: dict | None = None, precision: str = "auto", compile_kwargs: dict | None = None,
    deadline: float | None = None,
) -> list[dict]:  # fmt: skip
    """Step time of MoLRE inside the attention linears (``placement=blocks``), routed by slice (the default) and
    by token, vs LoRA alone (``kind=none``); one summary row per mode with both overheads and the counted FLOPs.
    A variant that fails gets an error row, as in ``model_step_case``."""
    common, ck = common or {}, compile_kwargs or {}
    configs = {
        "lora": run_config(shape, kind="none", precision=precision),
        "blocks-slice": run_config(shape, placement="blocks", route_by="slice", precision=precision),
        "blocks-token": run_config(shape, placement="blocks", route_by="token", precision=precision),
    }
    bf16 = uses_bf16(configs["lora"], device)
    eager = {impl: _Once(_seeded(molre_model, cfg, device)) for impl, cfg in configs.items()}

    def build(impl: str, mode: str):
        if mode == "regional":
            return _seeded(molre_model, configs[impl], device, compile="regional", **ck)()
        model, opt = eager[impl]()
        return model, opt if mode == "eager" else _clone_opt(opt)

    variants: list[Variant] = []
    for impl in configs:
        for mode in modes:
            _add(
                variants, f"{impl}/{mode}", impl, mode, functools.partial(build, impl, mode), bf16, ck, device
            )
    fill_flops(variants, shape)
    batch = make_batch(shape, device)
    measure(variants, batch, device, rounds, repeats, warmup, deadline)
    rows = [emit(variant_row("blocks_step", v, shape, device, common)) for v in variants]
    rows += [emit(r) for r in blocks_summaries(rows)]
    variants.clear()  # the models go before the next shape's are built
    eager.clear()
    _release(device)
    return rows


def _clone_opt(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class and groups (its own state), for a second variant of one model."""
    groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
    return type(optimizer)(groups)


def flops_case(
    shapes: list[StepShape], limit_tflops: float = 800.0, common: dict | None = None
) -> list[dict]:
    """FLOPs per slice-step of molre, the peer, LoRA alone and MoLRE ``blocks`` (by slice, by token), counted on
    the meta device (``meta_count``: the same counts the step rows use).

    Gives the GPU suite's denominators on any machine: ``slices_per_s_at_limit`` = the step rate a device
    sustaining ``limit_tflops`` (the issue's ~800 TFLOP/s bf16 for an H100) would reach.
    """
    rows = []
    names = {"molre": "molre", "peer": "peer", "lora": "lora", "blocks": "blocks-slice",
             "blocks_token": "blocks-token"}  # fmt: skip
    for shape in shapes:
        n = shape.volumes * shape.slices
        row = {"case": "flops", "preset": shape.preset, "input": shape.label(), "device": "meta"}
        counts = {name: meta_count(shape, key) for name, key in names.items()}
        for name, (flops, trainable) in counts.items():
            row[f"{name}_gflop_per_slice_step"] = round(flops / n / 1e9, 3)
            row[f"{name}_trainable_params"] = trainable
            row[f"{name}_slices_per_s_at_limit"] = round(limit_tflops * 1e12 / (flops / n), 1)
        for name in ("blocks", "blocks_token"):  # from the exact counts (the rounded GFLOP hide tiny presets)
            row[f"{name}_flop_overhead_pct"] = round((counts[name][0] / counts["lora"][0] - 1) * 100, 2)
        row.update({"limit_tflops": limit_tflops, "loadavg": loadavg(), **(common or {})})
        rows.append(emit(row))
    return rows
