"""The assembled multi-label classifier: backbone (+LoRA) -> MoLRE -> attention pooling -> linear over 75 findings.

2D (Algorithm 1): ``[B, M, S, H, W] -> [B*S, M, H, W] -> backbone [B*S, d] -> MoLRE -> [B, S, d] -> pool [B, d]
-> linear [B, 75]``.  3D: ``[B, M, D, H, W] -> backbone [B, d] -> MoLRE (volume-level routing) -> linear``.
``forward`` returns logits; ``predict_proba`` applies the sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn

from molre.config import RunConfig
from molre.errors import ModelError
from molre.findings import NUM_FINDINGS
from molre.models.backbones import Backbone, create_backbone
from molre.models.lora import inject_lora, wrap_linears
from molre.models.molre import MoLRE
from molre.models.pooling import AttentionPooling
from molre.models.weights import load_backbone_weights


class MoLREClassifier(nn.Module):
    def __init__(self, backbone: Backbone, molre: MoLRE | None, num_classes: int = NUM_FINDINGS):
        super().__init__()
        d = backbone.width
        device = next(backbone.parameters()).device
        self.backbone = backbone
        self.molre = molre  # features placement only; blocks placement lives inside the backbone
        self.pool = AttentionPooling(d, device=device) if backbone.dims == 2 else None
        self.head = nn.Linear(d, num_classes, device=device)
        # blocks placement with route_by=slice: told how many slices (2D) / volumes (3D) each forward holds
        self._slice_routed = tuple(
            m for m in backbone.modules() if isinstance(m, MoLRE) and m.route_by == "slice"
        )

    def check_input(self, x: torch.Tensor) -> None:
        item = self.backbone.expected_input()  # (3, H, W) or (3, D, H, W)
        if x.dim() != 5:
            want = "[B, 3, S, H, W] (slices along dim 2)" if len(item) == 3 else "[B, 3, D, H, W]"
            raise ModelError(f"expected a 5-D volume batch {want}, got shape {tuple(x.shape)}")
        if x.shape[1] != item[0]:
            raise ModelError(
                f"expected {item[0]} channels (the HU windows) in dim 1, got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[3:]) if len(item) == 3 else tuple(x.shape[2:])
        if spatial != item[1:]:
            raise ModelError(
                f"backbone {self.backbone.preset.name} takes {'slices' if len(item) == 3 else 'volumes'} of "
                f"{item[1:]}, got {spatial} (input shape {tuple(x.shape)}); resample the volume grid first"
            )

    def _backbone(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._slice_routed:
            m.route_items = x.shape[0]  # one routing item per backbone item (slice, or volume in 3D)
        feats = self.backbone(x)
        for m in self._slice_routed:
            m.route_items = None
        return feats

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Volume embeddings ``[B, d]`` before the classifier."""
        self.check_input(x)
        if self.backbone.dims == 3:
            feats = self._backbone(x)  # [B, d]
            return self.molre(feats) if self.molre is not None else feats
        b, m, s, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * s, m, h, w)  # [B*S, M, H, W]
        feats = self._backbone(slices)  # [B*S, d]
        if self.molre is not None:
            feats = self.molre(feats)  # slice-level routing
        return self.pool(feats.reshape(b, s, -1))  # [B, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

    def molre_modules(self) -> list[MoLRE]:
        return [m for m in self.modules() if isinstance(m, MoLRE)]

    def aux_loss(self) -> torch.Tensor | None:
        """Mean load-balancing loss of the last forward over all MoLRE modules (None without MoLRE)."""
        losses = [m.last_balance_loss for m in self.molre_modules() if m.last_balance_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def router_weights(self, in_blocks: bool = False) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """Last routing weights of the features-level MoLRE: ``[B, S, K]`` (2D) or ``[B, K]`` (3D); None
        without it (LoRA only, or placement=blocks).

        ``in_blocks``: those of the MoLRE adapters inside the backbone (placement=blocks) that route by slice,
        ``{module name: [B, S, K] (2D) or [B, K] (3D)}``, one gate per slice (volume) in every adapted linear.
        Adapters with route_by=token are left out: they gate each token (``[rows, tokens, K]``), not a slice.
        """
        if in_blocks:
            attention = self.slice_attention()  # 2D: [B, S] of the last forward; its gates are [B*S, K]
            gates = {
                name: m.last_router_weights
                for name, m in self.backbone.named_modules(prefix="backbone")
                if isinstance(m, MoLRE) and m.route_by == "slice" and m.last_router_weights is not None
            }
            if attention is None:  # 3D: one gate per volume, [B, K]
                return gates
            return {name: g.reshape(*attention.shape, -1) for name, g in gates.items()}
        if self.molre is None or self.molre.last_router_weights is None:
            return None
        g = self.molre.last_router_weights
        if self.backbone.dims == 2 and self.pool.last_attention is not None:
            return g.reshape(*self.pool.last_attention.shape, -1)
        return g

    def slice_attention(self) -> torch.Tensor | None:
        return self.pool.last_attention if self.pool is not None else None


def build_model(cfg: RunConfig, load_weights: bool = True) -> MoLREClassifier:
    """Build the classifier of a run config: backbone, weights, freezing, LoRA, MoLRE, pooling, head.

    Build under ``torch.device("meta")`` (with ``load_weights=False``) to count parameters at no memory cost.
    """
    bcfg, acfg = cfg.backbone, cfg.adapter
    backbone = create_backbone(bcfg.preset, bcfg.image_size, cfg.data.num_slices, bcfg.normalize)
    preset = backbone.preset
    if load_weights and bcfg.weights:  # "{preset}" in the URI lets one sweep give every preset its own file
        load_backbone_weights(backbone, bcfg.weights.replace("{preset}", preset.name))
    finetune = bcfg.finetune or preset.finetune
    backbone.requires_grad_(finetune == "full")
    use_molre = acfg.kind == "molre"
    if use_molre and not preset.supports_molre:
        raise ModelError(
            f"preset {preset.name} cannot take MoLRE: it is attention-free (no attention pooling), as in the paper; "
            "use adapter.kind=none"
        )
    blocks_molre = use_molre and acfg.molre.placement == "blocks"
    if finetune == "lora" or blocks_molre:
        if not preset.lora_targets and not acfg.lora.targets:
            raise ModelError(
                f"preset {preset.name} has no attention linears for LoRA; use backbone.finetune=full or frozen"
            )
        targets = acfg.lora.targets or preset.lora_targets
        if blocks_molre:  # MoLRE in place of LoRA inside the attention linears (beyond the paper)
            m = acfg.molre
            names = wrap_linears(
                backbone.net,
                targets,
                acfg.lora.blocks,
                lambda lin: _molre_linear(lin, m, acfg.lora.alpha),
                "MoLRE",
            )
            # route_by=slice: an attention over whole slices sees one row per slice (windowed ones learn their
            # rows per slice at the first forward); set now, a compiled block never sees it change
            for name in names:
                if "window" not in type(backbone.net.get_submodule(name.rpartition(".")[0])).__name__.lower():
                    backbone.net.get_submodule(name).rows_per_item = 1
        else:
            lora = acfg.lora
            inject_lora(backbone.net, targets, lora.rank, lora.alpha, lora.dropout, lora.blocks)
    features_molre = None
    if use_molre and not blocks_molre:
        m = acfg.molre
        device = next(backbone.parameters()).device
        features_molre = MoLRE(
            backbone.width, experts=m.experts, rank=m.rank, router_hidden=m.router_hidden,
            top_k=m.top_k, dropout=m.dropout, device=device,
        )  # fmt: skip
    return MoLREClassifier(backbone, features_molre)


def _molre_linear(lin: nn.Linear, m, lora_alpha: float) -> MoLRE:
    """A MoLRE adapter wrapping one frozen attention linear (scale alpha / r, as the LoRA it replaces)."""
    lin.requires_grad_(False)
    return MoLRE(
        lin.in_features, lin.out_features, experts=m.experts, rank=m.rank, router_hidden=m.router_hidden,
        base_layer=lin, top_k=m.top_k, scale=lora_alpha / m.rank, dropout=m.dropout, device=lin.weight.device,
        route_by=m.route_by,
    )  # fmt: skip


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by optimizer group, found by name (peft style).

    adapter: LoRA (``lora_``) and MoLRE (``molre.`` or MoLRE inside blocks: ``.A``/``.B``/``.router.``);
    head: attention pooling and the classifier; backbone: everything else that trains (finetune=full).
    """
    groups: dict[str, list[nn.Parameter]] = {"head": [], "adapter": [], "backbone": []}
    molre_names = {f"{n}.{p}" for n, mod in model.named_modules() if isinstance(mod, MoLRE) for p, _ in mod.named_parameters()
                   if not p.startswith("base_layer.")}  # fmt: skip
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name or name in molre_names:
            groups["adapter"].append(param)
        elif name.startswith(("pool.", "head.")):
            groups["head"].append(param)
        else:
            groups["backbone"].append(param)
    return groups
