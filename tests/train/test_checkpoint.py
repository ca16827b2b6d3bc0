"""What a checkpoint stores: the trained state (trainable parameters + persistent buffers), never frozen weights."""

from __future__ import annotations

import pytest
import torch

from molre.config import build_config
from molre.errors import WeightsError
from molre.models import build_model
from molre.train.checkpoint import load_trained_state, trained_state


def _model(preset: str, **adapter):
    cfg = build_config({"backbone": {"preset": preset}, "adapter": adapter or {"kind": "none"}})
    torch.manual_seed(0)
    return build_model(cfg)


def test_batchnorm_running_statistics_are_saved_and_restored():
    model = _model("tiny-cnn3d")  # MONAI DenseNet, fully fine-tuned: BatchNorm everywhere
    x = torch.randn(2, 3, 8, 64, 64) * 3 + 1  # far from the initial running mean 0 / var 1
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)  # train-mode forwards move the running statistics
    state = trained_state(model)
    assert any(k.endswith("running_mean") for k in state)
    fresh = _model("tiny-cnn3d")
    before = fresh.eval()(x)
    load_trained_state(fresh, state, "test")
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert not torch.allclose(before, fresh(x))  # without the statistics the scores differ


def test_a_lora_model_stores_its_trainable_tensors_only():
    model = _model("tiny-vit", kind="molre")
    state = trained_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable  # the ViT has no buffers; frozen weights are rebuilt from the config
    assert sum(t.numel() for t in state.values()) < sum(p.numel() for p in model.parameters())


def test_a_checkpoint_without_the_buffers_is_refused_by_name():
    model = _model("tiny-cnn3d")
    state = {k: v for k, v in trained_state(model).items() if not k.endswith("running_var")}
    with pytest.raises(WeightsError, match="running_var"):
        load_trained_state(_model("tiny-cnn3d"), state, "old.safetensors")


def _written_before_normalize(preset: str) -> dict:
    from molre.config import config_to_dict

    raw = config_to_dict(build_config({"backbone": {"preset": preset}}))
    assert raw["backbone"].pop("normalize") is True  # today's default
    return raw


def test_pretrained_checkpoints_from_before_normalize_keep_their_unscaled_input(tmp_path):
    """A DINOv3 run trained before backbone.normalize saw the windows in 0..1: its checkpoint is rebuilt so."""
    import yaml

    from molre.train.checkpoint import read_config

    for preset, expected in (
        ("dinov3-base", False),
        ("tiny-vit", True),
    ):  # tiny-vit: no statistics, no change
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(_written_before_normalize(preset)))
        assert read_config(tmp_path).backbone.normalize is expected, preset


def test_resuming_a_run_from_before_normalize_names_the_change_for_pretrained_presets_only():
    from molre.config import config_to_dict
    from molre.train.checkpoint import fingerprint_changes

    def current(preset: str, **backbone) -> dict:
        return {"config": config_to_dict(build_config({"backbone": {"preset": preset, **backbone}}))}

    old = {"config": _written_before_normalize("dinov3-base")}
    assert fingerprint_changes(old, current("dinov3-base")) == ["backbone.normalize: false -> true"]
    assert fingerprint_changes(old, current("dinov3-base", normalize=False)) == []
    assert "normalize" not in old["config"]["backbone"]  # the saved fingerprint is not modified
    assert fingerprint_changes({"config": _written_before_normalize("tiny-vit")}, current("tiny-vit")) == []


def test_the_frozen_digest_covers_the_frozen_weights_only():
    from molre.train.checkpoint import frozen_digest

    model = _model("tiny-vit", kind="molre")
    digest = frozen_digest(model)
    assert frozen_digest(_model("tiny-vit", kind="molre")) == digest  # the same seed builds the same backbone
    with torch.no_grad():
        model.head.weight.add_(1.0)  # trained: stored in the checkpoint, not in the digest
        assert frozen_digest(model) == digest
        model.backbone.net.blocks[0].attn.qkv.base_layer.weight[0, 0] += 1e-3  # one frozen number
        assert frozen_digest(model) != digest
    bf16 = _model("tiny-vit").to(torch.bfloat16)  # any dtype hashes (as bytes)
    assert frozen_digest(bf16) != frozen_digest(_model("tiny-vit"))


def test_a_checkpoint_refuses_a_backbone_rebuilt_from_a_replaced_weights_file(tmp_path):
    from safetensors.torch import save_file

    from molre.models import create_backbone
    from molre.train.checkpoint import FROZEN_SHA256, TrainState, frozen_digest, save_checkpoint
    from molre.train.loop import make_optimizer
    from molre.train.scoring import load_checkpoint_model

    def weights(seed: int) -> None:
        torch.manual_seed(seed)
        save_file(create_backbone("tiny-vit").net.state_dict(), tmp_path / "w.safetensors")

    weights(1)
    cfg = build_config({"backbone": {"weights": str(tmp_path / "w.safetensors")}})
    model = build_model(cfg)
    setup = {
        "grid": [8, 64, 64],
        "spacing": [4, 1, 1],
        "input_size": [8, 64, 64],
        FROZEN_SHA256: frozen_digest(model),
    }
    state = TrainState(epoch=0, best_epoch=0, best_metric=0.5, finished=True)
    (tmp_path / "ck").mkdir()
    save_checkpoint(
        tmp_path / "ck", model, make_optimizer(model, cfg), state, cfg, trained_state(model), None, setup
    )
    load_checkpoint_model(str(tmp_path / "ck"))  # the same file: loads
    weights(2)  # an upstream re-release, or another file copied to the same URI
    with pytest.raises(
        WeightsError, match=r"frozen backbone rebuilt from backbone.weights .*w\.safetensors is not the"
    ):
        load_checkpoint_model(str(tmp_path / "ck"))
