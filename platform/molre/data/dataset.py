"""Ray Data input: preprocessed Parquet shards (local or s3://) -> per-split datasets -> per-worker batches.

The driver checks the shards of a split against the manifest once (schema from each footer, sha256 when asked)
and turns them into a ``ray.data`` dataset with one read task per shard (``ShardDatasource``), in URI order. Each
task reads its shard through molre's storage layer (``shards.read_shard``: retries with backoff, page CRCs, then
a ``StorageError`` or ``DataError`` naming the shard), so an object-store outage during training is retried like
one during preprocessing. Ray Train splits the datasets across workers. On a worker, ``rfs_batches`` applies
Repeat Factor Sampling to its train shard: each volume is repeated floor(r) or floor(r)+1 times, drawn from a
generator seeded by (seed, epoch, study hash), so the draw does not depend on which worker got the volume.

The train order: a streamed epoch reads the shards in URI order every epoch (see ``read_split`` for why) and
shuffles only within a 32-row buffer; epochs >= 1 of a shard held in host memory (``molre.train.loop``'s
``ShardCache``) are shuffled whole, repeats included, from (seed, epoch, rank). Storage is read at most once per
epoch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.train import DataConfig

from molre.data import shards, storage
from molre.data.sampling import class_repeat_factors
from molre.errors import DataError
from molre.findings import NUM_FINDINGS

READ_COLUMNS = ["study_hash", "volume", "shape", "labels", "known"]
ORDER_STREAM = 3  # rfs_batches' shuffle: stream 3 of (seed, epoch, rank) (molre.train.loop._stream_seed)
KEEP_TRAIN_SHARD = "keep_train_shard"  # setup key: the driver's keeps_train_shard for the workers
SHUFFLE_ROWS = 32  # a streamed epoch's shuffle buffer (rows)


def arrow_filesystem(uri: str):
    """A pyarrow filesystem + path for ``uri`` (wrapping the fsspec one, so s3:// honours AWS_ENDPOINT_URL)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


class Shard(NamedTuple):
    """One checked shard of a split: its URI, row count, estimated in-memory size and the dataset's grid (D, H, W),
    from the manifest (the read task checks every row's shape against the grid)."""

    uri: str
    rows: int
    size_bytes: int
    grid: tuple[int, int, int] | None = None


def checked_shards(
    root: str, split: str, verify: bool = True, manifest: shards.Manifest | None = None
) -> list[Shard]:
    """The shards of one split (sorted by URI), checked against the manifest: schema always (one footer read per
    shard), checksums when ``verify`` (the schema then comes from the bytes already fetched)."""
    manifest = manifest or shards.read_manifest(root)
    entries = sorted(manifest.shards_of(split), key=lambda s: s.path)
    if sum(s.rows for s in entries) == 0:
        raise DataError(
            storage.join(root, split), f"split '{split}' is empty: no volumes to train or validate on"
        )
    grid = shards.manifest_grid(manifest, storage.join(root, shards.MANIFEST))
    size = row_bytes(grid) if grid else None
    out = []
    for info in entries:
        uri = storage.join(root, info.path)
        try:
            shards.check_footer(uri, shards.verify_shard(uri, manifest) if verify else None)
        except FileNotFoundError:
            raise _listed_but_missing(uri) from None
        out.append(Shard(uri, info.rows, info.rows * size if size else info.bytes, grid))
    return out


def row_bytes(grid) -> int:
    """In-memory bytes of one row on the grid (D, H, W), an upper bound: the int16 volume + 1 KiB for the study
    hash, shape, labels and known (each row's shape is checked against the grid when read)."""
    return 2 * math.prod(int(n) for n in grid) + 1024


def keeps_train_shard(train_rows: int, grid, world_size: int, budget_bytes: int) -> bool:
    """Whether each worker keeps its train shard in host memory (and so shuffles epochs >= 1 whole): a worker's
    share, ceil(rows / workers) as ``ExactSplitDataConfig`` pads the split, at ``row_bytes`` fits the budget.

    Decided once by the driver from the manifest (rows, grid) and the config, so every worker and every resume
    of the run gets the same answer; the run's fingerprint records the train order it implies
    (``train_order``)."""
    rows = -(-int(train_rows) // int(world_size))
    return rows * row_bytes(grid) <= budget_bytes


def train_order(keep_train_shard: bool) -> str:
    """The train order a run gets, as its fingerprint records it (a resume must keep it)."""
    return (
        "whole-epoch shuffle (shard kept in memory)"
        if keep_train_shard
        else f"{SHUFFLE_ROWS}-row window (streamed)"
    )


def _listed_but_missing(uri: str) -> DataError:
    return DataError(uri, "shard listed in the manifest is missing")


def split_files(
    root: str, split: str, verify: bool = True, manifest: shards.Manifest | None = None
) -> list[str]:
    """The shard URIs of one split, checked against the manifest: schema always, checksums when ``verify``."""
    return [s.uri for s in checked_shards(root, split, verify, manifest)]


class ShardDatasource(Datasource):
    """Ray Data source over checked shards: one read task per shard, in the given order, each reading its
    ``columns`` with ``shards.read_shard`` (storage retries, page CRCs; a ``StorageError`` / ``DataError`` naming
    the shard once the retry budget is spent) and checking its rows (``shards.check_rows``: list lengths, volume
    bytes against the shape, the shape against the manifest's grid; a ``DataError`` naming the shard, the row and
    its study). Nothing is read on the driver."""

    def __init__(self, checked: list[Shard], columns: list[str]):
        super().__init__()
        self.shards = [Shard(*s) for s in checked]
        self.columns = list(columns)

    def get_name(self) -> str:
        return "MolreShards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.size_bytes for s in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        import pyarrow as pa

        schema = pa.schema([shards.SCHEMA.field(c) for c in self.columns], metadata=shards.SCHEMA.metadata)
        return [
            ReadTask(
                _shard_reader(shard.uri, self.columns, shard.grid),
                BlockMetadata(
                    num_rows=shard.rows, size_bytes=shard.size_bytes, exec_stats=None, input_files=[shard.uri]
                ),
                schema=schema,
                per_task_row_limit=per_task_row_limit,
            )
            for shard in self.shards
        ]


def _shard_reader(uri: str, columns: list[str], grid: tuple[int, int, int] | None = None):
    def read() -> Iterable:
        try:
            return [shards.read_shard(uri, columns, grid=grid)]  # + the row checks of these columns
        except FileNotFoundError:
            raise _listed_but_missing(uri) from None

    return read


def read_split(
    root: str,
    split: str,
    verify: bool = True,
    checked: list[Shard] | None = None,
    runtime_env: dict | None = None,
):
    """A ``ray.data.Dataset`` of one split (only the columns training needs), one read task per shard in URI
    order. ``checked``: the split's shards as ``checked_shards`` returned them (else they are listed and checked
    here). ``runtime_env``: for the read tasks (e.g. the storage variables, when the workers may lack them).

    Every execution (epoch) reads in that order. Ray Data could vary it without a barrier (``get_read_tasks``
    gets the ``DataContext`` whose ``_execution_idx`` counts the dataset's finished executions; Parquet's
    ``FileShuffleConfig(reseed_after_execution=True)`` permutes files by it), but the index counts the
    executions of the split coordinator that Ray Train starts with each worker group, from 0: a run resumed at
    epoch k (a re-run, or a restart after a failure) would read epoch k in epoch 0's order, so a fixed seed would
    no longer repeat a run. ``randomize_block_order`` / ``random_shuffle`` are all-to-all barriers that hold the
    whole split in the object store."""
    import ray.data

    checked = checked if checked is not None else checked_shards(root, split, verify)
    return ray.data.read_datasource(ShardDatasource(checked, READ_COLUMNS), runtime_env=runtime_env or None)


class ExactSplitDataConfig(DataConfig):
    """Ray Train's DataConfig without losing a volume to the split. Its ``streaming_split(equal=True)`` drops the
    rows left over after balancing the workers (up to ``world_size - 1``; the same ones every epoch), so

    - ``val`` is split with ``equal=False``: every validation volume is scored exactly once;
    - ``train`` keeps ``equal=True`` (with ``preserve_order`` its row -> worker assignment is deterministic, so a
      fixed seed repeats a run) after being padded with its first rows to a multiple of the worker count, as
      torch's ``DistributedSampler`` pads (``train_rows``: the split's row count, known to the driver).
    """

    def __init__(self, *args, train_rows: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_rows = train_rows

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        balanced = {k: v for k, v in datasets.items() if k != "val"}
        if "train" in balanced and self.train_rows:
            balanced["train"] = pad_to_multiple(balanced["train"], self.train_rows, world_size)
        output = super().configure(balanced, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self._resolve_execution_options("val")
            for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output


def pad_to_multiple(ds, rows: int, n: int):
    """``ds`` (of ``rows`` rows) followed by its first rows, repeated as needed, up to a multiple of ``n`` rows."""
    pad = -rows % n
    if pad == 0 or rows == 0:
        return ds
    parts = [ds] * (pad // rows) + ([ds.limit(pad % rows)] if pad % rows else [])
    return ds.union(*parts)


def label_matrix(root: str, split: str, uris: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, known)`` ``[N, 75]`` of a split, reading only those columns and study_hash (for RFS and focal
    alpha); a row with a wrong list length is a ``DataError`` naming the shard, the row and its study.

    ``uris``: the split's shards, already checked (else they are listed and checked here)."""
    labels, known = [], []
    for uri in uris if uris is not None else split_files(root, split, verify=False):
        table = shards.read_shard(uri, ["study_hash", "labels", "known"])  # checks 75 values per row
        labels.append(
            np.asarray(table["labels"].to_pylist(), dtype=np.uint8).reshape(len(table), NUM_FINDINGS)
        )
        known.append(np.asarray(table["known"].to_pylist(), dtype=np.uint8).reshape(len(table), NUM_FINDINGS))
    return np.concatenate(labels), np.concatenate(known)


def training_statistics(root: str, rfs_threshold: float, alpha_clip, uris: list[str] | None = None) -> dict:
    """Train-split facts every worker needs: RFS class factors and prevalence-based focal alpha (``uris``: the
    train shards, already checked)."""
    from molre.train.loss import prevalence_alpha

    labels, known = label_matrix(root, "train", uris)
    return {
        "class_factors": class_repeat_factors(labels, rfs_threshold, known).tolist(),
        "alpha": prevalence_alpha(labels, known, clip=tuple(alpha_clip)).tolist(),
        "train_volumes": int(len(labels)),
    }


def volume_repeat_factor(labels: np.ndarray, known: np.ndarray, class_factors: np.ndarray) -> float:
    positive = (np.asarray(labels) > 0) & (np.asarray(known) > 0)
    return float(class_factors[positive].max()) if positive.any() else 1.0


def _copies(study_hash: str, r: float, seed: int, epoch: int) -> int:
    """floor(r) + Bernoulli(r - floor(r)), seeded by (seed, epoch, study) and independent of worker order."""
    u = np.random.default_rng([seed, epoch, zlib.crc32(study_hash.encode())]).random()
    return int(np.floor(r)) + int(u < r - np.floor(r))


def rfs_batches(
    shard,
    class_factors: np.ndarray,
    epoch: int,
    seed: int,
    batch_size: int,
    buffer_size: int | None = SHUFFLE_ROWS,
    rank: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of training batches from a worker's shard, with Repeat Factor Sampling and a shuffle buffer.

    ``buffer_size``: rows the shuffle draws from while the shard streams (a volume's repeats land in the buffer
    together, and the buffer spreads them over nearby batches); None: the whole epoch, repeats included, is
    shuffled at once, for a shard held in host memory (the epoch's first batch waits for its last row). The
    copies are drawn per (seed, epoch, study) (``_copies``), the shuffle from (seed, epoch, rank).

    Every batch holds ``batch_size`` volumes: the epoch's last, short one is topped up with volumes drawn from the
    epoch's last rows (a few extra repeats, as RFS makes). A compiled model then sees one batch shape only: a
    second shape would make Dynamo recompile (or, with automatic dynamic shapes, switch every later step to a
    dynamic-shape graph).
    """
    rng = np.random.default_rng([seed, epoch, rank, ORDER_STREAM])
    buffer: list[dict] = []
    for batch in shard.iter_batches(batch_size=8, batch_format="numpy"):
        for i in range(len(batch["study_hash"])):
            row = {k: v[i] for k, v in batch.items()}
            r = volume_repeat_factor(row["labels"], row["known"], class_factors)
            buffer.extend([row] * _copies(str(row["study_hash"]), r, seed, epoch))
        while buffer_size is not None and len(buffer) >= buffer_size + batch_size:
            yield _pop_batch(buffer, rng, batch_size)
    rng.shuffle(buffer)
    for start in range(0, len(buffer), batch_size):
        rows = buffer[start : start + batch_size]
        extra = _top_up(buffer, start, batch_size - len(rows), rng)
        yield _stack(rows + extra, top_ups=len(extra))


def _top_up(tail: list[dict], start: int, missing: int, rng: np.random.Generator) -> list[dict]:
    """``missing`` rows for the last batch: drawn from the tail rows already batched (``tail[:start]``), without
    replacement when there are enough, else from the whole tail with replacement (a shard smaller than a batch)."""
    if missing <= 0:
        return []
    if start >= missing:
        return [tail[i] for i in rng.choice(start, size=missing, replace=False)]
    return [tail[i] for i in rng.integers(len(tail), size=missing)]


def _pop_batch(buffer: list[dict], rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
    picks = sorted(rng.choice(len(buffer), size=batch_size, replace=False).tolist(), reverse=True)
    return _stack([buffer.pop(i) for i in picks])


def _stack(rows: list[dict], top_ups: int = 0) -> dict[str, np.ndarray]:
    """Rows -> a batch dict; ``top_up`` marks the last ``top_ups`` rows (repeats that fill the last batch)."""
    batch = {
        k: np.stack([np.asarray(r[k]) for r in rows]) if k != "volume" else [r[k] for r in rows]
        for k in rows[0]
    }
    batch["top_up"] = np.arange(len(rows)) >= len(rows) - top_ups
    return batch


def decode_batch(batch: dict) -> dict[str, np.ndarray]:
    """A shard batch decoded on the host: ``hu`` int16 ``[B, D, H, W]``, ``labels`` / ``known`` float32
    ``[B, 75]``, ``study_hash`` str ``[B]`` (what a worker's validation cache keeps for the whole run)."""
    return {
        "hu": np.stack(
            [shards.decode_volume(v, s) for v, s in zip(batch["volume"], batch["shape"], strict=True)]
        ),
        "labels": np.stack(list(batch["labels"])).astype(np.float32),
        "known": np.stack(list(batch["known"])).astype(np.float32),
        "study_hash": np.asarray(batch["study_hash"]).astype(str),
        **({"top_up": np.asarray(batch["top_up"])} if "top_up" in batch else {}),  # training batches' fill
    }
