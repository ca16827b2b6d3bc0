"""Mixture of Low-Rank Experts (paper Eq. 1-2).

    h = W0 x + scale * sum_i g_i(x) * B_i A_i x,      g(x) = softmax(W2 relu(W1 x + b1) + b2)

``W0`` is frozen: the wrapped linear (``blocks`` placement) or the identity (``features`` placement, where the
backbone gives no projection). The K experts are one batched contraction over stacked ``A [K, r, d]`` and
``B [K, d_out, r]``: x @ A_flat^T -> [N, K*r], gate each rank-r slice by g_k, then @ B_flat^T -> [N, d_out].

Parameter count (d = d_out): experts K*(r*d + d*r), router d*d_h + d_h + d_h*K + K.
At d=768, K=6, r=8, d_h=256: 73,728 + 198,406 = 272,134 (paper Table 2: 0.28M).

Routing granularity (``route_by``). On slice features ``[B*S, d]`` (``features`` placement, the paper) every row
is a slice, so the gate is per slice either way. Inside the backbone (``blocks`` placement) the wrapped linear sees
tokens ``[B*S, T, d]``. Forward FLOPs per token of ViT-B/16 (d=768, T=201 at 224^2), per block: frozen linears
2*(3d^2 + d^2 + 8d^2) = 14.2M + attention 4*T*d = 0.6M, ~14.8M; LoRA r=8 on qkv + proj 2*8*(4d + 2d) = 74k.
- ``token``: ``g`` per token. The router costs 2*(d*d_h + d_h*K) = 396k per token and adapted linear (8x the
  qkv LoRA update), 793k per block for qkv + proj; the K experts 6 * 74k = 442k. Counted forward + backward
  (``bench/run.py --cases flops``): +11.4% over LoRA on dinov3-base, +8.7% dinov3-large, +4.4% medgemma.
- ``slice``: ``g`` once per slice from the mean of the T tokens entering the linear, broadcast over them (the
  paper's per-slice routing, taken inside the backbone). The router's cost drops by T (793k / 201 = 4k per token
  and block); the K-expert update stays (442k, 6x LoRA's). Counted: +3.7% over LoRA on dinov3-base, +2.8%
  dinov3-large, +1.4% medgemma. Which tokens form a slice: the classifier sets ``route_items`` (slices in the
  forward); the module derives and keeps ``rows_per_item``, the leading rows per slice (1 for ViTs; the windows
  of a slice in DaViT's window attention, which sees ``[B*S*windows, t, d]`` batch-major; fixed for a layer at
  the model's input size), so later forwards read no batch-dependent int (a compiled block is not recompiled
  per batch size). The zero padding of a DaViT stage whose side is not a multiple of the window joins the mean.
  Called directly before any classifier forward, a module takes each leading index as a slice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from molre.errors import ModelError


class MoLRE(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int | None = None,
        experts: int = 6,
        rank: int = 8,
        router_hidden: int = 256,
        base_layer: nn.Module | None = None,
        top_k: int | None = None,
        scale: float = 1.0,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        route_by: str = "token",
    ):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if base_layer is None and d_out != d_in:
            raise ModelError(
                f"MoLRE without a base layer uses W0 = identity, so d_out ({d_out}) must equal d_in ({d_in})"
            )
        if top_k is not None and not 0 < top_k <= experts:
            raise ModelError(f"MoLRE top_k={top_k} must be in 1..{experts}")
        if route_by not in ("token", "slice"):
            raise ModelError(f"MoLRE route_by={route_by!r} must be 'token' or 'slice'")
        self.d_in, self.d_out, self.experts, self.rank = d_in, d_out, experts, rank
        self.top_k, self.scale, self.route_by = top_k, scale, route_by
        # route_by=slice: slices in the current forward (set by the classifier) -> leading rows per slice
        self.route_items: int | None = None
        self.rows_per_item: int | None = None
        self.base_layer = base_layer if base_layer is not None else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(experts, rank, d_in, device=device))  # [K, r, d]
        self.B = nn.Parameter(
            torch.zeros(experts, d_out, rank, device=device)
        )  # [K, d_out, r], zero: h = W0 x
        self.router = nn.Sequential(  # Eq. 2: W1 [d_h, d], b1, W2 [K, d_h], b2
            nn.Linear(d_in, router_hidden, device=device),
            nn.ReLU(),
            nn.Linear(router_hidden, experts, device=device),
        )
        if self.A.device.type != "meta":
            for k in range(experts):  # each expert's A initialised like a LoRA A
                nn.init.kaiming_uniform_(self.A.data[k], a=math.sqrt(5))
        self.last_router_weights: torch.Tensor | None = None  # [..., K] ([items, K] by slice), detached
        self.last_balance_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Mixing weights ``g(x)`` ``[..., K]`` (softmax; with top_k, renormalised over the k largest)."""
        g = F.softmax(self.router(x), dim=-1)
        if self.top_k is not None and self.top_k < self.experts:
            top = torch.topk(g, self.top_k, dim=-1)
            g = torch.zeros_like(g).scatter(-1, top.indices, top.values)
            g = g / g.sum(dim=-1, keepdim=True)
        return g

    def expert_delta(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``sum_i g_i B_i A_i x`` for ``x [..., d]``, ``g [..., K]`` in two matmuls (no loop over experts)."""
        K, r = self.experts, self.rank
        z = self.dropout(x) @ self.A.reshape(K * r, self.d_in).t()  # [..., K*r]
        z = (z.unflatten(-1, (K, r)) * g.unsqueeze(-1)).flatten(-2)  # gate each expert's rank-r code
        b_flat = self.B.permute(1, 0, 2).reshape(self.d_out, K * r)  # [d_out, K*r], column k*r+j = B[k, :, j]
        return z @ b_flat.t()  # [..., d_out]

    def route_slices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice gates for tokens ``x [M, T, d]``: ``(g [items, K], g broadcastable to x [M, 1, K])``.

        The router sees each slice's mean token (``[items, d]``): 2*(d*d_h + d_h*K) FLOPs per slice, not per token.
        """
        m = x.shape[0]
        if self.rows_per_item is None and self.route_items is not None:
            if m % self.route_items:
                raise ModelError(f"MoLRE routes by slice over {self.route_items} slices, but its input has "
                                 f"{m} rows (shape {tuple(x.shape)})")  # fmt: skip
            self.rows_per_item = m // self.route_items  # fixed for this layer at the model's input size
        rows = self.rows_per_item or 1
        if m % rows:
            raise ModelError(f"MoLRE routes by slice over groups of {rows} rows, but its input has {m} rows")
        g = self.route(x.reshape(m // rows, -1, self.d_in).mean(dim=1))  # [items, K]
        per_row = g if rows == 1 else g.repeat_interleave(rows, dim=0)  # [M, K]
        return g, per_row.reshape(m, *([1] * (x.dim() - 2)), self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ModelError(f"MoLRE expects features of width {self.d_in}, got shape {tuple(x.shape)}")
        if self.route_by == "slice" and x.dim() > 2:
            g, g_x = self.route_slices(x)
        else:  # per row: a token (blocks, route_by=token) or a slice / volume (features placement)
            g = g_x = self.route(x)
        self.last_router_weights = g.detach()
        self.last_balance_loss = balance_loss(g, self.experts)
        return self.base_layer(x) + self.scale * self.expert_delta(x, g_x)


def balance_loss(g: torch.Tensor, experts: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``K * sum_i f_i * P_i`` over all routed items (1.0 when uniform).

    f_i: fraction of items whose largest weight is expert i (no gradient); P_i: mean routing weight of expert i.
    """
    g = g.reshape(-1, experts)
    f = F.one_hot(g.argmax(dim=-1), experts).to(g.dtype).mean(dim=0)
    return experts * (f * g.mean(dim=0)).sum()


def molre_param_count(
    d: int, experts: int = 6, rank: int = 8, router_hidden: int = 256, d_out: int | None = None
) -> int:
    """Closed form of the module's parameter count (the test checks it against ``numel``)."""
    d_out = d if d_out is None else d_out
    return (
        experts * rank * (d + d_out) + d * router_hidden + router_hidden + router_hidden * experts + experts
    )
