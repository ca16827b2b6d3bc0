"""Batches on the device one step ahead: host work in a thread, the host-to-device copy on a side stream.

Without it the worker loop decodes a batch, then copies it from pageable memory, and that copy blocks the host
until the GPU has drained the previous step: the GPU idles for the copy (8 x 32 x 224 x 224 int16 = 25.7 MB)
and for whatever host work follows it. Here

- a thread runs the batch iterator (RFS, stacking, ``decode_batch``) and, on CUDA, pins the arrays, up to
  ``depth`` batches ahead (numpy decoding and torch compute release the GIL, so this overlaps on CPU too);
- on CUDA the next batch's copy is issued on a side stream as soon as it is ready, and the compute stream waits
  for its event only when the batch is used, so the copy runs under the current step's kernels.

Order and contents are exactly the iterator's (the RNG of RFS lives in the iterator, run by one thread); an
exception in the iterator (a storage error naming a shard, say) is raised in the consumer at the batch where it
happened. Leaving the loop early stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def host_batches(batches: Iterable, prepare: Callable, depth: int = 2) -> Iterator:
    """``prepare(batch)`` for each batch of ``batches``, computed in a thread up to ``depth`` batches ahead."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(prepare(batch)):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            put(_Failure(err))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="molre-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # the thread ends at its next put; a read it is blocked in (storage retries) must not hold up an error
        thread.join(timeout=10.0)


def pinned_tensors(
    arrays: dict[str, np.ndarray], keys: tuple[str, ...], pin: bool
) -> tuple[torch.Tensor, ...]:
    """``arrays[k]`` as host tensors (page-locked when ``pin``: the copy to the GPU can then be asynchronous)."""
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in keys)
    return tuple(t.pin_memory() for t in tensors) if pin else tensors


def device_batches(
    batches: Iterable,
    device: torch.device,
    keys: tuple[str, ...],
    decode: Callable | None = None,
    depth: int = 2,
) -> Iterator[tuple[tuple[torch.Tensor, ...], dict]]:
    """``(tensors on device, host batch)`` per batch: ``tensors`` = ``decode(batch)[k]`` for ``k`` in ``keys``.

    ``decode`` (default: none) runs in the prefetch thread; the host batch (decoded) comes along for the
    columns that stay on the host (ids, labels for scoring).
    """
    cuda = device.type == "cuda"

    def prepare(batch):
        arrays = decode(batch) if decode is not None else batch
        return pinned_tensors(arrays, keys, pin=cuda), arrays

    host = host_batches(batches, prepare, depth)
    if not cuda:
        for tensors, arrays in host:
            yield tuple(t.to(device) for t in tensors), arrays
        return
    side = torch.cuda.Stream(device)

    def issue(batch):  # -> (tensors on device, copy-done event, host batch)
        tensors, arrays = batch
        with torch.cuda.stream(side):
            moved = tuple(t.to(device, non_blocking=True) for t in tensors)
            done = torch.cuda.Event()
            done.record(side)
        return moved, done, arrays

    for moved, done, arrays in held_back(host, issue):
        yield _hand_over(moved, done, arrays)


def held_back(items: Iterable, issue: Callable) -> Iterator:
    """``issue(item)`` as soon as each item arrives, yielded one item later (item k+1's copy is under way while
    item k is used). An error from ``items`` or ``issue`` is raised after the item before it was yielded, so
    it still comes at the batch where it happened."""
    pending = _END
    try:
        for item in items:
            issued = issue(item)
            if pending is not _END:
                yield pending
            pending = issued
    except Exception:
        if pending is not _END:
            yield pending
        raise
    if pending is not _END:
        yield pending


def _hand_over(tensors, done, arrays):
    """Make the compute stream wait for the copy, and tell the allocator the tensors are used there."""
    current = torch.cuda.current_stream()
    current.wait_event(done)
    for t in tensors:
        t.record_stream(current)
    return tensors, arrays
