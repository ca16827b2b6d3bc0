"""molre.data.prefetch: batches come out in order and unchanged, errors surface at their batch, threads end."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from molre.data.prefetch import device_batches, held_back, host_batches

KEYS = ("hu", "labels")


def _batches(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"shard-{i:05d}.parquet: connection reset")
        yield {"raw": np.full((2, 3), i, np.int16), "id": np.array([f"s{i}a", f"s{i}b"])}


def _decode(batch: dict) -> dict:
    return {
        "hu": batch["raw"].astype(np.int16),
        "labels": (batch["raw"] > 0).astype(np.float32),
        "id": batch["id"],
    }


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "molre-prefetch"]


def test_batches_arrive_in_order_decoded_and_on_the_device():
    out = list(device_batches(_batches(5), torch.device("cpu"), KEYS, _decode))
    assert len(out) == 5
    for i, ((hu, labels), host) in enumerate(out):
        assert hu.dtype == torch.int16 and torch.equal(hu, torch.full((2, 3), i, dtype=torch.int16))
        assert labels.dtype == torch.float32 and bool((labels == (i > 0)).all())
        assert list(host["id"]) == [f"s{i}a", f"s{i}b"]  # host columns come along
    assert not _prefetch_threads()


def test_an_error_in_the_iterator_surfaces_at_its_batch():
    seen = []
    with pytest.raises(OSError, match=r"shard-00003\.parquet: connection reset"):
        for (hu, _), _ in device_batches(_batches(6, fail_at=3), torch.device("cpu"), KEYS, _decode):
            seen.append(int(hu[0, 0]))
    assert seen == [0, 1, 2]  # every good batch before the bad one was delivered
    assert not _prefetch_threads()


def test_held_back_items_still_come_before_an_error():  # the CUDA path holds one batch back while it copies
    issued, seen = [], []
    with pytest.raises(OSError, match=r"shard-00003\.parquet"):
        for item in held_back(_batches(6, fail_at=3), lambda b: issued.append(int(b["raw"][0, 0])) or b):
            seen.append(int(item["raw"][0, 0]))
            assert (
                issued[-1] == seen[-1] + 1 or len(issued) == 3
            )  # the next one is issued before this is used
    assert seen == [0, 1, 2]


def test_the_thread_runs_at_most_depth_ahead_and_stops_when_the_consumer_leaves():
    produced = []

    def counted():
        for i in range(100):
            produced.append(i)
            yield i

    stream = host_batches(counted(), prepare=lambda b: b * 10, depth=2)
    assert next(stream) == 0
    time.sleep(0.3)  # let the thread fill the queue
    assert len(produced) <= 4  # the one taken + 2 queued + 1 waiting to be put
    stream.close()  # leaving the loop early
    assert not _prefetch_threads() and len(produced) < 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_the_copies_match_the_host_batches():
    cuda = torch.device("cuda")
    for i, ((hu, labels), host) in enumerate(device_batches(_batches(4), cuda, KEYS, _decode)):
        assert hu.is_cuda and torch.equal(hu.cpu(), torch.from_numpy(host["hu"]))
        assert torch.equal(labels.cpu(), torch.from_numpy(host["labels"])) and int(hu[0, 0]) == i
