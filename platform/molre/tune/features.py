"""Cheap first fidelity for sweeps: frozen-backbone slice features cached once, trials train only the top.

For a configuration with ``backbone.finetune=frozen`` and MoLRE on the features (or no adapter), everything up to
the backbone's output is fixed, so it is computed once per (preset, weights, preprocessed data, image size,
slices, HU windows) and stored; a trial then trains MoLRE + attention pooling + head on the stored features:

    shards --window + resize (the eval path, no augmentation)--> [B,3,S,H,W] --frozen backbone--> [B,S,d]
           --> <root>/features/<key>/{train,val}.safetensors        (2D: [N,S,d]; 3D presets: [N,d])
    trial: [N,S,d] --MoLRE--> --attention pooling--> --linear--> 75 logits     (no backbone forward)

``key`` = sha256 of those ingredients (``feature_key``; with a random-init backbone, no ``backbone.weights``,
also ``train.seed``: the backbone is built under it, as the end-to-end run builds its own). ``meta.json`` is
written last and marks a complete cache; it holds each split file's sha256 and tensor shapes, checked on every
load (a damaged or partly copied file is named in a warning and the cache rebuilt).

The key names the weights by URI; what lies there is checked on every hit (``_reuse``). meta.json records the
weights' storage identity (``storage.identity``: size and S3 ETag / local mtime, ctime and inode of each file, one
listing; a cache recorded before ctime and inode were reads as another identity, once) and the sha256 of the
backbone built from them (``backbone_digest``). Same identity: a hit, the weights unread. Another identity: the
backbone is built and digested; the same digest (a copied or touched file) keeps the features and adds the new
identity, another digest (a file replaced under the same URI) logs a warning and recomputes the cache in place. A
cache from before the check (no digest recorded) is spot-checked instead: its first stored volumes against the
backbone's features on them; kept, and the digest recorded, when they agree.

Fidelity differences vs the end-to-end trial: by default no augmentation (features of un-augmented volumes);
with ``augment_copies=N`` the train split holds N augmented copies of each volume ([N_copies, N, S, d], the
run's ``data.augment`` under fixed seeds; the augmentation settings join the key) and epoch e trains on copy
e % N, where the end-to-end run draws a fresh augmentation every epoch. Precision: fp32 / bf16 autocast as on
the device, FP8 frozen linears with ``train.frozen_matmul=fp8`` (as the end-to-end run). ``FeatureHead`` keeps
the classifier's module names (``molre.``, ``pool.``, ``head.``), so its weights move to and from a
``MoLREClassifier`` unchanged.

Sweep use (``molre.tune.multifidelity``): ``build_feature_cache(cfg, root)`` once per backbone configuration
before the trials, then per trial ``cached_trial(cfg, root, on_epoch=tune.report)``; the best candidates are
re-run end to end.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from molre.config import RunConfig
from molre.data import shards, storage
from molre.errors import ConfigError, DataError, WeightsError
from molre.findings import FINDING_IDS, NUM_FINDINGS
from molre.models.backbones import get_preset
from molre.models.fp8 import apply_frozen_matmul
from molre.models.molre import MoLRE
from molre.models.pooling import AttentionPooling
from molre.train.checkpoint import tensors_digest

CACHE_VERSION = 3  # bump when the feature pipeline changes: old caches then miss instead of being reused
# 2: the DINOv3 presets and tiny-vit embed a slice as the CLS token (was the mean of the patch tokens)
# 3: meta.json holds each split file's sha256 and tensor shapes (checked on load); a random-init backbone is
#    built under train.seed (was 0), which joins the key
META = "meta.json"
SPLITS = ("train", "val")
# meta.json: the storage identities of backbone.weights known to build the backbone of BACKBONE_SHA256, most
# recent last (several: nodes that each hold their own copy of a local weights file see different mtimes; one
# entry per copy, so that they do not take turns rebuilding the backbone to check it)
WEIGHTS_IDENTITIES = "weights_identities"
MAX_IDENTITIES = 16
BACKBONE_SHA256 = "backbone_sha256"  # meta.json: backbone_digest of the backbone that computed the features
# A cache from before the digest: its first SPOT_VOLUMES volumes of an un-augmented split are recomputed and
# must agree within SPOT_TOLERANCE (relative norm of the difference). Room for another device's arithmetic
# (bf16 autocast vs fp32) and a bf16 / fp16 cache; other weights are far off (two random DINOv3-Base draws:
# 1.4), but a near copy passes (1 % noise on every weight: 0.014). Too tight would only cost a recomputation.
SPOT_VOLUMES = 2
SPOT_TOLERANCE = 0.05

log = logging.getLogger(__name__)


class DamagedCacheError(DataError):
    """A feature cache whose meta.json says complete but whose content does not match it (a damaged or partly
    copied split file, an unreadable meta.json): ``path`` names the file; ``build_feature_cache`` rebuilds it."""


# ---- keys and checks -------------------------------------------------------------------------------------------


def check_cacheable(cfg: RunConfig) -> None:
    """A ``ConfigError`` unless the backbone is frozen and nothing adapts inside it."""
    if cfg.backbone.finetune != "frozen":
        raise ConfigError(
            f"cached features need backbone.finetune=frozen (got {cfg.backbone.finetune!r}): with LoRA or full "
            "fine-tuning the backbone's output changes during training"
        )
    if cfg.adapter.kind == "molre" and cfg.adapter.molre.placement != "features":
        raise ConfigError(
            "cached features need adapter.molre.placement=features (placement=blocks adapts inside the backbone)"
        )


def key_fields(
    cfg: RunConfig, data_uri: str | None = None, manifest_bytes: bytes | None = None, augment_copies: int = 0
) -> dict:
    """What the features depend on: preset, weights, the preprocessed data (its manifest), input size, windows,
    and with ``augment_copies`` the augmentation settings.

    ``manifest_bytes``: the data's manifest when the caller already holds it (else it is read)."""
    from molre.train.run import model_input_size

    if manifest_bytes is None:
        manifest_bytes = storage.read_bytes(storage.join(data_uri or cfg.data.uri, shards.MANIFEST))
    grid = tuple(json.loads(manifest_bytes)["config"]["grid"])
    weights = cfg.backbone.weights.replace("{preset}", cfg.backbone.preset) if cfg.backbone.weights else None
    fields = {
        "version": CACHE_VERSION,
        "preset": cfg.backbone.preset,
        # by URI (existing caches keep their keys): a file replaced under the same URI is noticed on each hit
        # instead, by its storage identity and the backbone's digest (``_reuse``); None = random init under
        # train.seed ("seed")
        "weights": weights,
        # the manifest holds the shard checksums, grid, spacing and preprocessing settings
        "manifest_sha256": storage.sha256_bytes(manifest_bytes),
        "input_size": list(model_input_size(cfg, grid)),  # (slices, H, W) the backbone sees
        "windows": [list(w) for w in cfg.data.windows],
        "precision": cfg.train.precision,  # auto = bf16 autocast on GPU, fp32 on CPU (as the worker loop)
    }
    # absent by default, so that caches built before the setting existed keep their keys
    if cfg.train.frozen_matmul != "auto":
        fields["frozen_matmul"] = cfg.train.frozen_matmul
    stats = get_preset(cfg.backbone.preset).input_stats  # None: no field, and old caches keep their keys
    if stats and cfg.backbone.normalize:
        fields["input_stats"] = [list(v) for v in stats]
    if augment_copies:  # absent otherwise: caches built before augmented copies existed keep their keys
        fields["augment_copies"] = augment_copies
        fields["augment"] = cfg.data.augment.model_dump(mode="json")
    if weights is None:  # the random backbone is drawn under the run's seed (``_frozen_backbone``)
        fields["seed"] = cfg.train.seed
    return fields


def feature_key(
    cfg: RunConfig, data_uri: str | None = None, manifest_bytes: bytes | None = None, augment_copies: int = 0
) -> str:
    return _hash(key_fields(cfg, data_uri, manifest_bytes, augment_copies))


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def cache_uri(root: str, key: str) -> str:
    return storage.join(root, "features", key)


# ---- the cache ------------------------------------------------------------------------------------------------


@dataclass
class SplitFeatures:
    features: torch.Tensor  # [N, S, d] (2D) or [N, d] (3D), float32; with copies: [copies, N, ...]
    labels: torch.Tensor  # [N, 75] float32 0/1
    known: torch.Tensor  # [N, 75] float32 0/1
    study_hash: list[str]
    copies: int = 0  # augmented copies of each volume (0: the un-augmented evaluation input)

    def __len__(self) -> int:
        return len(self.study_hash)


@dataclass
class FeatureCache:
    uri: str
    key: str
    meta: dict
    splits: dict[str, SplitFeatures]
    computed: bool = False  # True when this call computed the features (False: read from storage)
    seconds: float = 0.0  # time to compute (or read) the cache


def build_feature_cache(
    cfg: RunConfig,
    root: str,
    splits=SPLITS,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    dtype: str = "float32",
    augment_copies: int = 0,
) -> FeatureCache:
    """Read the cache for ``cfg`` under ``<root>/features/<key>/``, computing and storing it first if absent.

    ``augment_copies``: the train split is cached as that many augmented copies of each volume (the run's
    ``data.augment`` with fixed seeds), so that a cached trial sees augmented inputs as the end-to-end run does;
    validation stays un-augmented. Costs that many forward passes over the train split, and that much storage."""
    check_cacheable(cfg)
    if not cfg.data.uri:
        raise ConfigError("cached features need data.uri (the preprocessed shard root)")
    manifest_bytes = storage.read_bytes(storage.join(cfg.data.uri, shards.MANIFEST))  # once per call
    fields = key_fields(cfg, manifest_bytes=manifest_bytes, augment_copies=augment_copies)
    key = _hash(fields)
    uri = cache_uri(root, key)
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid_config = json.loads(manifest_bytes)["config"]
    grid = tuple(grid_config["grid"])
    weights = fields["weights"]
    # taken before the weights are read: a file replaced while this call builds is noticed by the next call
    identity = weights_identity(weights) if weights else None
    built = None  # the backbone, when checking a hit had to build it (reused for the recomputation)
    if storage.exists(storage.join(uri, META)):
        cache, built = _reuse(
            cfg, uri, splits, weights, identity, lambda: _frozen_backbone(cfg, device, grid)
        )
        if cache is not None:
            cache.seconds = time.perf_counter() - start
            return cache
    backbone, input_size, digest = built or _frozen_backbone(cfg, device, grid)
    meta = {"key": key, "fields": fields, "dtype": dtype, "dims": backbone.dims,
            "width": backbone.width, "splits": {}}  # fmt: skip
    if identity is not None:  # a random-init backbone is fixed by train.seed, in its key
        meta.update({WEIGHTS_IDENTITIES: [identity], BACKBONE_SHA256: digest})
    out = {}
    for split in splits:
        copies = augment_copies if split == "train" else 0
        part = compute_split(
            cfg, backbone, split, input_size, device, batch_size, copies, grid_config["spacing"]
        )
        blob = {"features": part.features.to(getattr(torch, dtype)).contiguous(),
                "labels": part.labels.to(torch.uint8), "known": part.known.to(torch.uint8)}  # fmt: skip
        from safetensors.torch import save

        data = save(blob)
        storage.write_bytes(storage.join(uri, f"{split}.safetensors"), data)
        meta["splits"][split] = {
            "rows": len(part),
            "shape": list(part.features.shape),
            "copies": part.copies,
            "study_hash": part.study_hash,
            "sha256": storage.sha256_bytes(data),  # checked on every load (``_load_split``)
            "bytes": len(data),
            "tensors": {name: list(t.shape) for name, t in blob.items()},
        }
        out[split] = part
    storage.write_bytes(storage.join(uri, META), _meta_bytes(meta))  # written last: marks the cache complete
    return FeatureCache(uri, key, meta, out, computed=True, seconds=time.perf_counter() - start)


def _meta_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, indent=1) + "\n").encode()


def _reuse(
    cfg: RunConfig,
    uri: str,
    splits,
    weights: str | None,
    identity: dict | None,
    build: Callable[[], BuiltBackbone],
) -> tuple[FeatureCache | None, BuiltBackbone | None]:
    """``(cache, None)`` when the complete cache at ``uri`` still holds the backbone's features, else ``(None,
    the backbone if checking it had to build it)`` with meta.json removed: a miss, recomputed in place and
    meta.json written last (crash-safe: until then the cache is incomplete, never stale).

    ``identity``: the storage identity of ``weights`` now (None: a random-init backbone, fixed by its key).
    One that meta.json records: the cache, the weights unread. Else ``build()`` and compare digests."""
    try:
        cache = load_feature_cache(uri, splits)
    except DamagedCacheError as err:
        log.warning("feature cache %s: %s; rebuilding the cache", err.path, err.reason)
        storage.delete(storage.join(uri, META))  # incomplete until the rebuild writes it again
        return None, None
    if identity is None or identity in cache.meta.get(WEIGHTS_IDENTITIES, []):
        return cache, None
    built = build()
    recorded, digest = cache.meta.get(BACKBONE_SHA256), built.sha256
    if recorded is None:  # a cache from before the check: nothing recorded to compare the digest with
        if _spot_check(cfg, cache, built, weights):
            return _record_weights(cache, identity, digest), None
    elif recorded == digest:
        log.info("feature cache %s: backbone.weights %s changed on storage but builds the same "
                 "backbone (sha256 %s...): features kept, the new identity recorded",
                 uri, weights, digest[:12])  # fmt: skip
        return _record_weights(cache, identity, digest), None
    else:
        log.warning("feature cache %s: backbone.weights %s is not the file the features were computed "
                    "with (backbone sha256 %s..., recorded %s...): replaced under the same URI; "
                    "recomputing the cache", uri, weights, digest[:12], recorded[:12])  # fmt: skip
    storage.delete(storage.join(uri, META))
    return None, built


def _spot_check(cfg: RunConfig, cache: FeatureCache, built: BuiltBackbone, weights: str) -> bool:
    """Whether a cache from before the digest holds the features of the backbone just ``built`` from
    ``weights``: its first stored volumes of an un-augmented split against the backbone's on them (augmented
    copies depend on the batching they were drawn in). Logs what it found."""
    split = next((name for name, part in cache.splits.items() if not part.copies), None)
    difference = float("inf") if split is None else _spot_difference(cfg, cache.splits[split], split, built)
    if difference <= SPOT_TOLERANCE:
        log.info("feature cache %s predates the weights check; its first %s volumes agree with "
                 "backbone.weights %s (relative difference %.1e): kept, that backbone's sha256 recorded",
                 cache.uri, split, weights, difference)  # fmt: skip
        return True
    log.warning("feature cache %s predates the weights check and its features are not what "
                "backbone.weights %s gives (first %s volumes: relative difference %.2g, tolerance %g); "
                "recomputing the cache", cache.uri, weights, split or "un-augmented", difference,
                SPOT_TOLERANCE)  # fmt: skip
    return False


@torch.no_grad()
def _spot_difference(cfg: RunConfig, part: SplitFeatures, split: str, built: BuiltBackbone) -> float:
    """Relative norm of (the backbone's features - the stored ones) on the split's first ``SPOT_VOLUMES``."""
    backbone, input_size, _ = built
    items = list(itertools.islice(volumes_of(cfg, split), SPOT_VOLUMES))
    if [it[3] for it in items] != part.study_hash[: len(items)]:
        return float("inf")  # not the cache's volumes (the key holds the manifest's sha256: not expected)
    device = next(backbone.parameters()).device
    hu = torch.from_numpy(np.stack([it[0] for it in items])).to(device)
    fresh = backbone_features(backbone, model_input(hu, cfg, input_size), cfg).cpu()
    stored = part.features[: len(items)]
    return float((fresh - stored).norm() / stored.norm().clamp_min(1e-12))


def _record_weights(cache: FeatureCache, identity: dict, digest: str) -> FeatureCache:
    """Add the weights' identity to the cache's meta.json, with the backbone's digest (atomic: the cache stays
    complete; two processes adding theirs at once may lose one, which then costs one more check)."""
    same = cache.meta.get(BACKBONE_SHA256) == digest  # else a cache from before the check: none recorded
    identities = [*(cache.meta.get(WEIGHTS_IDENTITIES, []) if same else []), identity][-MAX_IDENTITIES:]
    cache.meta = {**cache.meta, WEIGHTS_IDENTITIES: identities, BACKBONE_SHA256: digest}
    storage.write_bytes(storage.join(cache.uri, META), _meta_bytes(cache.meta))
    return cache


def weights_identity(uri: str) -> dict[str, dict]:
    """``storage.identity`` of what ``backbone.weights`` names: the file, the Hugging Face folder, or for a
    sharded checkpoint's index the folder that holds it and its shards (whatever else lies there is covered
    too: a change to it costs one backbone build to compare digests, never a stale hit)."""
    target = uri.rsplit("/", 1)[0] if uri.endswith(".index.json") and "/" in uri else uri
    try:
        return storage.identity(target)
    except FileNotFoundError:
        raise WeightsError(f"weights file {uri} does not exist (backbone.weights)") from None


def backbone_digest(backbone: nn.Module) -> str:
    """SHA-256 of a backbone as built: every tensor of its state dict by name, dtype, shape and bytes (as
    ``checkpoint.frozen_digest`` hashes, but buffers too, e.g. BatchNorm statistics: nothing here trains,
    all of it decides the features). Take it before the FP8 conversion, on the weights as loaded."""
    return tensors_digest(backbone.state_dict())


def load_feature_cache(uri: str, splits=SPLITS) -> FeatureCache:
    """Read a complete cache, each split file checked against meta.json (sha256, tensor shapes, rows):
    ``DamagedCacheError`` naming the file when one does not match."""
    start = time.perf_counter()
    meta_uri = storage.join(uri, META)
    if not storage.exists(meta_uri):
        raise DataError(uri, f"not a complete feature cache (no {META})")
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedCacheError(meta_uri, f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict) or "key" not in meta:
        raise DamagedCacheError(meta_uri, "not a feature cache's meta (no 'key' and 'splits')")
    out = {}
    for split in splits:
        if split not in meta["splits"]:
            raise DataError(uri, f"feature cache has no split {split!r} (has {sorted(meta['splits'])})")
        out[split] = _load_split(storage.join(uri, f"{split}.safetensors"), meta["splits"][split])
    return FeatureCache(uri, meta["key"], meta, out, computed=False, seconds=time.perf_counter() - start)


def _load_split(file_uri: str, info: dict) -> SplitFeatures:
    """One split file, checked against its meta.json entry (``info``) before and after parsing."""
    from safetensors.torch import load

    expected = info.get("sha256")
    if not expected:
        raise DamagedCacheError(file_uri, f"{META} holds no checksum for it (written by an older molre)")
    try:
        data = storage.read_bytes(file_uri)
    except FileNotFoundError:
        raise DamagedCacheError(file_uri, f"missing, though {META} lists it") from None
    actual = storage.sha256_bytes(data)
    if actual != expected:
        raise DamagedCacheError(
            file_uri,
            f"content does not match {META} (sha256 {actual[:16]}, expected {expected[:16]}; "
            f"{len(data)} bytes, expected {info.get('bytes', '?')}): damaged or partly copied",
        )
    try:
        blob = load(data)
    except Exception as err:  # safetensors' own error type: the checksum matched, yet the file is unreadable
        reason = f"not a readable safetensors file ({type(err).__name__}: {err})"
        raise DamagedCacheError(file_uri, reason) from None
    shapes = {name: list(t.shape) for name, t in blob.items()}
    rows, copies = len(info.get("study_hash", [])), int(info.get("copies", 0))
    if shapes != info.get("tensors") or _rows(shapes, copies) != (rows, rows, rows):
        raise DamagedCacheError(
            file_uri, f"tensors {shapes} do not match {META} ({info.get('tensors')}, {rows} rows)"
        )
    return SplitFeatures(blob["features"].float(), blob["labels"].float(), blob["known"].float(),
                         list(info["study_hash"]), copies)  # fmt: skip


def _rows(shapes: dict[str, list[int]], copies: int) -> tuple:
    """Volumes in each tensor of a split file: features ``[N, ...]`` (``[copies, N, ...]``), labels, known."""

    def size(name: str, axis: int = 0):
        shape = shapes.get(name, [])
        return shape[axis] if len(shape) > axis else None

    return size("features", 1 if copies else 0), size("labels"), size("known")


class BuiltBackbone(NamedTuple):
    net: nn.Module  # frozen, eval mode, on the device, FP8 products where train.frozen_matmul=fp8
    input_size: tuple  # (slices, H, W) it sees
    sha256: str | None  # backbone_digest as loaded; None for a random-init backbone (train.seed, in the key)


def _frozen_backbone(cfg: RunConfig, device: torch.device, grid: tuple | None = None) -> BuiltBackbone:
    """The backbone exactly as ``build_model`` makes it for ``cfg`` (weights loaded, frozen), in eval mode,
    the input size it sees (``grid``: the data's, else read from its manifest) and its ``backbone_digest``
    (None for a random-init backbone: train.seed, in the key, fixes it)."""
    from molre.models import build_model
    from molre.train.run import model_input_size

    grid = grid or tuple(shards.read_manifest(cfg.data.uri).config["grid"])
    input_size = model_input_size(cfg, grid)
    # a random-init backbone (no backbone.weights: tests, demos) is the one the end-to-end run draws: the worker
    # loop seeds train.seed and then builds the model, backbone first; with weights, the weights replace it
    torch.manual_seed(cfg.train.seed)
    bare = copy.deepcopy(cfg)
    bare.adapter.kind = "none"  # only the backbone is needed
    backbone = build_model(bare).backbone.eval()
    digest = backbone_digest(backbone) if cfg.backbone.weights else None  # as loaded, on the host
    backbone = backbone.to(device)
    apply_frozen_matmul(backbone, cfg.train.frozen_matmul, device)  # the products the end-to-end run computes
    return BuiltBackbone(backbone, input_size, digest)


def volumes_of(cfg: RunConfig, split: str):
    """Yield ``(hu int16 [D,H,W] numpy, labels [75], known [75], study_hash)`` of a split, in shard order."""
    grid = shards.manifest_grid(shards.read_manifest(cfg.data.uri))  # every row's shape is checked against it
    for uri in shards.list_shards(cfg.data.uri, split):
        table = shards.read_shard(uri, ["study_hash", "volume", "shape", "labels", "known"], grid=grid)
        cols = table.to_pydict()
        for i in range(len(table)):
            yield (shards.decode_volume(cols["volume"][i], cols["shape"][i]),
                   np.asarray(cols["labels"][i], np.float32), np.asarray(cols["known"][i], np.float32),
                   str(cols["study_hash"][i]))  # fmt: skip


def model_input(
    hu: torch.Tensor, cfg: RunConfig, input_size, generator: torch.Generator | None = None, spacing=None
) -> torch.Tensor:
    """The worker loop's input path, ``[B,D,H,W]`` int16 -> ``[B,3,S,H',W']``: window + resize (evaluation), or
    with a ``generator`` window + the run's augmentation + resize (training; ``spacing`` = the grid's, z, y, x)."""
    from molre.data.augment import augment_batch

    train = generator is not None
    where = {"spacing_zyx": tuple(spacing)} if spacing else {}  # else augment_batch's default
    return augment_batch(hu, cfg.data, generator if train else torch.Generator(), train=train,
                         out_size=tuple(input_size), **where)  # fmt: skip


@torch.no_grad()
def backbone_features(backbone, x: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """``[B,3,S,H,W] -> [B,S,d]`` for 2D backbones (the classifier's reshape), ``[B,3,D,H,W] -> [B,d]`` for 3D."""
    from molre.train.loop import autocast

    with autocast(cfg, x.device):
        if backbone.dims == 3:
            return backbone(x).float()
        b, m, s, h, w = x.shape
        return backbone(x.transpose(1, 2).reshape(b * s, m, h, w)).float().reshape(b, s, -1)


def compute_split(
    cfg, backbone, split, input_size, device, batch_size: int = 4, copies: int = 0, spacing=None
) -> SplitFeatures:
    """Features of a split's volumes in shard order; with ``copies``, ``[copies, N, ...]`` of augmented inputs
    (copy ``c`` of batch ``b`` drawn from a generator seeded ``(c, b)``: the same on every rebuild; ``spacing``:
    the grid's, z, y, x, as the worker loop augments with)."""
    feats, labels, known, hashes = [], [], [], []
    batch: list = []

    def flush():
        hu = torch.from_numpy(np.stack([v[0] for v in batch])).to(device)
        if copies:
            number = len(feats)
            inputs = [model_input(hu, cfg, input_size, torch.Generator().manual_seed(c * 1_000_003 + number), spacing)
                      for c in range(copies)]  # fmt: skip
            feats.append(torch.stack([backbone_features(backbone, x, cfg).cpu() for x in inputs]))
        else:
            feats.append(backbone_features(backbone, model_input(hu, cfg, input_size), cfg).cpu())
        labels.extend(v[1] for v in batch)
        known.extend(v[2] for v in batch)
        hashes.extend(v[3] for v in batch)
        batch.clear()

    for item in volumes_of(cfg, split):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not hashes:
        raise DataError(storage.join(cfg.data.uri, split), f"split '{split}' is empty: nothing to cache")
    return SplitFeatures(torch.cat(feats, dim=1 if copies else 0), torch.as_tensor(np.stack(labels)),
                         torch.as_tensor(np.stack(known)), hashes, copies)  # fmt: skip


# ---- the trial on cached features -----------------------------------------------------------------------------


class FeatureHead(nn.Module):
    """MoLRE (features placement) -> attention pooling (2D) -> linear: the classifier above the backbone.

    Module names match ``MoLREClassifier``, so ``head_state(model)`` / ``load_state_dict`` move weights between
    the two, and ``parameter_groups`` / ``make_optimizer`` see the same groups.
    """

    def __init__(self, molre: MoLRE | None, pool: AttentionPooling | None, head: nn.Linear):
        super().__init__()
        self.molre, self.pool, self.head = molre, pool, head

    @classmethod
    def from_config(cls, cfg: RunConfig, width: int, dims: int, device=None) -> FeatureHead:
        m = cfg.adapter.molre
        molre = None
        if cfg.adapter.kind == "molre":
            molre = MoLRE(width, experts=m.experts, rank=m.rank, router_hidden=m.router_hidden, top_k=m.top_k,
                          dropout=m.dropout, device=device)  # fmt: skip
        pool = AttentionPooling(width, device=device) if dims == 2 else None
        return cls(molre, pool, nn.Linear(width, NUM_FINDINGS, device=device))

    @classmethod
    def from_model(cls, model) -> FeatureHead:
        """A copy of a ``MoLREClassifier``'s MoLRE, pooling and head (same weights)."""
        return cls(copy.deepcopy(model.molre), copy.deepcopy(model.pool), copy.deepcopy(model.head))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.molre is not None:
            feats = self.molre(feats)  # slice-level (2D, [B,S,d]) or volume-level (3D, [B,d]) routing
        if self.pool is not None:
            feats = self.pool(feats)
        return self.head(feats)

    def aux_loss(self) -> torch.Tensor | None:
        return self.molre.last_balance_loss if self.molre is not None else None


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``molre.`` / ``pool.`` / ``head.`` entries of a classifier's (or a FeatureHead's) state dict."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(("molre.", "pool.", "head."))}


@dataclass
class CachedTrialResult:
    best_metric: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)  # keys as head_state()
    seconds: float = 0.0


def train_on_features(
    cfg: RunConfig,
    cache: FeatureCache,
    device: torch.device | str | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> CachedTrialResult:
    """Train MoLRE + pooling + head on the cached features with the run's optimizer, loss, RFS and early stop.

    Global batch = ``train.batch_size * scaling.num_workers`` (what the end-to-end run steps with); metrics per
    epoch are the worker loop's (``val/mean_auc`` and the AUC summary), passed to ``on_epoch`` (e.g. tune.report).
    """
    from molre.data.sampling import epoch_indices, image_repeat_factors
    from molre.train.checkpoint import TrainState, trained_state
    from molre.train.loop import METRIC, make_optimizer
    from molre.train.loss import FocalLoss, prevalence_alpha
    from molre.train.metrics import per_finding_auc, summarize

    start = time.perf_counter()
    check_cacheable(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, val = cache.splits["train"], cache.splits["val"]
    torch.manual_seed(cfg.train.seed)
    model = FeatureHead.from_config(cfg, int(cache.meta["width"]), int(cache.meta["dims"]), device)
    optimizer = make_optimizer(model, cfg)
    labels_np, known_np = train.labels.numpy(), train.known.numpy()
    alpha = cfg.loss.alpha
    if alpha == "prevalence":
        alpha = prevalence_alpha(labels_np, known_np, clip=tuple(cfg.loss.alpha_clip)).astype(np.float32)
    loss_fn = FocalLoss(cfg.loss.gamma, alpha).to(device)
    repeat = image_repeat_factors(labels_np, cfg.data.rfs_threshold, known_np)
    x_all, y_train, k_train = (t.to(device) for t in (train.features, train.labels, train.known))
    x_val = val.features.to(device)
    batch = cfg.train.batch_size * cfg.scaling.num_workers
    params = [p for p in model.parameters() if p.requires_grad]
    state, best = TrainState(), trained_state(model)
    for epoch in range(cfg.train.max_epochs):
        model.train()
        order = torch.as_tensor(epoch_indices(repeat, epoch, cfg.train.seed), device=device)
        x_train = x_all[epoch % train.copies] if train.copies else x_all  # this epoch's augmented copy
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = loss_fn(model(x_train[idx]), y_train[idx], k_train[idx])
            aux = model.aux_loss()
            if aux is not None and cfg.adapter.molre.balance_loss_weight > 0:
                loss = loss + cfg.adapter.molre.balance_loss_weight * aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            total += loss.detach().item() * len(idx)
        model.eval()
        with torch.no_grad():
            scores = torch.sigmoid(model(x_val)).cpu().numpy()
        aucs = per_finding_auc(scores, val.labels.numpy(), val.known.numpy())
        metrics = {"train/loss": total / max(len(order), 1), "train/volumes": len(order),
                   **summarize(aucs).as_dict("val/"), "val/volumes": len(val),
                   **{f"val/auc/{fid}": float(a) for fid, a in zip(FINDING_IDS, aucs, strict=True)}}  # fmt: skip
        if state.record(epoch, metrics, METRIC):
            best = trained_state(model)
        metrics.update(
            {"epoch": epoch, "best_epoch": state.best_epoch, "val/best_mean_auc": state.best_metric}
        )
        if on_epoch is not None:
            on_epoch(metrics)
        if state.should_stop(cfg.train.min_epochs, cfg.train.patience, cfg.train.max_epochs):
            break
    return CachedTrialResult(state.best_metric, state.best_epoch, state.history, best,
                             time.perf_counter() - start)  # fmt: skip


def cached_trial(
    cfg: RunConfig,
    root: str,
    device: torch.device | str | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    augment_copies: int = 0,
) -> CachedTrialResult:
    """One sweep trial at the cached-feature fidelity: ensure the cache (computed once per key), then train on it."""
    cache = build_feature_cache(cfg, root, device=device, augment_copies=augment_copies)
    return train_on_features(cfg, cache, device=device, on_epoch=on_epoch)
