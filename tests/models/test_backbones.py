import pytest
import torch
from safetensors.torch import save_file

from molre.errors import ModelError, WeightsError
from molre.models import PRESETS, create_backbone, get_preset, load_backbone_weights
from molre.models.backbones import PAPER_PRESETS


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_every_paper_preset_builds_on_meta_with_its_width(name):
    preset = get_preset(name)
    with torch.device("meta"):
        backbone = create_backbone(name)
    assert backbone.width == preset.width
    item = backbone.expected_input()
    x = torch.empty(1, *item, device="meta")
    assert backbone(x).shape == (1, preset.width)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny-")])
def test_tiny_presets_run_on_cpu(name):
    backbone = create_backbone(name)
    x = torch.randn(2, *backbone.expected_input())
    assert backbone(x).shape == (2, backbone.width)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ModelError, match="unknown backbone preset 'dinov4'.*dinov3-base"):
        get_preset("dinov4")


def test_weights_round_trip_safetensors_and_torch(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("tiny-vit")
    state = {f"net.{k}": v.clone() for k, v in src.net.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": src.net.state_dict()}, tmp_path / "w.pt")
    x = torch.randn(1, 3, 64, 64)
    for path in ("w.safetensors", "w.pt"):
        dst = create_backbone("tiny-vit")
        load_backbone_weights(dst, str(tmp_path / path))
        torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_a_bf16_export_loads_as_the_model_s_own_fp32(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("tiny-davit")  # has the projection too
    state = {f"net.{k}": v.to(torch.bfloat16) for k, v in src.net.state_dict().items()}
    state |= {f"proj.{k}": v.to(torch.bfloat16) for k, v in src.proj.state_dict().items()}
    save_file(state, tmp_path / "bf16.safetensors")
    with torch.no_grad():  # the source with its weights rounded to bf16, kept fp32
        for p in src.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    dst = create_backbone("tiny-davit")
    load_backbone_weights(dst, str(tmp_path / "bf16.safetensors"))
    assert {p.dtype for p in dst.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_weights_with_a_projection(tmp_path):
    src = create_backbone("tiny-davit")
    state = {**src.net.state_dict(), **{f"proj.{k}": v for k, v in src.proj.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "d.safetensors")
    dst = create_backbone("tiny-davit")
    load_backbone_weights(dst, str(tmp_path / "d.safetensors"))
    torch.testing.assert_close(dst.proj.weight, src.proj.weight)


def test_wrong_weights_list_missing_unexpected_and_misshaped_keys(tmp_path):
    state = create_backbone("tiny-vit").net.state_dict()
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(3)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    state["head.weight"] = torch.zeros(10, 64)  # a classifier head is ignored, not an error
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(create_backbone("tiny-vit"), str(tmp_path / "bad.safetensors"))
    msg = str(err.value)
    assert "missing keys: norm.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (5, 5) vs model (192, 64)" in msg
    assert "head.weight" not in msg


def test_unreadable_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone_weights(create_backbone("tiny-vit"), str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="neither safetensors nor a torch state dict"):
        load_backbone_weights(create_backbone("tiny-vit"), str(tmp_path / "junk.pt"))


def test_weights_from_s3(s3_bucket, tmp_path):
    from molre.data import storage

    src = create_backbone("tiny-vit")
    save_file(src.net.state_dict(), tmp_path / "w.safetensors")
    uri = storage.join(s3_bucket, "weights", "tiny-vit.safetensors")
    storage.write_bytes(uri, (tmp_path / "w.safetensors").read_bytes())
    dst = create_backbone("tiny-vit")
    load_backbone_weights(dst, uri)
    torch.testing.assert_close(dst.net.state_dict()["norm.weight"], src.net.state_dict()["norm.weight"])
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone_weights(dst, storage.join(s3_bucket, "weights", "missing.safetensors"))


def test_a_random_tiny_vit_s_blocks_add_almost_nothing_until_its_layer_scales_are_one():
    """The DINOv3 architecture's LayerScale init (1e-5): a random tiny-vit's features are its patch embedding's
    to ~1e-6, which is why tests of block-level behaviour use ``unit_layer_scale`` (and bench/fp8_numerics.py
    writes LayerScale-1 weights)."""
    from tests.models.helpers import unit_layer_scale

    torch.manual_seed(0)
    backbone = create_backbone("tiny-vit").eval()
    x = torch.rand(8, 3, 64, 64)

    def blocks_share() -> float:  # relative change of the features when the blocks are taken out
        with torch.no_grad():
            full, blocks = backbone(x), backbone.net.blocks
            backbone.net.blocks = torch.nn.ModuleList()
            bare = backbone(x)
            backbone.net.blocks = blocks
        return float((full - bare).norm() / full.norm())

    assert blocks_share() < 1e-5
    unit_layer_scale(backbone)
    assert blocks_share() > 0.05
