"""Storage faults on the data side, against a real S3-compatible server on loopback that the test stops.

- The server goes away during preprocessing for less than the retry budget: the run retries and finishes with
  exactly the output of an undisturbed run.
- It goes away for longer: the run fails with a ``StorageError`` naming the object, no manifest is written, no
  shard is counted as done unless it is complete, and a re-run once the server is back completes the output
  with no study twice.
- The same during shard reads (``read_shard`` whole and by columns, ``verify_shard``, ``read_manifest``).
- A shard changed after it was written is caught by its checksum before anything trains on it.

Each test owns its S3 endpoint (``StoppableS3``: moto behind a relay that a stop really cuts, open
connections included) so that an outage cannot disturb other tests.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from molre.data import preprocess, shards, storage
from molre.errors import DataError
from tests.data.malformed import write_shard_dataset
from tests.reliability.helpers import SETTINGS, StoppableS3, write_cohort

# Retries are storage's real loop (exponential backoff, +-25 % jitter), with budgets sized for the test:
# LONG_BUDGET waits 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2 s between its 8 attempts, so it outlasts OUTAGE_S even on a
# loaded machine; SHORT_BUDGET gives up after ~0.15 s of waiting during a lasting outage.
LONG_BUDGET = storage.RetryPolicy(attempts=8, base_delay=0.1, max_delay=2.0)
SHORT_BUDGET = storage.RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)
# An outage longer than what the layers below molre absorb (botocore retries a refused connection once, after up
# to 1 s), well inside LONG_BUDGET.
OUTAGE_S = 2.0
REAL_WITH_RETRIES = storage.with_retries


@pytest.fixture
def cohort(tmp_path):
    return write_cohort(tmp_path, n_studies=6, n_patients=4)


def _run(cohort, root: str) -> shards.Manifest:
    return preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )


def _blip(server: StoppableS3, seconds: float) -> threading.Thread:
    """Stop the server now and start it again after ``seconds`` (in the background)."""
    server.stop()
    restart = threading.Timer(seconds, server.start)
    restart.start()
    return restart


def _stop_on(monkeypatch, server: StoppableS3, op: str, nth: int, restart_after: float | None):
    """Stop the server just before the ``nth`` storage operation ``op`` on a shard (``write``: the temp object,
    ``commit``: the copy to the final name); restart it after ``restart_after`` s (None: not at all). Returns the
    shard URIs ``op`` was called for and a count of the attempts that failed."""
    seen: list[str] = []
    failed = {"attempts": 0}
    real = storage.with_retries

    def with_fault(name, uri, fn, policy=None):
        if name == op and str(uri).endswith(shards.SHARD_SUFFIX):
            seen.append(uri)
            if len(seen) == nth:
                if restart_after is None:
                    server.stop()
                else:
                    _blip(server, restart_after)

        def attempt():
            try:
                return fn()
            except Exception:
                failed["attempts"] = failed.get("attempts", 0) + 1
                raise

        return real(name, uri, attempt, policy)

    monkeypatch.setattr(storage, "with_retries", with_fault)
    return seen, failed


@pytest.fixture
def reference(cohort, tmp_path) -> shards.Manifest:
    """The output of an undisturbed run (local disk): what every faulted run must end up with."""
    return _run(cohort, str(tmp_path / "reference"))


def _rows(root: str, manifest: shards.Manifest) -> list[str]:
    return shards.read_index(root, manifest).column("study_hash").to_pylist()


# ---------------------------------------------------------------------------------------------------- preprocess


@pytest.mark.slow
@pytest.mark.parametrize("op", ["write", "commit"])
def test_outage_shorter_than_the_retry_budget_is_survived(op, s3, cohort, reference, monkeypatch, caplog):
    monkeypatch.setattr(storage, "DEFAULT_RETRY", LONG_BUDGET)
    root = storage.join(s3.bucket(), "ds")
    seen, failed = _stop_on(monkeypatch, s3, op, nth=2, restart_after=OUTAGE_S)
    manifest = _run(cohort, root)
    assert s3.stops == 1 and len(seen) >= 2
    assert failed["attempts"] >= 1  # the outage was seen by molre's retry loop (not absorbed below it)
    assert any("retrying" in r.getMessage() for r in caplog.records if r.name == "molre.data.storage")
    assert manifest == reference  # same shards byte for byte (sha256), same counts, same splits
    assert sorted(_rows(root, manifest)) == sorted(_rows_local(reference, cohort))
    for info in manifest.shards:
        shards.verify_shard(storage.join(root, info.path), manifest)
    assert not [k for k in s3.keys(root) if storage.is_temp(k)]


def _rows_local(reference: shards.Manifest, cohort) -> list[str]:
    return _rows(str(cohort["root"] / "reference"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["write", "commit"])
def test_outage_longer_than_the_budget_fails_clearly_and_resumes(op, s3, cohort, reference, monkeypatch):
    monkeypatch.setattr(storage, "DEFAULT_RETRY", SHORT_BUDGET)
    bucket = s3.bucket()
    root = storage.join(bucket, "ds")
    seen, failed = _stop_on(monkeypatch, s3, op, nth=2, restart_after=None)
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        _run(cohort, root)
    assert time.monotonic() - started < 60
    assert failed["attempts"] >= SHORT_BUDGET.attempts  # the whole budget was spent before giving up
    message = str(info.value)
    assert seen[1] in message and "attempts" in message  # names the object and says the budget ran out

    # what the failed run left behind, read straight from the server's backend while it is down
    left = s3.keys(root)
    prefix = root.removeprefix(bucket + "/").removeprefix("s3://")
    assert f"{prefix}/{shards.MANIFEST}" not in left  # never a manifest for an unfinished output
    markers = [json.loads(v) for k, v in left.items() if k.startswith(f"{prefix}/{shards.PROGRESS}/batch-")]
    assert len(markers) == 1  # the first batch finished; the second did not
    for marker in markers:  # a batch counted as done has its complete shard, with the recorded checksum
        shard = left[f"{prefix}/{marker['shard']['path']}"]
        assert (
            storage.sha256_bytes(shard) == marker["shard"]["sha256"]
            and len(shard) == marker["shard"]["bytes"]
        )
    finals = [k for k in left if k.endswith(shards.SHARD_SUFFIX)]
    assert len(finals) == 1  # the interrupted shard is not visible under its final name
    if op == "commit":
        assert any(storage.is_temp(k) for k in left)  # its temporary object is (the server died mid-commit)

    # the server is back: a plain re-run finishes the job, reusing the finished batch
    monkeypatch.setattr(storage, "with_retries", REAL_WITH_RETRIES)
    s3.start()
    resumed = _run(cohort, root)
    assert resumed == reference
    rows = _rows(root, resumed)
    assert len(rows) == len(set(rows)) == resumed.counts["processed"]
    assert not [k for k in s3.keys(root) if storage.is_temp(k)]  # debris swept
    assert resumed.counts["in"] == resumed.counts["processed"] + resumed.counts["quarantined"]


# ---------------------------------------------------------------------------------------------------- reads


@pytest.fixture
def dataset(s3, monkeypatch):
    """A small dataset (train + val shards and their manifest) on the stoppable server."""
    monkeypatch.setattr(storage, "DEFAULT_RETRY", LONG_BUDGET)
    root = storage.join(s3.bucket(), "ds")
    uri = write_shard_dataset(root, {"train": 2, "val": 1})[0]
    manifest = shards.read_manifest(root)
    return root, manifest, uri, shards.read_shard(uri, verify=True)


READS = {
    "read_shard": lambda root, uri: shards.read_shard(uri),
    "read_shard_verified": lambda root, uri: shards.read_shard(uri, verify=True),
    "read_shard_columns": lambda root, uri: shards.read_shard(uri, ["study_hash", "split"]),
    "verify_shard": lambda root, uri: shards.verify_shard(uri),
    "read_manifest": lambda root, uri: shards.read_manifest(root),
}


@pytest.mark.slow
def test_reads_survive_an_outage_within_the_budget(dataset, s3, monkeypatch):
    root, manifest, uri, table = dataset
    _, failed = _stop_on(monkeypatch, s3, "none", nth=0, restart_after=None)  # counts failed attempts only
    for name, read in READS.items():
        before = read(root, uri)
        restart = _blip(s3, OUTAGE_S)
        after = read(root, uri)
        restart.join()
        assert after.equals(before) if name.startswith("read_shard") else after == before, name
        assert failed.pop("attempts", 0) >= 1, name  # molre's retry loop saw the outage, then succeeded
    assert s3.stops == len(READS)


def test_reads_fail_clearly_after_the_budget(dataset, s3, monkeypatch):
    """The server stays down: each read gives up after the budget with a StorageError naming the first object it
    could not get (the manifest, for the reads that check the shard against it)."""
    root, manifest, uri, _ = dataset
    monkeypatch.setattr(storage, "DEFAULT_RETRY", SHORT_BUDGET)
    s3.stop()
    needs = {"read_shard": uri, "read_shard_columns": uri}
    for name, read in READS.items():
        started = time.monotonic()
        with pytest.raises(storage.StorageError) as info:
            read(root, uri)
        assert time.monotonic() - started < 30, name
        assert needs.get(name, storage.join(root, shards.MANIFEST)) in str(info.value), (
            name,
            str(info.value),
        )


# ---------------------------------------------------------------------------------------------------- corruption


def test_a_corrupted_shard_is_caught_by_its_checksum_before_training(dataset, s3):
    """One byte of a shard changed behind molre's back (bit rot, a partial overwrite): verify_shard and the
    training reader's file check refuse it, naming the shard; the other shards still verify."""
    import boto3

    root, manifest, uri, _ = dataset
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 3] ^= 0x04
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    for check in (lambda: shards.verify_shard(uri), lambda: shards.read_shard(uri, verify=True)):
        with pytest.raises(DataError, match="sha256 mismatch") as info:
            check()
        assert info.value.path == uri and "corrupt or modified shard" in info.value.reason
    from molre.data import dataset as ray_dataset  # the training side's gate: every shard verified first

    split = manifest.shards[0].split
    with pytest.raises(DataError, match="sha256 mismatch"):
        ray_dataset.split_files(root, split, verify=True)
    for info in manifest.shards[1:]:
        shards.verify_shard(storage.join(root, info.path), manifest)
