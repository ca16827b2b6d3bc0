"""Shared benchmark plumbing: machine facts, load average, step timing, peak-memory probes, JSON rows.

Timing: every case is warmed up (compile, allocator, lazy init), then timed step by step with a device sync after
each step; the figure is the median step (a burst of load from a neighbouring process stays out of it), with the
fastest step and, on CPU, the process CPU time per step (all threads) beside it: on a machine shared with other
jobs the CPU time is the step's own work, which the neighbours' load inflates far less than the wall time.

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps (reset first), i.e. what the caching allocator
  handed out, weights and optimizer state included.
- CPU (method ``rss-sampled``): a thread samples the process RSS every ~1 ms during the timed steps; the figure is
  (sampled peak - RSS just before, after ``gc`` + ``malloc_trim``) + the model's resident tensors (parameters,
  buffers, optimizer state, the input batch) counted from their sizes. glibc may keep freed pages, so the transient
  part is a lower bound; treat CPU memory as indicative only.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], object], steps: int, device: torch.device, cpu_times: list[float] | None = None
) -> list[float]:
    """Wall seconds of each of ``steps`` calls, synchronising the device after each.

    ``cpu_times`` (optional) collects each call's process CPU seconds (all threads, ``time.process_time``): on a
    shared CPU this is the step's own work, which a neighbour's load inflates far less than the wall time.
    """
    times = []
    for _ in range(steps):
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu)
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *extra) -> int:
    """Parameters + buffers + optimizer state (+ extra tensors) of one model, shared storage counted once."""
    tensors = [*model.parameters(), *model.buffers(), *extra]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensor_bytes(tensors)


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.transient`` (bytes above the level at entry) and ``pm.method``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda-max-allocated" if device.type == "cuda" else "rss-sampled"
        self.transient = 0
        self.peak_allocated = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._base = _rss()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self.transient = self.peak_allocated - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss())
            self.transient = self._peak - self._base
        return False


def emit(row: dict) -> dict:
    """Print one JSON line (flushed) and return the row."""
    print(json.dumps(row, default=_json_default), flush=True)
    return row


def write_json(path, value) -> None:
    """A results file: ``value`` as indented JSON, its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


def _json_default(value):
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
