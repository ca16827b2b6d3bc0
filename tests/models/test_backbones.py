import dataclasses

import pytest
import torch

from molre.errors import ModelError
from molre.models import PRESETS, Backbone, create_backbone, get_preset
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


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_pretrained_2d_presets_see_their_pretraining_input_statistics():
    """The windows (0..1) enter DINOv3 / MedImageInsight standardised by ImageNet's statistics and MedGemma's
    SigLIP in [-1, 1], as their pretraining images did; stand-ins and random test models as they are."""
    with torch.device("meta"):
        built = {name: create_backbone(name) for name in PRESETS}
    normalized = {name for name, backbone in built.items() if backbone.normalized}
    assert normalized == {"dinov3-base", "dinov3-large", "medimageinsight", "medgemma"}
    assert get_preset("medgemma").input_stats == ((0.5,) * 3, (0.5,) * 3)
    assert all(get_preset(n).input_stats == _IMAGENET for n in normalized - {"medgemma"})


def test_normalization_standardises_each_window_channel_and_is_not_checkpoint_state():
    from torchvision.transforms.functional import normalize

    preset = dataclasses.replace(get_preset("tiny-vit"), input_stats=_IMAGENET)
    torch.manual_seed(0)
    backbone = Backbone(preset, 64, 0).eval()
    bare = Backbone(preset, 64, 0, normalize=False).eval()
    bare.load_state_dict(backbone.state_dict())  # the statistics are rebuilt from the config, not stored
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), bare(normalize(x, *_IMAGENET)))
        assert not torch.allclose(backbone(x), bare(x))
    assert not {"input_mean", "input_inv_std"} & set(backbone.state_dict())


def test_a_run_config_can_turn_the_normalization_off():
    from molre.config import build_config
    from molre.models import build_model

    for normalize in (True, False):
        cfg = build_config({"backbone": {"preset": "dinov3-base", "normalize": normalize}})
        with torch.device("meta"):
            assert build_model(cfg, load_weights=False).backbone.normalized is normalize
