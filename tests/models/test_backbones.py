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


@pytest.mark.parametrize("name", ["dinov3-base", "dinov3-large", "tiny-vit"])
def test_dinov3_presets_embed_a_slice_as_its_normed_cls_token(name):
    with torch.device("meta"):
        assert create_backbone(name).net.global_pool == "token"  # upstream DINOv3's embedding, not timm's avg


def test_tiny_vit_embeds_the_cls_token_and_its_random_blocks_count():
    """tiny-vit's LayerScale starts at 1: at DINOv3's 1e-5 init a random net's blocks add ~1e-5 of their output,
    and its CLS token (and whatever LoRA / MoLRE / FP8 do in the blocks) would be ~the same for every slice."""
    torch.manual_seed(0)
    backbone = create_backbone("tiny-vit").eval()
    x = torch.rand(8, 3, 64, 64)
    with torch.no_grad():
        features = backbone(x)
        torch.testing.assert_close(features, backbone.net.forward_features(x)[:, 0])
        blocks, backbone.net.blocks = backbone.net.blocks, torch.nn.ModuleList()
        bare = backbone(x)  # the CLS token without the blocks: the same for every slice
        backbone.net.blocks = blocks
    assert float((bare - bare[0]).abs().max()) == 0
    assert float(features.std(dim=0).mean()) > 0.01  # with them, slices differ
