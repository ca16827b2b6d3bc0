"""Cached-feature fidelity: the cache holds the frozen backbone's output, and the cached head is the full model's top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from molre.config import build_config
from molre.errors import ConfigError, WeightsError
from molre.models import build_model, create_backbone
from molre.models.runtime import prepare_runtime
from molre.tune import features
from tests.tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_tiny_dataset(
        str(tmp_path_factory.mktemp("feat-shards")), counts={"train": 6, "val": 4}, seed=3
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A random tiny-vit backbone saved in the real format (the frozen 'pretrained' weights)."""
    torch.manual_seed(11)
    backbone = create_backbone("tiny-vit")
    path = tmp_path_factory.mktemp("weights") / "tiny-vit.safetensors"
    save_file({f"net.{k}": v.contiguous() for k, v in backbone.net.state_dict().items()}, str(path))
    return str(path)


def _cfg(uri: str, weights: str | None, **over):
    tree = {
        "backbone": {"preset": "tiny-vit", "weights": weights, "finetune": "frozen"},
        "data": {"uri": uri},
        "train": {"max_epochs": 2, "min_epochs": 0, "batch_size": 2, "seed": 5},
    }
    for key, value in over.items():
        tree[key] = {**tree.get(key, {}), **value}
    return build_config(tree)


def _val_volumes(cfg) -> tuple[torch.Tensor, list[str]]:
    items = list(features.volumes_of(cfg, "val"))
    return torch.from_numpy(np.stack([it[0] for it in items])), [it[3] for it in items]


def test_cache_holds_backbone_output_and_head_matches_full_model(data, weights, tmp_path):
    cfg = _cfg(data, weights)
    cache = features.build_feature_cache(cfg, str(tmp_path))
    assert cache.computed and cache.uri == f"{tmp_path}/features/{features.feature_key(cfg)}"
    again = features.build_feature_cache(cfg, str(tmp_path))
    assert not again.computed  # computed once per key, then read from storage
    torch.testing.assert_close(again.splits["val"].features, cache.splits["val"].features)

    model = build_model(
        cfg
    ).eval()  # the end-to-end model: same weights file, frozen backbone, MoLRE on features
    with torch.no_grad():  # make the experts matter (B is zero-initialised)
        model.molre.B.normal_(0, 0.5)
    hu, hashes = _val_volumes(cfg)
    assert hashes == cache.splits["val"].study_hash
    x = features.model_input(hu, cfg, (8, 64, 64))
    with torch.no_grad():
        b, m, s, h, w = x.shape
        direct = model.backbone(x.transpose(1, 2).reshape(b * s, m, h, w)).reshape(b, s, -1)
        torch.testing.assert_close(cache.splits["val"].features, direct, rtol=1e-5, atol=1e-5)
        head = features.FeatureHead.from_model(model).eval()
        assert set(features.head_state(head)) == set(features.head_state(model))
        torch.testing.assert_close(head(cache.splits["val"].features), model(x), rtol=1e-5, atol=1e-5)
        fresh = features.FeatureHead.from_config(cfg, 64, 2)
        fresh.load_state_dict(features.head_state(model))  # weights move between the two unchanged
        torch.testing.assert_close(fresh.eval()(cache.splits["val"].features), model(x), rtol=1e-5, atol=1e-5)


def test_cached_trial_trains_and_reports_each_epoch(data, weights, tmp_path):
    cfg = _cfg(data, weights, optim={"lr_head": 1e-2, "lr_adapter": 1e-3})
    seen = []
    result = features.cached_trial(cfg, str(tmp_path), device="cpu", on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [0, 1]
    assert all(m["val/volumes"] == 4 and np.isfinite(m["val/mean_auc"]) for m in seen)
    assert result.best_metric == max(m["val/mean_auc"] for m in seen)
    assert {k.split(".")[0] for k in result.best_state} == {"molre", "pool", "head"}
    repeat = features.cached_trial(cfg, str(tmp_path), device="cpu")  # same seed, same cache: same metrics
    assert [h["val/mean_auc"] for h in repeat.history] == [m["val/mean_auc"] for m in seen]


def test_key_follows_what_the_features_depend_on(data, weights, tmp_path):
    base = features.feature_key(_cfg(data, weights))
    assert features.feature_key(_cfg(data, weights, adapter={"molre": {"experts": 3}})) == base  # top only
    assert features.feature_key(_cfg(data, None)) != base
    assert features.feature_key(_cfg(data, weights, data={"num_slices": 4})) != base
    assert features.feature_key(_cfg(data, weights, backbone={"image_size": 32})) != base
    assert features.feature_key(_cfg(data, weights, train={"frozen_matmul": "fp8"})) != base
    # input scaling: a pretrained preset's statistics join the key; presets without any keep their old keys
    assert features.feature_key(_cfg(data, weights, backbone={"normalize": False})) == base
    dinov3 = {"preset": "dinov3-base", "image_size": 32}
    scaled = features.key_fields(_cfg(data, weights, backbone=dinov3))
    assert scaled["input_stats"] == [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
    assert "input_stats" not in features.key_fields(
        _cfg(data, weights, backbone={**dinov3, "normalize": False})
    )


def test_fp8_caches_hold_the_fp8_backbones_features(data, weights, tmp_path):
    """With train.frozen_matmul=fp8 the cache holds what the end-to-end run's e4m3 base computes."""
    exact = features.build_feature_cache(_cfg(data, weights), str(tmp_path)).splits["val"].features
    cfg = _cfg(data, weights, train={"frozen_matmul": "fp8"})
    cache = features.build_feature_cache(cfg, str(tmp_path))
    model = build_model(cfg).eval()
    prepare_runtime(model, cfg, "cpu")  # the worker loop's conversion
    x = features.model_input(_val_volumes(cfg)[0], cfg, (8, 64, 64))
    with torch.no_grad():
        b, m, s, h, w = x.shape
        direct = model.backbone(x.transpose(1, 2).reshape(b * s, m, h, w)).reshape(b, s, -1)
    torch.testing.assert_close(cache.splits["val"].features, direct, rtol=1e-5, atol=1e-5)
    error = (cache.splits["val"].features - exact).norm() / exact.norm()
    assert 0 < error < 0.1  # e4m3 rounding, through the tiny ViT's blocks


def test_configs_that_adapt_the_backbone_are_refused(data, weights, tmp_path):
    with pytest.raises(ConfigError, match="backbone.finetune=frozen"):
        features.build_feature_cache(_cfg(data, weights, backbone={"finetune": "lora"}), str(tmp_path))
    blocks = _cfg(data, weights, adapter={"molre": {"placement": "blocks"}})
    with pytest.raises(ConfigError, match="placement=features"):
        features.build_feature_cache(blocks, str(tmp_path))


def test_augmented_copies_are_the_backbone_on_the_runs_augmentation(data, weights, tmp_path):
    """augment_copies=N caches N augmented train copies (fixed seeds: rebuilt identically), val un-augmented."""
    cfg = _cfg(data, weights)
    plain = features.build_feature_cache(cfg, str(tmp_path))
    cache = features.build_feature_cache(cfg, str(tmp_path), augment_copies=2, batch_size=4)
    assert cache.key != plain.key and cache.computed  # its own key: another cache, the plain one is kept
    train, val = cache.splits["train"], cache.splits["val"]
    assert train.copies == 2 and train.features.shape == (2, *plain.splits["train"].features.shape)
    torch.testing.assert_close(val.features, plain.splits["val"].features)  # validation is never augmented
    assert not torch.allclose(train.features[0], train.features[1])  # two different augmentations
    assert not torch.allclose(train.features[0], plain.splits["train"].features)
    # copy 1 of the first batch = the backbone on augment_batch(train=True) with that copy's generator
    items = list(features.volumes_of(cfg, "train"))[:4]
    hu = torch.from_numpy(np.stack([it[0] for it in items]))
    spacing = features.shards.read_manifest(data).config["spacing"]
    x = features.model_input(hu, cfg, (8, 64, 64), torch.Generator().manual_seed(1 * 1_000_003 + 0), spacing)
    backbone = features._frozen_backbone(cfg, torch.device("cpu")).net
    torch.testing.assert_close(train.features[1, :4], features.backbone_features(backbone, x, cfg))
    read = features.load_feature_cache(cache.uri)  # stored and read back with its copies
    assert read.splits["train"].copies == 2
    torch.testing.assert_close(read.splits["train"].features, train.features)
    # a cached trial trains on copy epoch % 2; same seed and cache, same metrics
    first = features.cached_trial(cfg, str(tmp_path), device="cpu", augment_copies=2)
    again = features.cached_trial(cfg, str(tmp_path), device="cpu", augment_copies=2)
    assert [h["val/mean_auc"] for h in first.history] == [h["val/mean_auc"] for h in again.history]
    unaugmented = features.cached_trial(cfg, str(tmp_path), device="cpu")
    assert [h["train/loss"] for h in unaugmented.history] != [h["train/loss"] for h in first.history]
    assert features.feature_key(cfg, augment_copies=2) != features.feature_key(
        _cfg(data, weights, data={"augment": {"rotate": 0.0}}), augment_copies=2
    )  # the augmentation's settings are part of the key


def test_a_damaged_split_file_is_named_and_the_cache_rebuilt(data, weights, tmp_path, caplog):
    """meta.json holds each split file's sha256 and shapes: a damaged, truncated or missing file is a miss."""
    cfg = _cfg(data, weights)
    cache = features.build_feature_cache(cfg, str(tmp_path))
    good = cache.splits["train"].features.clone()
    info = cache.meta["splits"]["train"]
    assert len(info["sha256"]) == 64 and info["tensors"]["features"] == list(good.shape)
    path = tmp_path / "features" / cache.key / "train.safetensors"
    raw = bytearray(path.read_bytes())
    damaged = bytes(raw[:-200]) + bytes(b ^ 0xFF for b in raw[-200:])  # bit rot in the tensor data
    for content in (damaged, bytes(raw[: len(raw) // 2]), None):  # damaged, truncated, missing
        path.unlink()
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(features.DamagedCacheError, match="train.safetensors"):
            features.load_feature_cache(cache.uri)
        caplog.clear()
        with caplog.at_level("WARNING", logger="molre.tune.features"):
            again = features.build_feature_cache(cfg, str(tmp_path))
        assert again.computed  # rebuilt, not loaded
        assert "train.safetensors" in caplog.text and "rebuilding" in caplog.text
        torch.testing.assert_close(again.splits["train"].features, good)
        assert not features.build_feature_cache(cfg, str(tmp_path)).computed  # sound again: read from storage


def test_a_random_backbones_cache_is_the_end_to_end_backbone_of_its_seed(data, weights, tmp_path):
    """Without backbone.weights the backbone is drawn under train.seed, as the worker loop draws it."""
    keys = set()
    for seed in (0, 1):
        cfg = _cfg(data, None, train={"seed": seed})
        cached = features._frozen_backbone(cfg, torch.device("cpu")).net
        torch.manual_seed(cfg.train.seed)  # train_loop_per_worker: seed, then build the model
        end_to_end = build_model(cfg).backbone.state_dict()
        assert all(torch.equal(v, end_to_end[k]) for k, v in cached.state_dict().items())
        keys.add(features.feature_key(cfg))
    assert len(keys) == 2  # one cache per seed
    with_weights = {features.feature_key(_cfg(data, weights, train={"seed": s})) for s in (0, 1)}
    assert len(with_weights) == 1  # loaded weights: the seed changes nothing, one cache for every seed


# ---- the weights behind a cache: a file replaced under the same URI is noticed --------------------------------


def _save_weights(path, seed: int) -> str:
    """A random tiny-vit backbone drawn under ``seed``, saved at ``path`` in the real format."""
    torch.manual_seed(seed)
    backbone = create_backbone("tiny-vit")
    save_file({f"net.{k}": v.contiguous() for k, v in backbone.net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def weight_reads(monkeypatch) -> list[str]:
    """Each read of backbone weights' tensors (``Checkpoint.read``, on the real loading path), by file."""
    from molre.models import weights as weights_io

    reads, real = [], weights_io.Checkpoint.read

    def counted(self, names):
        reads.append(self.uri)
        return real(self, names)

    monkeypatch.setattr(weights_io.Checkpoint, "read", counted)
    return reads


def _meta(cache) -> dict:
    import json

    return json.loads((Path(cache.uri) / features.META).read_text())


def test_a_hit_on_unchanged_weights_reads_no_weights(data, tmp_path, weight_reads):
    cfg = _cfg(data, _save_weights(tmp_path / "w.safetensors", 11))
    cache = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    assert cache.computed and weight_reads  # built: the weights were read
    recorded = _meta(cache)
    assert recorded[features.WEIGHTS_IDENTITIES] == [features.weights_identity(cfg.backbone.weights)]
    built = features._frozen_backbone(cfg, torch.device("cpu"))
    assert recorded[features.BACKBONE_SHA256] == built.sha256 == features.backbone_digest(built.net)
    weight_reads.clear()
    again = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    assert not again.computed and weight_reads == []  # a hit: one listing, no backbone built


def test_a_replaced_weights_file_is_noticed_and_the_features_recomputed(data, tmp_path, weight_reads, caplog):
    path = tmp_path / "w.safetensors"
    cfg = _cfg(data, _save_weights(path, 11))
    old = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    before = _meta(old)[features.WEIGHTS_IDENTITIES]
    _save_weights(path, 12)  # another checkpoint under the same path: same size, same key
    assert [features.weights_identity(str(path))] != before
    with caplog.at_level("WARNING", logger="molre.tune.features"):
        new = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    assert new.computed and new.key == old.key and f"backbone.weights {path}" in caplog.text
    assert not torch.allclose(new.splits["val"].features, old.splits["val"].features)
    fresh = features._frozen_backbone(cfg, torch.device("cpu"))  # the features are the new weights' now
    x = features.model_input(_val_volumes(cfg)[0], cfg, fresh.input_size)
    torch.testing.assert_close(new.splits["val"].features, features.backbone_features(fresh.net, x, cfg))
    assert _meta(new)[features.BACKBONE_SHA256] == fresh.sha256 != old.meta[features.BACKBONE_SHA256]
    weight_reads.clear()
    assert not features.build_feature_cache(cfg, str(tmp_path), splits=("val",)).computed
    assert weight_reads == []  # the new identity recorded: a plain hit again


def test_a_touched_or_copied_over_identical_file_keeps_the_features(data, tmp_path, weight_reads):
    import os
    import shutil

    path = Path(_save_weights(tmp_path / "w.safetensors", 11))
    shutil.copyfile(path, tmp_path / "same.safetensors")
    cfg = _cfg(data, str(path))
    cache = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    stat = path.stat()
    changes = {
        "touched": lambda: os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)),
        "copied over": lambda: shutil.copyfile(tmp_path / "same.safetensors", path),
    }
    for change in changes.values():
        identities = _meta(cache)[features.WEIGHTS_IDENTITIES]
        change()
        assert features.weights_identity(str(path)) not in identities
        weight_reads.clear()
        again = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
        assert not again.computed and weight_reads  # the backbone built once to compare digests, no features
        now = features.weights_identity(str(path))
        assert _meta(again)[features.WEIGHTS_IDENTITIES] == [*identities, now]
        weight_reads.clear()
        assert not features.build_feature_cache(cfg, str(tmp_path), splits=("val",)).computed
        assert weight_reads == []  # recorded: a plain hit again
    torch.testing.assert_close(again.splits["val"].features, cache.splits["val"].features)


def test_a_cache_recorded_before_ctime_and_inode_is_checked_once_and_kept(data, tmp_path, weight_reads):
    """meta.json of a molre whose local identity was size and mtime only: not today's identity, so the backbone
    is built once and its digest compared (the same: the features kept, today's identity added), no error."""
    import json

    path = tmp_path / "w.safetensors"
    cfg = _cfg(data, _save_weights(path, 11))
    cache = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    meta = _meta(cache)
    old = [
        {name: {"size": f["size"], "mtime_ns": f["mtime_ns"]} for name, f in identity.items()}
        for identity in meta[features.WEIGHTS_IDENTITIES]
    ]
    (Path(cache.uri) / features.META).write_text(json.dumps({**meta, features.WEIGHTS_IDENTITIES: old}))
    weight_reads.clear()
    again = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    assert not again.computed and weight_reads  # the backbone built once to compare digests, no features
    assert _meta(again)[features.WEIGHTS_IDENTITIES] == [*old, features.weights_identity(str(path))]
    weight_reads.clear()
    assert not features.build_feature_cache(cfg, str(tmp_path), splits=("val",)).computed
    assert weight_reads == []  # recorded: a plain hit again
    torch.testing.assert_close(again.splits["val"].features, cache.splits["val"].features)


def test_a_cache_from_before_the_check_is_spot_checked(data, tmp_path, weight_reads, caplog):
    """An older molre recorded neither identity nor digest: the first volumes are recomputed and compared."""
    import json

    path = tmp_path / "w.safetensors"
    cfg = _cfg(data, _save_weights(path, 11))
    cache = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    digest = _meta(cache)[features.BACKBONE_SHA256]

    def as_written_before_the_check():
        meta = _meta(cache)
        del meta[features.WEIGHTS_IDENTITIES], meta[features.BACKBONE_SHA256]
        (Path(cache.uri) / features.META).write_text(json.dumps(meta))

    as_written_before_the_check()
    with caplog.at_level("INFO", logger="molre.tune.features"):
        kept = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    assert not kept.computed and "predates the weights check" in caplog.text and "agree" in caplog.text
    assert _meta(kept)[features.BACKBONE_SHA256] == digest  # recorded: checked by digest from now on
    as_written_before_the_check()
    _save_weights(path, 12)  # replaced before the check existed: the stored features are the old weights'
    caplog.clear()
    with caplog.at_level("WARNING", logger="molre.tune.features"):
        redone = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    assert redone.computed and f"backbone.weights {path}" in caplog.text and "recomputing" in caplog.text
    assert not torch.allclose(redone.splits["val"].features, cache.splits["val"].features)
    assert _meta(redone)[features.BACKBONE_SHA256] not in (None, digest)


def test_a_hit_whose_weights_are_gone_names_them(data, tmp_path):
    path = tmp_path / "w.safetensors"
    cfg = _cfg(data, _save_weights(path, 11))
    features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    path.unlink()
    with pytest.raises(WeightsError, match=f"weights file {path} does not exist"):
        features.build_feature_cache(cfg, str(tmp_path), splits=("val",))


def test_weights_on_s3_are_checked_by_etag(data, tmp_path, s3_bucket, weight_reads):
    """An identical re-upload keeps the ETag (a plain hit); other weights under the same key are noticed."""
    from molre.data import storage

    uri = storage.join(s3_bucket, "weights", "tiny-vit.safetensors")
    storage.write_bytes(uri, Path(_save_weights(tmp_path / "a.safetensors", 11)).read_bytes())
    cfg = _cfg(data, uri)
    old = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    storage.write_bytes(uri, (tmp_path / "a.safetensors").read_bytes())  # the same bytes again
    weight_reads.clear()
    assert not features.build_feature_cache(cfg, str(tmp_path), splits=("val",)).computed
    assert weight_reads == []
    storage.write_bytes(uri, Path(_save_weights(tmp_path / "b.safetensors", 12)).read_bytes())
    new = features.build_feature_cache(cfg, str(tmp_path), splits=("val",))
    assert new.computed and not torch.allclose(new.splits["val"].features, old.splits["val"].features)
