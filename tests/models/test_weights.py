"""Backbone checkpoints in the formats they are published in, checked against the reference implementations.

Each format's test saves random weights the way its publisher's code does (Hugging Face ``save_pretrained``, a
flat torch file for Meta's DINOv3 release) and compares the molre backbone's embedding with the reference
model's on the same input: a key mapped to the wrong place, a transposed or mis-ordered q / k / v, or a lost
bias shows up as a different embedding, not only as a key-name error.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers  # the reference implementations (dev extra)
from safetensors.torch import load_file, save_file

from molre.errors import WeightsError
from molre.models import PRESETS, Backbone, create_backbone, get_preset, load_backbone_weights
from molre.models.backbones import _timm
from molre.models.weights import Checkpoint, detect_format, read_state_dict

# tiny-vit is a DINOv3-architecture ViT: width 64, 2 blocks, 2 heads, 4 registers, MLP 4x, patch 16, 64^2
DINOV3_TINY = dict(
    hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2, num_register_tokens=4,
    image_size=64, patch_size=16, layerscale_value=1.0,
)  # fmt: skip
SIGLIP_TINY = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, image_size=56,
    patch_size=14, vision_use_head=False,
)  # fmt: skip


def _randomize(model: torch.nn.Module, zero_qv_bias: bool = True) -> torch.nn.Module:
    """Random weights everywhere (not the init's ones and zeros), so every tensor's placement matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2)
            if zero_qv_bias and name.endswith(("q_proj.bias", "v_proj.bias")):
                p.zero_()  # DINOv3 B / L: distilled with all-zero attention biases (timm's nets have none)
    return model.eval()


@pytest.fixture
def tiny_siglip(monkeypatch):
    """A registered preset of MedGemma's architecture (timm's SigLIP gap ViT) at SIGLIP_TINY's size."""
    make = _timm("vit_so400m_patch14_siglip_gap_896", embed_dim=64, depth=2, num_heads=2, mlp_ratio=2)
    preset = dataclasses.replace(
        get_preset("medgemma"), name="tiny-siglip", width=64, image_size=56, make=make
    )
    monkeypatch.setitem(PRESETS, "tiny-siglip", preset)
    return preset


def _embedding(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(x)


# ---- Hugging Face DINOv3 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dinov3(tmp_path_factory):
    model = _randomize(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**DINOV3_TINY)))
    folder = tmp_path_factory.mktemp("dinov3-hf")
    model.save_pretrained(folder)
    return model, folder


def test_a_hugging_face_dinov3_checkpoint_gives_the_reference_embedding(hf_dinov3):
    model, folder = hf_dinov3
    backbone = create_backbone("tiny-vit")
    assert load_backbone_weights(backbone, str(folder)) == "dinov3-hf"  # the folder, as downloaded
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        reference = model(pixel_values=x).pooler_output  # the normed CLS token
    torch.testing.assert_close(_embedding(backbone, x), reference, atol=1e-5, rtol=1e-4)


def test_nonzero_attention_biases_that_the_net_has_no_place_for_are_an_error(tmp_path):
    model = _randomize(
        transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**DINOV3_TINY)), zero_qv_bias=False
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(
        WeightsError, match=r"(?s)read as dinov3-hf.*unexpected keys: blocks\.0\.attn\.qkv\.bias"
    ):
        load_backbone_weights(create_backbone("tiny-vit"), str(tmp_path))


# ---- Meta's DINOv3 release ---------------------------------------------------------------------------------


def _meta_release(model) -> dict[str, torch.Tensor]:
    """Meta's own names for a DINOv3 ViT (github.com/facebookresearch/dinov3: ``storage_tokens``, fused qkv
    with a bias whose k third ``bias_mask`` zeroes, ``ls1.gamma``, ``rope_embed.periods``)."""
    s = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    d = DINOV3_TINY["hidden_size"]
    out = {
        "cls_token": s["embeddings.cls_token"], "storage_tokens": s["embeddings.register_tokens"],
        "mask_token": s["embeddings.mask_token"].view(1, d),
        "patch_embed.proj.weight": s["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": s["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": torch.ones(d // DINOV3_TINY["num_attention_heads"] // 4),
        "norm.weight": s["norm.weight"], "norm.bias": s["norm.bias"],
    }  # fmt: skip
    for i in range(DINOV3_TINY["num_hidden_layers"]):
        hf, meta = f"layer.{i}.", f"blocks.{i}."
        attn = {x: s[f"{hf}attention.{x}_proj.weight"] for x in "qkv"}
        out[meta + "attn.qkv.weight"] = torch.cat([attn["q"], attn["k"], attn["v"]])
        q_bias, v_bias = s[hf + "attention.q_proj.bias"], s[hf + "attention.v_proj.bias"]
        out[meta + "attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        out[meta + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        for hf_name, meta_name in (
            ("attention.o_proj", "attn.proj"), ("mlp.up_proj", "mlp.fc1"), ("mlp.down_proj", "mlp.fc2"),
            ("norm1", "norm1"), ("norm2", "norm2"),
        ):  # fmt: skip
            for kind in ("weight", "bias"):
                out[f"{meta}{meta_name}.{kind}"] = s[f"{hf}{hf_name}.{kind}"]
        out[meta + "ls1.gamma"] = s[hf + "layer_scale1.lambda1"]
        out[meta + "ls2.gamma"] = s[hf + "layer_scale2.lambda1"]
    return out


def test_meta_s_dinov3_release_gives_the_reference_embedding(hf_dinov3, tmp_path):
    model, _ = hf_dinov3
    torch.save(_meta_release(model), tmp_path / "dinov3_vits16_pretrain.pth")
    backbone = create_backbone("tiny-vit")
    assert load_backbone_weights(backbone, str(tmp_path / "dinov3_vits16_pretrain.pth")) == "dinov3-meta"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        reference = model(pixel_values=x).pooler_output
    torch.testing.assert_close(_embedding(backbone, x), reference, atol=1e-5, rtol=1e-4)


# ---- SigLIP and MedGemma -----------------------------------------------------------------------------------


def test_a_hugging_face_siglip_vision_model_gives_the_reference_embedding(tiny_siglip, tmp_path):
    config = transformers.SiglipVisionConfig(**SIGLIP_TINY)
    model = _randomize(transformers.SiglipVisionModel(config), zero_qv_bias=False)
    model.save_pretrained(tmp_path)
    backbone = create_backbone("tiny-siglip", normalize=False)
    assert load_backbone_weights(backbone, str(tmp_path / "model.safetensors")) == "siglip-hf"
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        reference = model(pixel_values=x).last_hidden_state.mean(dim=1)  # Gemma 3 pools the tower's tokens
    torch.testing.assert_close(_embedding(backbone, x), reference, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def medgemma(tmp_path_factory):
    """A whole (tiny) MedGemma: Gemma 3 with a SigLIP tower, saved sharded as ``save_pretrained`` does."""
    text = transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=300,
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(**SIGLIP_TINY)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = _randomize(transformers.Gemma3ForConditionalGeneration(config), zero_qv_bias=False)
    folder = tmp_path_factory.mktemp("medgemma")
    model.save_pretrained(folder, max_shard_size="40KB")
    return model, folder


def _hub_layout(folder, out):
    """The same checkpoint in the layout of the published medgemma-4b folders (written by transformers 4.x):
    ``vision_tower.vision_model.*`` and ``language_model.model.*``, two shards and an index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {
        k: v for f in sorted(set(index["weight_map"].values())) for k, v in load_file(folder / f).items()
    }
    renamed = {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
        for k, v in state.items()
    }
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for i, (k, v) in enumerate(sorted(renamed.items())):
        shards[sorted(shards)[i % 2]][k] = v.contiguous()
    for name, tensors in shards.items():
        save_file(tensors, out / name)
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_a_medgemma_checkpoint_folder_gives_its_vision_tower_reading_only_the_tower(
    medgemma, tiny_siglip, layout, tmp_path, monkeypatch
):
    model, folder = medgemma
    uri = str(folder / "model.safetensors.index.json")  # the index itself
    if layout == "hub":
        uri = str(_hub_layout(folder, tmp_path))  # the folder
    read: list[str] = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, names: read.extend(names) or original(self, names))
    backbone = create_backbone("tiny-siglip", normalize=False)
    assert load_backbone_weights(backbone, uri) == "siglip-hf"
    assert read and all(".vision_tower." in f".{name}" for name in read)  # no language model, no projector
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        reference = model.model.vision_tower(pixel_values=x).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(_embedding(backbone, x), reference, atol=1e-4, rtol=1e-4)


def test_a_medgemma_checkpoint_folder_on_s3(medgemma, tiny_siglip, s3_bucket):
    from molre.data import storage

    model, folder = medgemma
    root = storage.join(s3_bucket, "weights", "medgemma-4b-it")
    for path in folder.iterdir():
        storage.write_bytes(storage.join(root, path.name), path.read_bytes())
    backbone = create_backbone("tiny-siglip", normalize=False)
    load_backbone_weights(backbone, root)  # the folder: a prefix on S3
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        reference = model.model.vision_tower(pixel_values=x).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(_embedding(backbone, x), reference, atol=1e-4, rtol=1e-4)


def test_a_smaller_image_size_resamples_the_position_embedding(medgemma, tiny_siglip):
    from timm.layers import resample_abs_pos_embed

    model, folder = medgemma
    backbone = create_backbone("tiny-siglip", image_size=28)  # 2x2 patches, from the checkpoint's 4x4
    load_backbone_weights(backbone, str(folder))
    theirs = model.model.vision_tower.embeddings.position_embedding.weight.detach()[None]
    torch.testing.assert_close(
        backbone.net.pos_embed.detach(), resample_abs_pos_embed(theirs, [2, 2], [4, 4], 0)
    )
    assert _embedding(backbone, torch.rand(1, 3, 28, 28)).shape == (1, 64)


def test_formats_are_told_apart_by_their_tensor_names(hf_dinov3, medgemma):
    assert detect_format(Checkpoint(str(hf_dinov3[1])).names) == "dinov3-hf"
    assert detect_format(Checkpoint(str(medgemma[1])).names) == "siglip-hf"
    assert detect_format(list(create_backbone("tiny-vit").net.state_dict())) == "native"
    assert detect_format(["storage_tokens", "blocks.0.ls1.gamma"]) == "dinov3-meta"


# ---- reading -----------------------------------------------------------------------------------------------


def test_tensors_read_by_byte_range_equal_safetensors_own_reader(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).view(2, 3), "u8": torch.arange(4, dtype=torch.uint8),
        "flag": torch.tensor([True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }  # fmt: skip
    save_file(tensors, tmp_path / "mixed.safetensors")
    got = read_state_dict(str(tmp_path / "mixed.safetensors"))
    expected = load_file(tmp_path / "mixed.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_a_truncated_or_damaged_checkpoint_names_the_file(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "w.safetensors")
    blob = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-100])  # an interrupted download
    with pytest.raises(WeightsError, match=r"cut\.safetensors: tensor w has 16284 bytes.*truncated"):
        read_state_dict(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match=r"junk\.safetensors is not valid safetensors"):
        read_state_dict(str(tmp_path / "junk.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(WeightsError, match="is not a safetensors index"):
        read_state_dict(str(tmp_path))
    index = {"weight_map": {"w": "w.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))  # a shard not downloaded
    with pytest.raises(WeightsError, match=r"model-00002-of-00002\.safetensors does not exist"):
        read_state_dict(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        WeightsError, match="holds neither model.safetensors nor model.safetensors.index.json"
    ):
        read_state_dict(str(tmp_path / "empty"))


# ---- the preset's own keys ---------------------------------------------------------------------------------


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


def test_the_weights_command_loads_a_checkpoint_into_its_preset_and_reports_it(hf_dinov3, tmp_path, capsys):
    from molre.cli import main

    assert main(["weights", "tiny-vit", str(hf_dinov3[1])]) == 0
    out = capsys.readouterr().out
    assert f"{hf_dinov3[1]}: read as dinov3-hf, " in out and " parameters loaded into tiny-vit" in out
    assert "embedding of 2 random inputs (3, 64, 64): width 64" in out
    assert main(["weights", "tiny-davit", str(hf_dinov3[1])]) == 2  # another architecture: the keys say so
    assert "do not fit DaVit" in capsys.readouterr().err
