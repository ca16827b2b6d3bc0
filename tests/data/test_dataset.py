"""Ray Data side of training: how a split reaches the workers (a real local Ray)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from molre.data import dataset, shards
from molre.data.dataset import pad_to_multiple, rfs_batches
from molre.errors import DataError
from molre.findings import NUM_FINDINGS

pytestmark = pytest.mark.slow


def _consume(splits) -> list[list[int]]:
    """Each streaming split read by its own thread, as Ray Train's workers read theirs: ids per split."""
    seen: list[list[int]] = [[] for _ in splits]

    def read(i: int) -> None:
        seen[i] = [int(row["id"]) for row in splits[i].iter_rows()]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(splits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return seen


def _range(rows: int):
    import ray.data

    return ray.data.range(rows, override_num_blocks=min(3, rows))


def test_an_equal_split_alone_drops_the_remainder(ray_local):  # why training pads its split
    seen = _consume(_range(7).streaming_split(2, equal=True))
    assert sum(map(len, seen)) == 6


@pytest.mark.parametrize(("rows", "workers"), [(7, 2), (7, 3), (1, 4), (8, 2)])
def test_padding_keeps_every_row_through_an_equal_split(ray_local, rows, workers):
    padded = pad_to_multiple(_range(rows), rows, workers)
    seen = _consume(padded.streaming_split(workers, equal=True))
    assert {i for ids in seen for i in ids} == set(range(rows))  # no row lost
    assert len({len(ids) for ids in seen}) == 1  # still balanced
    assert sum(map(len, seen)) == rows + (-rows % workers)  # duplicates only to fill the last round
    again = _consume(pad_to_multiple(_range(rows), rows, workers).streaming_split(workers, equal=True))
    assert again == seen  # the same rows reach the same worker: a fixed seed repeats a run


class _RowsShard:
    """A worker's shard as ``rfs_batches`` reads it (``iter_batches`` of numpy columns), from in-memory rows."""

    def __init__(self, n: int, positive: set[int] = frozenset()):
        labels = np.zeros((n, NUM_FINDINGS), np.uint8)
        labels[sorted(positive), 0] = 1
        self.columns = {"study_hash": np.array([f"s{i:03d}" for i in range(n)]), "labels": labels,
                        "known": np.ones((n, NUM_FINDINGS), np.uint8), "volume": np.arange(n)}  # fmt: skip

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy"):
        n = len(self.columns["study_hash"])
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.columns.items()}


@pytest.mark.parametrize("buffer_size", [32, None])
@pytest.mark.parametrize(("rows", "batch_size"), [(45, 4), (3, 4), (64, 8), (1, 2)])
def test_every_training_batch_is_full_and_only_the_fill_repeats(rows, batch_size, buffer_size):
    """One batch shape for a compiled model: the epoch's last short batch is filled with marked repeats."""
    factors = np.ones(NUM_FINDINGS)
    batches = list(rfs_batches(_RowsShard(rows), factors, 0, 0, batch_size, buffer_size=buffer_size))
    assert {len(b["study_hash"]) for b in batches} == {batch_size}
    own = [h for b in batches for h, fill in zip(b["study_hash"], b["top_up"], strict=True) if not fill]
    assert sorted(own) == [f"s{i:03d}" for i in range(rows)]  # each volume once (repeat factor 1), none lost
    fill = sum(int(b["top_up"].sum()) for b in batches)
    assert fill == -rows % batch_size and not any(b["top_up"].any() for b in batches[:-1])


def test_rfs_repeats_and_the_fill_are_seeded():
    factors = np.full(NUM_FINDINGS, 2.5)  # positives repeat 2 or 3 times
    shard = _RowsShard(30, positive={1, 7, 8})
    draw = [[list(b["study_hash"]) for b in rfs_batches(shard, factors, epoch=e, seed=0, batch_size=4)]
            for e in (0, 0, 1)]  # fmt: skip
    assert draw[0] == draw[1] and draw[0] != draw[2]
    batches = list(rfs_batches(shard, factors, 0, 0, 4))
    own = [h for b in batches for h, fill in zip(b["study_hash"], b["top_up"], strict=True) if not fill]
    assert all(2 <= own.count(f"s{i:03d}") <= 3 for i in (1, 7, 8)) and own.count("s000") == 1


def _own(batches) -> list[str]:
    return sorted(
        h for b in batches for h, fill in zip(b["study_hash"], b["top_up"], strict=True) if not fill
    )


def test_a_whole_epoch_shuffle_keeps_the_rfs_copies_and_is_seeded_by_seed_epoch_and_rank():
    """``buffer_size=None`` (a shard held in memory): the epoch, repeats included, shuffled at once; the copies
    are the streamed epoch's (drawn per seed, epoch and study), the order comes from (seed, epoch, rank)."""
    factors = np.full(NUM_FINDINGS, 2.5)  # positives repeat 2 or 3 times
    shard = _RowsShard(120, positive={1, 7, 8, 90, 119})

    def order(epoch=0, rank=0, buffer_size=None) -> list[str]:
        batches = rfs_batches(shard, factors, epoch, 0, 4, buffer_size=buffer_size, rank=rank)
        return [h for b in batches for h in b["study_hash"]]

    whole = list(rfs_batches(shard, factors, 0, 0, 4, buffer_size=None))
    streamed = list(rfs_batches(shard, factors, 0, 0, 4))
    assert _own(whole) == _own(streamed)  # the same volumes, the same repeats
    assert all(2 <= _own(whole).count(f"s{i:03d}") <= 3 for i in (1, 7, 8, 90, 119))
    assert order() == order() and len({tuple(order(e, r)) for e in (0, 1) for r in (0, 1)}) == 4
    assert order() != order(buffer_size=32)
    # the stream's first batch comes from its first 36 rows (32 buffered + 4); the whole epoch's from anywhere
    assert max(int(h[1:]) for h in order(buffer_size=32)[:4]) < 36
    assert max(int(h[1:]) for h in order()[:4]) >= 36


# ---- rows that fit the schema but not the invariants ------------------------------------------------------


def _dataset_with_a_bad_row(root: str, **bad) -> str:
    """Train (4 rows) and val (2) on a [4, 8, 8] grid, train row 2 changed by ``bad``; returns the train shard."""
    rng = np.random.default_rng(0)

    def row(i: int, split: str) -> dict:
        volume = rng.integers(-1024, 3072, size=(4, 8, 8), dtype=np.int16)
        return shards.make_row(f"{split[0]}{i:015d}", f"p{i}", split, volume, (8.0, 4.0, 4.0),
                               np.zeros(NUM_FINDINGS), np.ones(NUM_FINDINGS))  # fmt: skip

    train = [row(i, "train") for i in range(4)]
    train[2] |= bad
    shards.write_dataset(
        root, {"train": train, "val": [row(i, "val") for i in range(2)]}, {"grid": [4, 8, 8]}, "f"
    )
    return shards.list_shards(root, "train")[0]


def test_a_read_task_checks_each_row_against_the_manifest_grid(tmp_path):
    """What a Ray Data read task runs (here in this process): a volume of another grid, whose bytes agree with its
    shape and whose shard passes the checksum and schema checks, is named with its shard, row and study."""
    off_grid = np.zeros((4, 4, 4), np.int16)
    uri = _dataset_with_a_bad_row(str(tmp_path), volume=shards.encode_volume(off_grid), shape=[4, 4, 4])
    checked = dataset.checked_shards(str(tmp_path), "train", verify=True)  # sha256 + schema: all fine
    (task,) = dataset.ShardDatasource(checked, dataset.READ_COLUMNS).get_read_tasks(1)
    said = rf"^{uri}: row 2 \(study t000000000000002\): column 'shape' \[4, 4, 4\] is not the dataset's grid"
    with pytest.raises(DataError, match=said):
        list(task())


def test_label_statistics_name_a_short_label_list(tmp_path):
    uri = _dataset_with_a_bad_row(str(tmp_path), labels=[0] * 74)
    said = rf"^{uri}: row 2 \(study t000000000000002\): column 'labels' must hold 75 values per row, holds 74"
    with pytest.raises(DataError, match=said):
        dataset.label_matrix(str(tmp_path), "train")


def test_the_train_shard_is_kept_when_a_workers_padded_share_fits():
    """Decided by the driver from the manifest and the config: one answer for every worker and every resume."""
    grid = (4, 8, 8)  # a row: 2 * 256 bytes of volume + 1 KiB
    assert dataset.keeps_train_shard(11, grid, 2, 6 * 1536)  # 11 volumes padded to 12: 6 a worker
    assert not dataset.keeps_train_shard(11, grid, 2, 6 * 1536 - 1)
    assert dataset.keeps_train_shard(11, grid, 1, 11 * 1536)
    assert not dataset.keeps_train_shard(11, grid, 1, 11 * 1536 - 1)
    assert not dataset.keeps_train_shard(11, grid, 2, 0)  # train.cache_train_gb 0: never kept
    assert dataset.train_order(True) != dataset.train_order(False)
