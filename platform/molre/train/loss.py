"""Multi-label focal loss (Lin et al. 2017) with prevalence-based per-class alpha and an unknown-label mask.

    FL = alpha_t * (1 - p_t)^gamma * BCE(logit, y),   alpha_t = alpha_c if y = 1 else 1 - alpha_c

``alpha_c`` is one scalar for all classes (torchvision's ``sigmoid_focal_loss``) or per class from the training
prevalence: ``alpha_c = clip(1 - prevalence_c, lo, hi)``, so rare findings weigh their positives more.
Findings a source does not annotate (``known == 0``) contribute nothing; the loss is the mean over known entries.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def prevalence_alpha(labels: np.ndarray, known: np.ndarray | None = None, clip=(0.25, 0.95)) -> np.ndarray:
    """Per-class alpha ``[C]`` from a ``[N, C]`` 0/1 label matrix (unknown entries excluded from prevalence)."""
    labels = np.asarray(labels, dtype=np.float64)
    known = np.ones_like(labels) if known is None else np.asarray(known, dtype=np.float64)
    prevalence = (labels * known).sum(0) / np.maximum(known.sum(0), 1.0)
    return np.clip(1.0 - prevalence, clip[0], clip[1]).astype(np.float32)


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, alpha: float | np.ndarray | torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        if alpha is None or isinstance(alpha, float | int):
            self.alpha_scalar = None if alpha is None else float(alpha)
            self.register_buffer("alpha", None)
        else:
            self.alpha_scalar = None
            self.register_buffer("alpha", torch.as_tensor(np.asarray(alpha), dtype=torch.float32))

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-entry focal loss ``[B, C]`` (float32 for stable bf16 training)."""
        logits, targets = logits.float(), targets.float()
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * (1 - p_t) ** self.gamma
        alpha = self.alpha if self.alpha is not None else self.alpha_scalar
        if alpha is not None:
            loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
        return loss

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss = self.elementwise(logits, targets)
        if known is None:
            return loss.mean()
        known = known.float()
        return (loss * known).sum() / known.sum().clamp_min(1.0)
