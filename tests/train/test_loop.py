"""Worker-loop pieces that need no Ray cluster: the shard cache and the optimizer."""

from __future__ import annotations

import numpy as np
import torch

from molre.config import build_config
from molre.data.dataset import decode_batch
from molre.models import build_model
from molre.train.loop import ShardCache, make_optimizer


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
    out = []
    for _ in range(n):
        out.append([b["study_hash"].tolist() for b in cache.iter_batches(batch_size=batch_size)])
        cache.settle(torch.device("cpu"))
    return out


def test_shard_cache_reads_once_when_it_fits_and_streams_otherwise():
    shard = FakeShard(5)
    cache = ShardCache(shard, budget_bytes=None, transform=decode_batch)
    passes = _passes(cache, 3)
    assert shard.passes == 1 and cache.state == "cached"  # read once, replayed twice
    assert passes[0] == passes[1] == passes[2] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    (hu,) = {b["hu"].dtype for b in cache.batches}
    assert hu == np.int16 and cache.batches[1]["hu"][1].min() == 3  # decoded int16 volumes, in order
    assert cache.batches[0]["labels"].dtype == np.float32
    assert next(cache.iter_batches(batch_size=4))["hu"].shape == (4, 2, 3, 3)  # another batch size: streamed
    assert shard.passes == 2

    over = FakeShard(5)
    small = ShardCache(over, budget_bytes=100)  # the raw rows are ~0.5 KB each: more than the budget
    _passes(small, 3)
    assert over.passes == 3 and small.state == "stream" and small.batches == []
    never = FakeShard(5)
    _passes(ShardCache(never, budget_bytes=0), 2)
    assert never.passes == 2


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
