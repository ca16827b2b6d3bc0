"""Ray Data side of training: how a split reaches the workers (a real local Ray)."""

from __future__ import annotations

import threading

import pytest

from molre.data.dataset import pad_to_multiple

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
