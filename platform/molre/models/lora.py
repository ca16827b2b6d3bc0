"""LoRA in a backbone's attention linears, peft style: the adapter wraps and keeps ``base_layer``.

``h = W0 x + (alpha / r) * B A x`` with ``A [r, d_in]`` (Kaiming-uniform), ``B [d_out, r]`` (zeros), so a freshly
injected model computes exactly what the base model did. Parameter names (``lora_A``/``lora_B``) follow peft,
and ``tests/models/test_lora.py`` checks the output equals peft's LoRA for the same weights.
Per adapted linear: r * (d_in + d_out) parameters, e.g. ViT-B qkv: 8 * (768 + 2304) = 24,576.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from molre.errors import ModelError


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device)
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init
            nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def find_attention_linears(
    model: nn.Module, targets: tuple[str, ...] | list[str], blocks: str | list[int] = "all"
) -> list[str]:
    """Names of ``nn.Linear`` modules whose name ends with a target suffix, in the chosen blocks.

    Blocks are numbered in module order by the prefix before the matched suffix (``blocks.3.attn.qkv`` and
    ``blocks.3.attn.proj`` share block 3; DaViT's ``stages.s.blocks.b.i`` numbering is flattened the same way).
    """
    matched: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        for target in targets:
            if isinstance(module, nn.Linear) and (name == target or name.endswith("." + target)):
                matched.append((name, name[: -len(target)].rstrip(".")))
    prefixes = list(dict.fromkeys(prefix for _, prefix in matched))
    block_of = {prefix: i for i, prefix in enumerate(prefixes)}
    if blocks != "all":
        bad = [b for b in blocks if not -len(prefixes) <= b < len(prefixes)]
        if bad:
            raise ModelError(
                f"LoRA blocks {bad} out of range: the model has {len(prefixes)} attention blocks"
            )
        wanted = {b % len(prefixes) for b in blocks}
        matched = [(n, p) for n, p in matched if block_of[p] in wanted]
    return [name for name, _ in matched]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_linears(
    model: nn.Module, targets, blocks, wrap: Callable[[nn.Linear], nn.Module], what: str = "LoRA"
) -> list[str]:
    """Replace each matched attention linear by ``wrap(linear)``; returns the wrapped names."""
    names = find_attention_linears(model, targets, blocks)
    if not names:
        raise ModelError(
            f"{what}: no nn.Linear matches targets {list(targets)} in {type(model).__name__}; "
            f"attention linears look like {_example_linears(model)}"
        )
    for name in names:
        replace_module(model, name, wrap(model.get_submodule(name)))
    return names


def inject_lora(
    model: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0, blocks="all"
) -> list[str]:
    """Wrap the targeted attention linears of ``model`` with LoRA adapters in place."""
    return wrap_linears(model, targets, blocks, lambda lin: LoRALinear(lin, rank, alpha, dropout))


def _example_linears(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    attn = [n for n in names if re.search(r"attn|attention", n)]
    return (attn or names)[:4]
