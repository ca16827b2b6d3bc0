"""Shared set-up for model tests."""

from __future__ import annotations

import torch
from torch import nn


def unit_layer_scale(model: nn.Module) -> nn.Module:
    """Every LayerScale of ``model`` set to 1, in place (trained weights have theirs far from the 1e-5 init).

    timm's DINOv3 architecture (``tiny-vit`` and the dinov3 presets) initialises LayerScale at 1e-5: a random
    tiny-vit's blocks add ~1e-5 of their output to the residual stream, so whatever happens inside them (LoRA,
    MoLRE in the blocks, FP8 products, compiled regions) changes its output by ~1e-6 relative, below the
    tolerances tests compare with. Timm names them ``gamma_1`` / ``gamma_2`` (Eva) or ``ls1.gamma``."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2"):
                param.fill_(1.0)
    return model
