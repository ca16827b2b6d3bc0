"""FP8 (e4m3) matrix products for a frozen backbone's linears (``train.frozen_matmul=fp8``).

QLoRA trains LoRA on a 4-bit frozen base; this keeps the frozen base at 8 bits so that its products run on FP8
tensor cores (~2x the bf16 rate on an H100). A frozen linear costs two products per step, the forward
``y = x W^T`` and the input gradient ``dx = dy W``, and no weight gradient, so nothing of ``x`` is kept for
the backward. Both are ``torch._scaled_mm`` on e4m3 operands with row-wise fp32 scales (dequantised value =
e4m3 value x scale), accumulated in fp32, written in bf16 and handed on in the autocast dtype or the input's:

- ``W [N, K]`` is quantised once, at conversion, in both layouts the two products read: per output row for the
  forward (``[N, K]``, scales ``[N, 1]``) and per input column for the backward (``W^T [K, N]``, scales
  ``[K, 1]``): 2 x N x K bytes, what one bf16 copy took. ViT-B: 85M frozen linear weights -> 170 MB.
- ``x [M, K]`` and ``dy [M, N]`` are quantised per row at every call: ``scale`` = the power of two at or above
  ``amax(row) / 448`` (448 = e4m3's largest value), ``q = v / scale`` (exact: a power of two), then rounded to
  e4m3, which keeps 3 mantissa bits (<= 2^-4 relative rounding per element; ``tests/models/test_fp8.py`` bounds
  the products' error). Power-of-two scales and fast accumulation for the forward product (not for the gradient)
  are torchao's row-wise float8 training recipe.

Checkpoints hold only the trainable weights, so nothing FP8 is saved: ``molre evaluate`` / ``predict`` rebuild
the base from its weights file and score on the exact base (under the run's precision: bf16 autocast for a bf16
run); validation inside training (and the feature cache of a multi-fidelity sweep) sees the FP8 base.

cuBLAS wants every dimension of both operands to be a multiple of 16: linears whose features are not stay in
bf16, and a row count (tokens) that is not is zero-padded for the product. GPUs without FP8 tensor cores (compute
capability < 8.9) are refused. On CPU the products run too (slowly): the numerics are tested there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from molre.errors import ModelError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
_ALIGN = 16  # cuBLAS: both dimensions of each FP8 operand are multiples of 16


def quantize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v [M, K]`` -> (e4m3 ``[M, K]``, fp32 power-of-two scales ``[M, 1]``) with ``v ~ q * scale`` row by row.

    Each row's largest magnitude lands in [224, 448] (after rounding); a row of zeros gets a tiny scale and
    zeros."""
    amax = v.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (v.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def _pad_rows(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows appended up to a multiple of 16 (scale 1 for them); the product's extra rows are dropped."""
    extra = -q.shape[0] % _ALIGN
    if extra == 0:
        return q, scale
    q = torch.cat([q, q.new_zeros(extra, q.shape[1])])
    return q, torch.cat([scale, scale.new_ones(extra, 1)])


def scaled_matmul(
    a: torch.Tensor,
    b_rows: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``a [M, K] @ B^T`` for a pre-quantised ``B [N, K]`` (e4m3, row scales ``[N, 1]``), in ``out_dtype``.

    ``a`` is quantised per row here; ``b_rows.t()`` is the column-major ``[K, N]`` operand cuBLAS wants. The
    product is written in bf16 (cuBLAS's row-wise scaled kernels write only bf16), then cast to ``out_dtype``:
    that rounding (2^-9) is far below e4m3's (2^-4)."""
    rows = a.shape[0]
    with torch.autocast(a.device.type, enabled=False):  # autocast has no rules for e4m3 tensors
        q, scale = _pad_rows(*quantize_rows(a))
        out = torch._scaled_mm(q, b_rows.t(), scale_a=scale, scale_b=b_scale.t(), out_dtype=torch.bfloat16,
                               use_fast_accum=fast_accum)  # fmt: skip
    return out[:rows].to(out_dtype)


class _FrozenFp8Matmul(torch.autograd.Function):
    """``y = x W^T`` for a frozen W held as e4m3 in both layouts; backward gives ``dx`` only."""

    @staticmethod
    def forward(ctx, x, w, w_scale, w_t, w_t_scale, out_dtype):
        ctx.save_for_backward(w_t, w_t_scale)  # frozen weights only: x is not needed for dx
        ctx.x_dtype = x.dtype
        return scaled_matmul(x, w, w_scale, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        w_t, w_t_scale = ctx.saved_tensors
        dx = scaled_matmul(dy.contiguous(), w_t, w_t_scale, dy.dtype) if ctx.needs_input_grad[0] else None
        return (dx.to(ctx.x_dtype) if dx is not None else None), None, None, None, None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would give here: autocast's (bf16) inside autocast, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


class FrozenFp8Linear(nn.Module):
    """Drop-in for a frozen ``nn.Linear``: the weight as e4m3 in both layouts (non-persistent buffers), the bias
    as it was (a ``Parameter``, trainable or not)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        w, w_scale = quantize_rows(weight)  # [N, K], per output feature
        w_t, w_t_scale = quantize_rows(weight.t().contiguous())  # [K, N], per input feature
        for name, t in (("weight_fp8", w), ("weight_scale", w_scale), ("weight_t_fp8", w_t),
                        ("weight_t_scale", w_t_scale)):  # fmt: skip
            self.register_buffer(name, t, persistent=False)  # derived from the checkpoint's weights
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = _out_dtype(x)
        flat = x.reshape(-1, self.in_features)
        y = _FrozenFp8Matmul.apply(
            flat, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale, out_dtype
        )
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def fp8_eligible(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass such as ``nn.MultiheadAttention``'s out_proj, whose weight its owner
    reads directly) with a frozen weight and both feature counts multiples of 16."""
    return (
        type(module) is nn.Linear
        and not module.weight.requires_grad
        and module.in_features % _ALIGN == 0
        and module.out_features % _ALIGN == 0
    )


def check_fp8_device(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ModelError(
            f"train.frozen_matmul=fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); "
            f"{name} has {torch.cuda.get_device_capability(device)}"
        )


def apply_frozen_matmul(model: nn.Module, setting: str, device: torch.device | str) -> list[str]:
    """``train.frozen_matmul`` for a model on ``device``: ``fp8`` converts its frozen linears (after checking the
    device has FP8 tensor cores) and returns their names; ``auto`` leaves it as it is."""
    if setting != "fp8":
        return []
    check_fp8_device(device)
    return convert_frozen_linears(model)


def convert_frozen_linears(model: nn.Module) -> list[str]:
    """Replace every eligible frozen linear of ``model`` by a ``FrozenFp8Linear``, in place; returns their names.

    Run it on the model on its device, before DDP wraps it: DDP is told to leave the FP8 buffers alone (every
    rank derives the same ones from the same weights; by default it would broadcast buffers at every forward).
    """
    names = [name for name, module in model.named_modules() if name and fp8_eligible(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FrozenFp8Linear(getattr(parent, child)))
    ignored = [
        f"{n}.{b}" for n in names for b in ("weight_fp8", "weight_scale", "weight_t_fp8", "weight_t_scale")
    ]
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return names
