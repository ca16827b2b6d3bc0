import pytest
import torch

from molre.config import build_config
from molre.errors import ModelError
from molre.findings import NUM_FINDINGS
from molre.models import build_model, parameter_groups
from molre.models.lora import LoRALinear


def _model(**tree):
    return build_model(build_config(tree))


def test_2d_pipeline_forward_backward_on_cpu():
    torch.manual_seed(0)
    model = _model(backbone={"preset": "tiny-vit"})
    x = torch.rand(2, 3, 8, 64, 64)  # [B, M, S, H, W]
    logits = model(x)
    assert logits.shape == (2, NUM_FINDINGS)
    logits.sum().backward()
    groups = parameter_groups(model)
    assert all(p.grad is not None for g in ("head", "adapter") for p in groups[g])
    assert groups["backbone"] == []  # LoRA fine-tuning: the backbone's own weights stay frozen
    assert model.router_weights().shape == (2, 8, 6)  # [B, S, K]
    assert model.slice_attention().shape == (2, 8)
    torch.testing.assert_close(model.slice_attention().sum(-1), torch.ones(2))


def test_2d_slices_are_independent_items_of_the_backbone():
    torch.manual_seed(0)
    model = _model(backbone={"preset": "tiny-vit"}).eval()
    x = torch.rand(2, 3, 4, 64, 64)
    model(x)
    routed = model.molre.last_router_weights
    assert routed.shape == (8, 6)  # B*S rows, volume-major
    feats = model.backbone(x[1, :, 2].unsqueeze(0))  # volume 1, slice 2 alone
    torch.testing.assert_close(routed[1 * 4 + 2], model.molre.route(feats)[0].detach(), rtol=1e-4, atol=1e-5)


def test_3d_pipeline_and_deepcntd_refuses_molre():
    model = _model(backbone={"preset": "tiny-vit3d"})
    x = torch.rand(2, 3, 8, 64, 64)
    out = model(x)
    assert out.shape == (2, NUM_FINDINGS)
    out.sum().backward()
    assert model.router_weights().shape == (2, 6)  # volume-level routing
    cnn = _model(backbone={"preset": "tiny-cnn3d"}, adapter={"kind": "none"})
    assert cnn(x).shape == (2, NUM_FINDINGS)
    with pytest.raises(ModelError, match="attention-free"):
        _model(backbone={"preset": "tiny-cnn3d"})


def test_lora_only_and_blocks_placement():
    base = _model(backbone={"preset": "tiny-vit"}, adapter={"kind": "none"})
    assert base.molre is None and any(isinstance(m, LoRALinear) for m in base.modules())
    blocks = _model(backbone={"preset": "tiny-vit"}, adapter={"molre": {"placement": "blocks", "top_k": 2}})
    assert blocks.molre is None
    assert not any(isinstance(m, LoRALinear) for m in blocks.modules())
    assert len(blocks.molre_modules()) == 4  # 2 blocks x (qkv, proj)
    blocks(torch.rand(1, 3, 2, 64, 64)).sum().backward()
    assert blocks.aux_loss() is not None
    assert all(not m.base_layer.weight.requires_grad for m in blocks.molre_modules())


def test_bad_inputs_say_what_was_expected():
    model = _model(backbone={"preset": "tiny-vit"})
    with pytest.raises(ModelError, match=r"5-D volume batch \[B, 3, S, H, W\]"):
        model(torch.rand(3, 8, 64, 64))
    with pytest.raises(ModelError, match="expected 3 channels"):
        model(torch.rand(1, 1, 8, 64, 64))
    with pytest.raises(ModelError, match=r"takes slices of \(64, 64\), got \(32, 32\)"):
        model(torch.rand(1, 3, 8, 32, 32))
    with pytest.raises(ModelError, match="not divisible by the patch size"):
        _model(backbone={"preset": "tiny-vit3d"}, data={"num_slices": 6})


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-davit"])
def test_blocks_placement_routes_each_slice_once_by_default(preset):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 3, 64, 64)
    for route_by, per_module in (("slice", (6, 6)), ("token", None)):
        model = _model(
            backbone={"preset": preset}, adapter={"molre": {"placement": "blocks", "route_by": route_by}}
        )
        model.eval()
        if (
            route_by == "slice" and preset == "tiny-vit"
        ):  # whole-slice attention: one row per slice, known up front
            assert {m.rows_per_item for m in model.molre_modules()} == {1}
        with torch.no_grad():
            for m in model.molre_modules():
                m.B.normal_(0, 0.1)
            out = model(x)
            shapes = {tuple(m.last_router_weights.shape) for m in model.molre_modules()}
            if per_module:  # one gate per slice (B*S = 6) in every adapted linear, DaViT's windowed ones too
                assert shapes == {per_module}
                assert all(m.route_items is None for m in model.molre_modules())  # reset after the forward
            else:
                assert all(len(s) == 3 and s[0] >= 6 for s in shapes)  # [rows, tokens, K]
            # slices stay independent items: volume 1 alone gives the same logits
            torch.testing.assert_close(model(x[1:])[0], out[1], rtol=1e-4, atol=1e-5)
