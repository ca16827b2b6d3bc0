"""Attention pooling over slices (Algorithm 1, lines 5-8).

``alpha = softmax(q F^T / sqrt(d))`` over the S slices of each volume, ``h = alpha F``: ``[B, S, d] -> [B, d]``.
One learnable query ``q`` of d parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AttentionPooling(nn.Module):
    def __init__(self, d: int, device=None):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(d, device=device))
        if self.query.device.type != "meta":
            nn.init.normal_(self.query, std=0.02)
        self.last_attention: torch.Tensor | None = None  # [B, S], detached

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        scores = feats @ self.query / math.sqrt(feats.shape[-1])  # [B, S]
        alpha = torch.softmax(scores, dim=-1)
        self.last_attention = alpha.detach()
        return torch.einsum("bs,bsd->bd", alpha, feats)
