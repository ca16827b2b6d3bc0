import copy

import pytest
import timm
import torch
from peft import LoraConfig, inject_adapter_in_model

from molre.errors import ModelError
from molre.models.lora import LoRALinear, find_attention_linears, inject_lora


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=3, num_heads=2, num_classes=0
    )


def test_fresh_lora_is_identity_and_wraps_base_layer():
    model = _tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    names = inject_lora(model, ("attn.qkv", "attn.proj"), rank=4, alpha=8)
    assert names == [f"blocks.{b}.attn.{n}" for b in range(3) for n in ("qkv", "proj")]
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert isinstance(model.blocks[0].attn.qkv.base_layer, torch.nn.Linear)
    torch.testing.assert_close(model(x), before)


def test_matches_peft_lora_for_the_same_weights():
    ours, theirs = _tiny_vit().eval(), None
    theirs = copy.deepcopy(ours)
    inject_lora(ours, ("attn.qkv", "attn.proj"), rank=4, alpha=16)
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=16, target_modules=["qkv", "proj"]), theirs)
    g = torch.Generator().manual_seed(1)
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            peft_layer = theirs.get_submodule(name)
            with torch.no_grad():
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g))
                peft_layer.lora_A["default"].weight.copy_(module.lora_A.weight)
                peft_layer.lora_B["default"].weight.copy_(module.lora_B.weight)
    x = torch.randn(2, 3, 32, 32)
    out = ours(x)
    assert not torch.allclose(out, _tiny_vit().eval()(x))  # the adapters do change the output
    torch.testing.assert_close(out, theirs(x), rtol=1e-5, atol=1e-5)


def test_block_selection_and_parameter_count():
    model = _tiny_vit()
    assert find_attention_linears(model, ("attn.qkv",), blocks=[0, -1]) == [
        "blocks.0.attn.qkv",
        "blocks.2.attn.qkv",
    ]
    inject_lora(model, ("attn.qkv",), rank=4, alpha=8, blocks=[1])
    lora = [p.numel() for n, p in model.named_parameters() if "lora_" in n]
    assert sum(lora) == 4 * (32 + 96)  # r * (d_in + d_out) for one qkv


def test_no_match_and_bad_block_are_clear_errors():
    with pytest.raises(ModelError, match="no nn.Linear matches"):
        inject_lora(_tiny_vit(), ("attn.query",), rank=4, alpha=8)
    with pytest.raises(ModelError, match="out of range"):
        inject_lora(_tiny_vit(), ("attn.qkv",), rank=4, alpha=8, blocks=[5])
