"""Backbone presets: the paper's six foundation models plus tiny test models, timm style (registry + factory).

Every preset builds the real architecture with random weights (timm for 2D, MONAI for 3D); real weights come
only from a local path or s3:// URI, in the formats they are published in (``molre.models.weights``); nothing
here ever touches a model hub.

A built ``Backbone`` maps a batch to one embedding per item:
  2D: ``[N, 3, H, W] -> [N, width]`` (N = B*S slices)      3D: ``[B, 3, D, H, W] -> [B, width]``
The 0..1 HU windows enter a pretrained preset scaled as its pretraining images were (``Preset.input_stats``:
ImageNet mean / std for DINOv3 and MedImageInsight, [-1, 1] for MedGemma's SigLIP) unless ``normalize=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from molre.errors import ModelError


@dataclass(frozen=True)
class Preset:
    name: str
    dims: int  # 2 = slice model (Algorithm 1), 3 = volumetric model
    width: int  # feature width d of the embedding MoLRE sees
    image_size: int  # native slice side (2D) or in-plane volume side (3D)
    depth: int  # 3D only: native number of slices (4 mm each); 0 for 2D
    domain: str  # Table 2 "Domain" column
    finetune: str  # paper protocol: "lora" (2D presets) or "full" (Pillar0-HeadCT)
    lora_targets: tuple[str, ...]  # attention linears, matched as a module-name suffix
    supports_molre: bool
    make: Callable[[Preset, int, int], nn.Module]  # (preset, image_size, depth) -> net
    weights: str  # what real checkpoint the preset expects
    project_to: int | None = None  # frozen linear projection after the net (MedImageInsight: 2048 -> 1024)
    input_stats: tuple[tuple[float, ...], ...] | None = (
        None  # the pretraining images' (mean, std) per channel
    )


class Backbone(nn.Module):
    """A net plus (optionally) a projection, returning ``[N, width]`` embeddings; knows its input contract."""

    def __init__(self, preset: Preset, image_size: int, depth: int, normalize: bool = True):
        super().__init__()
        self.preset = preset
        self.image_size = image_size
        self.depth = depth
        self.net = preset.make(preset, image_size, depth)
        native = _net_width(self.net)
        self.proj = nn.Linear(native, preset.project_to, bias=False) if preset.project_to else None
        self.normalized = normalize and preset.input_stats is not None
        if self.normalized:  # x' = (x - mean) / std per channel; buffers, not state: the config rebuilds them
            view = (1, 3) + (1,) * preset.dims  # [1, 3, 1, 1] (2D) or [1, 3, 1, 1, 1] (3D)
            mean, std = (torch.tensor(v).view(view) for v in preset.input_stats)
            self.register_buffer("input_mean", mean, persistent=False)
            self.register_buffer("input_inv_std", 1 / std, persistent=False)

    @property
    def width(self) -> int:
        return self.preset.project_to or _net_width(self.net)

    @property
    def dims(self) -> int:
        return self.preset.dims

    def expected_input(self) -> tuple[int, ...]:
        """Per-item input shape: (3, H, W) for 2D, (3, D, H, W) for 3D."""
        if self.dims == 2:
            return (3, self.image_size, self.image_size)
        return (3, self.depth, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalized:
            x = (x - self.input_mean.to(x.dtype)) * self.input_inv_std.to(x.dtype)
        feats = self.net(x)
        if isinstance(feats, tuple | list):  # MONAI ViT returns (tokens [B,T,d], hidden_states)
            feats = feats[0]
        if feats.dim() == 3:  # tokens -> mean over tokens
            feats = feats.mean(dim=1)
        return self.proj(feats) if self.proj is not None else feats


def _net_width(net: nn.Module) -> int:
    return int(getattr(net, "num_features", None) or getattr(net, "molre_width", 0))


# ---- architecture makers ---------------------------------------------------------------------------------


def _timm(name: str, **kwargs) -> Callable[[Preset, int, int], nn.Module]:
    """A timm model by name, headless (num_classes=0 -> pooled features), at the requested image size."""

    def make(preset: Preset, image_size: int, depth: int) -> nn.Module:
        # timm is imported when a net is built (as MONAI is below), not with the presets: it pulls torchvision and
        # torch._dynamo in (~3 s per process), which the sweep driver and `molre leaderboard` (preset names and
        # domains only) never need
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)

    return make


def _davit(**kwargs) -> Callable[[Preset, int, int], nn.Module]:
    def make(preset: Preset, image_size: int, depth: int) -> nn.Module:
        from timm.models.davit import DaVit

        return DaVit(num_classes=0, **kwargs)

    return make


def _monai_vit(patch: tuple[int, int, int], **kwargs) -> Callable[[Preset, int, int], nn.Module]:
    def make(preset: Preset, image_size: int, depth: int) -> nn.Module:
        from monai.networks.nets import ViT

        grid = (depth, image_size, image_size)
        if any(g % p for g, p in zip(grid, patch, strict=True)):
            raise ModelError(
                f"preset {preset.name}: volume grid {grid} is not divisible by the patch size {patch}"
            )
        net = ViT(
            in_channels=3, img_size=grid, patch_size=patch, classification=False, spatial_dims=3, **kwargs
        )
        net.molre_width = kwargs["hidden_size"]
        return net

    return make


class _DenseNetFeatures(nn.Module):
    """MONAI 3D DenseNet trunk with global average pooling: ``[B, 3, D, H, W] -> [B, C]``."""

    def __init__(self, block_config: tuple[int, ...], init_features: int, growth_rate: int):
        super().__init__()
        from monai.networks.nets import DenseNet

        net = DenseNet(
            spatial_dims=3,
            in_channels=3,
            out_channels=1,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=block_config,
        )
        self.features = net.features
        self.num_features = net.class_layers[-1].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(x)).mean(dim=(2, 3, 4))


def _densenet(**kwargs) -> Callable[[Preset, int, int], nn.Module]:
    def make(preset: Preset, image_size: int, depth: int) -> nn.Module:
        return _DenseNetFeatures(**kwargs)

    return make


# ---- the registry ----------------------------------------------------------------------------------------

_VIT = ("attn.qkv", "attn.proj")  # timm ViT / DaViT attention linears
_MONAI_VIT = ("attn.qkv", "attn.out_proj")

PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


# DINOv3's image embedding is its normed CLS token (upstream's, and Hugging Face's pooler_output); timm's default
# for the architecture is the mean of the patch tokens, so the pooling is set explicitly.
# What the pretrained nets saw: ImageNet mean / std (DINOv3; MedImageInsight's config), SigLIP's [-1, 1].
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
register(Preset("dinov3-base", 2, 768, 224, 0, "Natural", "lora", _VIT, True,
                _timm("vit_base_patch16_dinov3", global_pool="token"),
                "Meta's dinov3_vitb16 .pth, or Hugging Face's or timm's safetensors of dinov3 vitb16 lvd1689m",
                input_stats=_IMAGENET))  # fmt: skip
register(Preset("dinov3-large", 2, 1024, 224, 0, "Natural", "lora", _VIT, True,
                _timm("vit_large_patch16_dinov3", global_pool="token"),
                "Meta's dinov3_vitl16 .pth, or Hugging Face's or timm's safetensors of dinov3 vitl16 lvd1689m",
                input_stats=_IMAGENET))  # fmt: skip
# MedGemma's vision tower is SigLIP so400m/14 at its native 896^2 (4,096 patches); timm's gap variant pools
# tokens (Gemma 3 takes the tower's last hidden state without SigLIP's attention-pooling head).
register(Preset("medgemma", 2, 1152, 896, 0, "Medical", "lora", _VIT, True,
                _timm("vit_so400m_patch14_siglip_gap_896"),
                "the Hugging Face medgemma-4b checkpoint folder (its vision tower is read), or timm keys",
                input_stats=_SIGLIP))  # fmt: skip
# MedImageInsight's image encoder: DaViT dims 256/512/1024/2048, depths 1/1/9/1, window 12, 480^2, proj to 1024.
register(Preset("medimageinsight", 2, 1024, 480, 0, "Medical", "lora", _VIT, True,
                _davit(embed_dims=(256, 512, 1024, 2048), depths=(1, 1, 9, 1), num_heads=(8, 16, 32, 64),
                       window_size=12),
                "MedImageInsight image encoder (timm DaViT keys + proj.weight)", project_to=1024,
                input_stats=_IMAGENET))  # fmt: skip
# Pillar0-HeadCT stand-in: a MONAI 3D ViT of width 1152; 7 layers x 12 d^2 + embeddings = 117.48M backbone,
# 117.97M in the Table-2 setting (+ head and MoLRE; `molre params`) against the paper's 113.9M.
register(Preset("pillar0-headct", 3, 1152, 256, 32, "Head CT", "full", _MONAI_VIT, True,
                _monai_vit((4, 16, 16), hidden_size=1152, mlp_dim=4608, num_layers=7, num_heads=16),
                "Pillar0-HeadCT export converted to MONAI ViT keys"))  # fmt: skip
# DeepCNTD stand-in: MONAI 3D DenseNet (6,12,24) = 7.30M backbone, 7.38M with the head (paper 6.9M);
# attention-free, so no MoLRE.
register(Preset("deepcntd", 3, 1016, 256, 32, "Head CT", "full", (), False,
                _densenet(block_config=(6, 12, 24), init_features=32, growth_rate=32),
                "none public; a MONAI DenseNet state dict of your own"))  # fmt: skip

# Tiny models of the same architectures, for tests, CPU runs and the embedded default. tiny-vit pools the CLS token
# like the dinov3 presets; its LayerScale starts at 1, not DINOv3's 1e-5: random blocks that add 1e-5 of their
# output would leave a random CLS token (and whatever LoRA does in the blocks) ~constant across slices.
register(Preset("tiny-vit", 2, 64, 64, 0, "test", "lora", _VIT, True,
                _timm("vit_small_patch16_dinov3", embed_dim=64, depth=2, num_heads=2, global_pool="token",
                      init_values=1.0),
                "random (a 2-block, width-64 DINOv3-architecture ViT)"))  # fmt: skip
register(Preset("tiny-davit", 2, 64, 64, 0, "test", "lora", _VIT, True,
                _davit(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
                "random (a tiny DaViT with a 128 -> 64 projection)", project_to=64))  # fmt: skip
register(Preset("tiny-vit3d", 3, 48, 64, 8, "test", "full", _MONAI_VIT, True,
                _monai_vit((4, 16, 16), hidden_size=48, mlp_dim=96, num_layers=2, num_heads=2),
                "random (a 2-layer MONAI 3D ViT)"))  # fmt: skip
register(Preset("tiny-cnn3d", 3, 40, 64, 8, "test", "full", (), False,
                _densenet(block_config=(2, 2), init_features=8, growth_rate=8), "random (a tiny MONAI DenseNet)"))  # fmt: skip

PAPER_PRESETS = ("dinov3-base", "dinov3-large", "medimageinsight", "medgemma", "pillar0-headct", "deepcntd")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown backbone preset {name!r}; expected one of {sorted(PRESETS)}") from None


def create_backbone(
    name: str, image_size: int | None = None, depth: int | None = None, normalize: bool = True
) -> Backbone:
    """Build a preset's architecture (random init). Call under ``torch.device("meta")`` to build for free."""
    preset = get_preset(name)
    return Backbone(preset, image_size or preset.image_size, depth or preset.depth, normalize)
