"""Worker-loop pieces that need no Ray cluster: the shard cache and the train order, the optimizer, the restore
guard."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from molre.config import build_config
from molre.data.dataset import decode_batch
from molre.errors import ConfigError
from molre.models import build_model
from molre.train.checkpoint import (
    FINGERPRINT,
    FINGERPRINT_KEY,
    TrainState,
    run_fingerprint,
    save_checkpoint,
    trained_state,
)
from molre.train.loop import ShardCache, _restore, epoch_batches, make_optimizer


class FakeShard:
    """Ray Data's DataIterator surface the loop uses; counts the passes it streams."""

    def __init__(self, rows: int):
        self.rows, self.passes = rows, 0

    def iter_batches(self, *, batch_size, batch_format="numpy"):
        self.passes += 1
        for start in range(0, self.rows, batch_size):
            n = min(batch_size, self.rows - start)
            vols = [np.full((2, 3, 3), start + i, np.int16) for i in range(n)]
            yield {"volume": np.array([v.tobytes() for v in vols], dtype=object),
                   "shape": np.array([v.shape for v in vols]), "labels": np.ones((n, 75), np.uint8),
                   "known": np.ones((n, 75), np.uint8), "study_hash": np.array([f"s{start + i}" for i in range(n)])}  # fmt: skip


def _passes(cache, n, batch_size=2):
    return [[b["study_hash"].tolist() for b in cache.iter_batches(batch_size=batch_size)] for _ in range(n)]


def test_shard_cache_reads_once_when_kept_and_streams_otherwise():
    shard = FakeShard(5)
    cache = ShardCache(shard, keep=True, transform=decode_batch)
    passes = _passes(cache, 3)
    assert shard.passes == 1  # read once, replayed twice
    assert passes[0] == passes[1] == passes[2] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    (hu,) = {b["hu"].dtype for b in cache.batches}
    assert hu == np.int16 and cache.batches[1]["hu"][1].min() == 3  # decoded int16 volumes, in order
    assert cache.batches[0]["labels"].dtype == np.float32
    assert next(cache.iter_batches(batch_size=4))["hu"].shape == (4, 2, 3, 3)  # another batch size: streamed
    assert shard.passes == 2

    never = FakeShard(5)
    _passes(ShardCache(never, keep=False), 2)
    assert never.passes == 2
    broken = FakeShard(5)
    cache = ShardCache(broken, keep=True)
    next(cache.iter_batches(batch_size=2))  # a pass left unfinished keeps nothing: the next one reads
    assert _passes(cache, 2)[1] == [["s0", "s1"], ["s2", "s3"], ["s4"]] and broken.passes == 2


def _order(batches) -> list[str]:
    return [h for b in batches for h in b["study_hash"].tolist()]


def _position_correlation(a: list[str], b: list[str]) -> float:
    """Correlation of each study's position in two epochs (each study once in each)."""
    where = {h: i for i, h in enumerate(b)}
    return float(np.corrcoef(np.arange(len(a)), [where[h] for h in a])[0, 1])


def test_a_kept_train_shard_is_shuffled_whole_each_epoch_and_a_resumed_run_repeats_it():
    ones, rows = np.ones(75), 200  # repeat factor 1: each study once an epoch
    shard = FakeShard(rows)
    cache = ShardCache(shard, keep=True)
    epochs = [list(epoch_batches(cache, ones, e, seed=3, rank=0, batch_size=8)) for e in range(4)]
    assert shard.passes == 1  # read once, by epoch 0
    studies = sorted(f"s{i}" for i in range(rows))
    assert all(sorted(_order(b)) == studies for b in epochs)  # 200 = 25 batches of 8: no fill
    orders = [_order(b) for b in epochs]
    assert len({tuple(o) for o in orders}) == 4
    # epoch 0 streams through the 32-row buffer: its first batch is drawn from the first 40 rows read; later
    # epochs from the whole shard, and a study's place in one says nothing of its place in the next (a 32-row
    # buffer over the same read order gives ~0.7)
    first = [max(int(h[1:]) for h in b[0]["study_hash"]) for b in epochs]
    assert first[0] < 40 and min(first[1:]) >= 40
    assert abs(_position_correlation(orders[1], orders[2])) < 0.3
    # the same seed and epoch repeat exactly, on a resume too (a fresh process whose first pass is epoch 2)
    resumed = ShardCache(FakeShard(rows), keep=True)
    assert _order(epoch_batches(resumed, ones, 2, seed=3, rank=0, batch_size=8)) == orders[2]
    assert [_order(epoch_batches(resumed, ones, e, 3, 0, 8)) for e in (3, 1)] == [orders[3], orders[1]]
    other_rank = _order(
        epoch_batches(ShardCache(FakeShard(rows), keep=True), ones, 2, 3, rank=1, batch_size=8)
    )
    assert other_rank != orders[2] and sorted(other_rank) == studies
    # a streamed shard: every epoch through the buffer, in read order
    streamed = ShardCache(FakeShard(rows), keep=False)
    assert max(int(h[1:]) for h in next(epoch_batches(streamed, ones, 2, 3, 0, 8))["study_hash"]) < 40


def test_fused_adamw_on_request_and_by_default_only_on_cuda():
    cfg = build_config({})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not make_optimizer(model, cfg).defaults["fused"]  # CPU parameters: torch's foreach default
    fused = make_optimizer(model, cfg, fused=True)
    assert fused.defaults["fused"]
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    results = []
    for opt in (make_optimizer(model, cfg, fused=False), fused):
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        for step in range(3):
            opt.zero_grad()
            model(torch.rand(1, 3, 2, 64, 64, generator=torch.Generator().manual_seed(step))).sum().backward()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, s) for a, s in zip(results[1], start, strict=True))


def _save_finished_run(directory, cfg, dataset_sha256: str) -> None:
    """A checkpoint as a worker writes it (one epoch, finished), with the fingerprint the driver gave it."""
    torch.manual_seed(0)
    model = build_model(cfg)
    setup = {FINGERPRINT_KEY: run_fingerprint(cfg, dataset_sha256)}
    state = TrainState(epoch=0, best_epoch=0, best_metric=0.7, finished=True, history=[{"epoch": 0}])
    save_checkpoint(
        directory, model, make_optimizer(model, cfg), state, cfg, trained_state(model), None, setup
    )


def test_restore_refuses_a_checkpoint_of_another_config_or_dataset(tmp_path, caplog):
    """The workers' guard (the driver checks first, in prepare): a checkpoint is resumed only by its own run."""
    tree = {"train": {"seed": 1, "max_epochs": 3, "run_name": "r", "storage": str(tmp_path / "runs")}}
    cfg = build_config(tree)
    _save_finished_run(tmp_path, cfg, "a" * 64)

    def restore(run_cfg, dataset_sha256):
        torch.manual_seed(0)
        model = build_model(run_cfg)
        setup = {FINGERPRINT_KEY: run_fingerprint(run_cfg, dataset_sha256)}
        return _restore(tmp_path, model, make_optimizer(model, run_cfg), run_cfg, torch.device("cpu"), setup)

    other = build_config(tree, {"train.seed": 2, "optim.lr_head": 5e-4})
    with pytest.raises(ConfigError) as info:
        restore(other, "b" * 64)  # e.g. a finished run's name reused: it must not be reported as this run
    message = str(info.value)
    assert f"run 'r': its checkpoint {tmp_path} belongs to a run with another config or dataset" in message
    assert (
        "optim.lr_head: 0.001 -> 0.0005; train.seed: 1 -> 2; dataset: manifest sha256 aaaaaaaaaaaa" in message
    )
    assert f"Pick another train.run_name, or delete the run folder {tmp_path / 'runs'}/r" in message
    with pytest.raises(
        ConfigError, match=r"belongs to a run with another config or dataset \(dataset: manifest"
    ):
        restore(cfg, "b" * 64)  # same config, other data
    # what may change on a resume: retries, storage location, data location, resources, caches, recompute
    moved = build_config(tree, {"scaling.max_failures": 3, "train.storage": "s3://b/x", "data.uri": "s3://b/d",
                                "scaling.cpus_per_worker": 2, "train.cache_val": False,
                                "train.activation_checkpointing": True})  # fmt: skip
    state, best, _ = restore(moved, "a" * 64)
    assert state.epoch == 0 and state.finished and best
    # a checkpoint written before fingerprints: its config.yaml is compared, its dataset cannot be (a warning)
    (tmp_path / FINGERPRINT).unlink()
    with caplog.at_level(logging.WARNING, logger="molre.train.checkpoint"):
        assert restore(cfg, "b" * 64)[0].epoch == 0
    assert f"has no {FINGERPRINT} (written by an older molre)" in caplog.text
    with pytest.raises(ConfigError, match=r"\(backbone.preset: \"tiny-vit\" -> \"tiny-davit\"\)"):
        restore(build_config(tree, {"backbone.preset": "tiny-davit"}), "a" * 64)


def test_restore_refuses_a_checkpoint_trained_on_other_frozen_weights(tmp_path):
    """A weights file replaced between two attempts of one run: the resumed epochs would train on another
    backbone than the first ones, under the same run."""
    from molre.errors import WeightsError
    from molre.train.checkpoint import FROZEN_SHA256, frozen_digest

    cfg = build_config({"train": {"seed": 1, "max_epochs": 3}})
    torch.manual_seed(0)
    model = build_model(cfg)
    setup = {FINGERPRINT_KEY: run_fingerprint(cfg, "a" * 64), FROZEN_SHA256: frozen_digest(model)}
    state = TrainState(epoch=0, best_epoch=0, best_metric=0.5, history=[{"epoch": 0}])
    save_checkpoint(
        tmp_path, model, make_optimizer(model, cfg), state, cfg, trained_state(model), None, setup
    )
    optimizer = make_optimizer(model, cfg)
    assert _restore(tmp_path, model, optimizer, cfg, torch.device("cpu"), setup)[0].epoch == 0
    other = {**setup, FROZEN_SHA256: "0" * 64}  # what a rebuild from the replaced file digests to
    with pytest.raises(WeightsError, match="is not the one this checkpoint was trained on"):
        _restore(tmp_path, model, optimizer, cfg, torch.device("cpu"), other)
