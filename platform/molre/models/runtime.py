"""How a built classifier runs on its device: bf16 frozen weights, regional ``torch.compile``, TF32.

Each is what the worker loop applies (``molre.train.loop``) and what ``bench/model_step.py`` measures:

- **bf16 frozen weights** (when the run trains under bf16 autocast). Autocast casts an fp32 weight to bf16 at
  every use (its cast cache lives for one autocast region and holds only leaves that require grad), so a frozen
  backbone pays one cast kernel per weight per step and keeps the bf16 copies alive for the backward: ViT-B's
  86M frozen weights mean 344 MB read + 172 MB written per step, and 344 MB fp32 + 172 MB bf16 resident. Stored
  in bf16 they are used as they are (172 MB). Same bits: autocast would have run these ops in bf16 on the same
  rounded weights. Only frozen
  ``nn.Linear`` / ``nn.Conv*`` parameters are cast; LoRA, MoLRE, pooling and the head keep fp32 master weights
  (AdamW updates of ~1e-4 relative size would vanish in bf16's 8-bit mantissa), as do norms and layer scales.
- **FP8 frozen matmuls** (``train.frozen_matmul=fp8``, off by default): the frozen linears become
  ``molre.models.fp8.FrozenFp8Linear`` (e4m3 weights, row-wise scales) before the bf16 cast, which then covers the
  frozen weights left (convolutions, linears whose sizes are not multiples of 16).
- **regional compile**: ``torch.compile`` of each transformer block (the modules holding the attention linears),
  not of the whole model. Blocks of one backbone share their code, so Dynamo traces and Inductor compiles one
  block's graph and reuses it for the others (PyTorch's regional compilation recipe): compile time of about one
  block instead of the whole depth, at close to the whole-model step time. The rest (patch embedding, final norm,
  MoLRE on the features, pooling, head) is < 1% of the FLOPs and stays eager.
- **TF32** for the fp32 matmuls that remain on CUDA (everything with ``precision=fp32``; under bf16 autocast only
  the few ops autocast keeps in fp32).
- **activation checkpointing** (``train.activation_checkpointing``, off by default): each attention block's (or,
  in a 3D DenseNet, each dense layer's) activations are recomputed in the backward pass instead of kept, for
  memory (``checkpoint_blocks``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from molre.errors import ModelError
from molre.models.fp8 import apply_frozen_matmul

COMPILE_MODES = ("off", "regional", "model")
_WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def uses_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether a run trains under bf16 autocast: ``bf16``, or ``auto`` on CUDA."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def compile_mode(setting: str, device: torch.device | str) -> str:
    """``train.compile`` resolved for a device: ``auto`` = regional on CUDA, off elsewhere."""
    if setting == "auto":
        return "regional" if torch.device(device).type == "cuda" else "off"
    if setting not in COMPILE_MODES:
        raise ModelError(f"compile mode {setting!r}: expected auto or one of {COMPILE_MODES}")
    return setting


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen weights of linears and convolutions in ``dtype``, in place; returns how many were cast.

    Trainable parameters (and every parameter of other module types) are left alone. The ``Parameter`` objects
    stay the same, so optimizers, DDP and ``named_parameters`` see no change.
    """
    cast = 0
    for module in model.modules():
        if not isinstance(module, _WEIGHT_MODULES):
            continue
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
    return cast


def attention_blocks(net: nn.Module, targets) -> list[str]:
    """Names of the modules that hold an attention linear named ``<block>.<target>`` (any wrapper type).

    timm ViT / Eva: ``blocks.3``; DaViT: ``stages.2.blocks.4.0`` (spatial) and ``...4.1`` (channel); MONAI ViT:
    ``blocks.1``. The adapter wrapping the linear (LoRA, MoLRE, peft) does not matter.
    """
    names = [name for name, _ in net.named_modules()]
    blocks = []
    for name in names:
        for target in targets:
            if name.endswith("." + target):
                blocks.append(name[: -len(target) - 1])
    blocks = list(dict.fromkeys(blocks))
    return [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]  # outermost only


def compile_regions(net: nn.Module, targets, **compile_kwargs) -> list[str]:
    """``torch.compile`` each attention block of ``net`` in place (``Module.compile``); returns their names.

    A net without attention blocks (a CNN) is compiled whole. ``compile_kwargs`` go to ``torch.compile``
    (tests pass ``backend="aot_eager"`` to check the wiring without a C++ toolchain).

    Shapes are static (``dynamic=False`` unless given): with Dynamo's automatic dynamic shapes, the first call
    with a second shape recompiles a dynamic-shape graph that every later call then runs, full batches included
    (a validation batch of another size was enough). Training batches all have one size (``rfs_batches`` fills
    the last one), so a static graph per shape costs a recompile only for validation's last batch and eval
    mode. Blocks that differ in their parameter shapes (DaViT's four stages of two block kinds) need static
    shapes anyway: symbolic sizes fail Inductor (torch 2.14) on DaViT's window partition ("cannot determine truth
    value of Relational"). Their graphs (stages x train / eval x a smaller last batch) outnumber Dynamo's default
    recompile limit of 8, so it is raised to 64 (beyond it a new shape would run eager).
    """
    compile_kwargs = {"dynamic": False, **compile_kwargs}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = attention_blocks(net, targets)
    if not blocks:
        net.compile(**compile_kwargs)
        return [""]
    for name in blocks:
        net.get_submodule(name).compile(**compile_kwargs)
    return blocks


def dense_layers(net: nn.Module) -> list[str]:
    """Names of the dense layers of a MONAI DenseNet (``features.denseblock2.denselayer7``); [] for other nets."""
    from monai.networks.nets.densenet import _DenseLayer

    return [name for name, module in net.named_modules() if isinstance(module, _DenseLayer)]


def checkpoint_blocks(net: nn.Module, targets) -> list[str]:
    """Recompute each attention block's activations in the backward pass instead of keeping them, in place
    (parameter names unchanged); returns the blocks' names. Apply before ``compile_regions``, which then compiles
    the checkpointed forward.

    A block then keeps only its input for the backward: MedGemma at 896^2 keeps 27 blocks x 4,096 tokens x 1,152
    x 2 bytes = 0.25 GB per slice instead of its ~3 GB of activations (BENCHMARKS.md: 24 GB peak at 8 slices, so
    a 32-slice volume needs this on an 80 GB GPU), for one more forward of every block (+~1/3 of the step's
    FLOPs). Non-reentrant ``torch.utils.checkpoint``: dropout masks are replayed, gradients are unchanged.

    A net without attention blocks has its MONAI dense layers checkpointed instead (3D DenseNet: ``deepcntd``,
    ``tiny-cnn3d``), each ``_DenseLayer`` rather than each ``_DenseBlock``. A layer returns ``cat(x, new)``, a
    fresh tensor that the next layer keeps as its checkpoint input, so the kept inputs still grow with the depth
    (sum of C_in); but a layer otherwise keeps x, relu(norm1(x)) (C_in channels each) and its 4k-channel
    bottleneck twice (growth k=32): 2 C_in + 8k channels against the C_in kept now. Checkpointing whole blocks
    keeps less between forward and backward but rebuilds a whole block's activations at once in the backward,
    and the first block, at the highest resolution, holds about half of them: the peak, which is what runs out
    of memory, is lower per layer. Both recompute every dense layer once (+~1/3 of the FLOPs); the stem (7^3
    convolution, pooling) and the transitions stay as they are. Bytes saved for the backward (fp32, one volume,
    ``saved_tensors_hooks``): ``deepcntd`` at 32 x 224^2 keeps 898 MiB; per layer 325 MiB, + 92 MiB while its
    largest layer is recomputed; per block 202 MiB, + 416 MiB while block 1 is. At 16 x 64^2: 64 -> 14 MiB;
    ``tiny-cnn3d`` at 8 x 64^2: 1.7 -> 1.0 MiB (its stem keeps most of it).

    The recompute runs BatchNorm in training mode again, which would update its running statistics (and
    ``num_batches_tracked``) a second time; the eager recompute restores them (``_norm_stats_kept``). Compiled,
    AOTAutograd recomputes the values alone and the buffers are written once, in the forward (checked with
    Inductor on CPU).
    """
    blocks = attention_blocks(net, targets) or dense_layers(net)
    if not blocks:
        raise ModelError(
            "activation checkpointing recomputes attention blocks or MONAI dense layers; "
            f"{type(net).__name__} has neither"
        )
    for name in blocks:
        block = net.get_submodule(name)
        norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        block.forward = functools.partial(_recomputed, block.forward, tuple(norms))
    return blocks


def _recomputed(forward, norms, *args, **kwargs):
    if not torch.is_grad_enabled():  # validation / features: nothing to keep, nothing to recompute
        return forward(*args, **kwargs)
    # eager only: Dynamo would take the contexts for a selective-checkpointing policy in place of its
    # recompute-everything one (and keep more: 2.05 instead of 1.7 MiB for tiny-cnn3d's test)
    if norms and not torch.compiler.is_compiling():
        kept = functools.partial(_norm_stats_kept, norms)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=kept, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _norm_stats_kept(norms) -> tuple:
    """``checkpoint``'s contexts: none for the forward; the recompute leaves the norms' buffers as it found them."""
    return contextlib.nullcontext(), _buffers_restored(norms)


@contextlib.contextmanager
def _buffers_restored(modules):
    saved = [(b, b.clone()) for m in modules for b in m.buffers(recurse=False)]  # per channel: a few KB
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def compile_classifier(model: nn.Module, mode: str, targets=None, **compile_kwargs) -> list[str]:
    """Compile a ``MoLREClassifier`` in place: ``regional`` (its backbone's blocks), ``model`` (all), ``off``.

    In place, so the model keeps its methods (``aux_loss``, ``router_weights``) and parameter names.
    """
    if mode == "off":
        return []
    if mode == "model":
        model.compile(**{"dynamic": False, **compile_kwargs})  # static shapes, as compile_regions explains
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return [""]
    if mode != "regional":
        raise ModelError(f"compile mode {mode!r}: expected one of {COMPILE_MODES}")
    net = model.backbone.net
    return compile_regions(net, targets or model.backbone.preset.lora_targets, **compile_kwargs)


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (process-wide; no effect on CPU)."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def prepare_runtime(
    model: nn.Module, cfg, device: torch.device | str, compile: str | None = None, cast_frozen: bool = True,
    **compile_kwargs,
) -> dict:  # fmt: skip
    """A freshly built classifier's device settings from its run config, in place (before DDP wraps it).

    TF32 per ``train.tf32`` (CUDA only), frozen linears in FP8 per ``train.frozen_matmul``, the other frozen
    weights in bf16 when the run trains under bf16 autocast (``cast_frozen=False`` keeps them fp32: the
    benchmark's ablation), blocks checkpointed per ``train.activation_checkpointing``, compile per
    ``train.compile`` or the ``compile`` mode given. Returns what was done.
    """
    device = torch.device(device)
    if device.type == "cuda":
        set_tf32(cfg.train.tf32)
    bf16 = uses_bf16(cfg.train.precision, device)
    fp8 = apply_frozen_matmul(model, cfg.train.frozen_matmul, device)
    cast = cast_frozen_weights(model, torch.bfloat16) if bf16 and cast_frozen else 0
    targets = cfg.adapter.lora.targets or model.backbone.preset.lora_targets
    recomputed = checkpoint_blocks(model.backbone.net, targets) if cfg.train.activation_checkpointing else []
    mode = compile_mode(compile or cfg.train.compile, device)
    regions = compile_classifier(model, mode, targets, **compile_kwargs)
    return {
        "bf16_autocast": bf16,
        "bf16_frozen_tensors": cast,
        "fp8_frozen_linears": len(fp8),
        "compile": mode,
        "compiled_regions": len(regions),
        "checkpointed_blocks": len(recomputed),
    }
