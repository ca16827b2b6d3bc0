"""Storage layer: local and s3:// (moto server on loopback), atomic writes, bounded retries."""

from __future__ import annotations

import hashlib

import pytest

from molre.data import storage
from molre.data.storage import RetryPolicy, StorageError

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return storage.join(request.getfixturevalue("s3_bucket"), "out")


def test_round_trip_list_exists_sha(root):
    a, b = storage.join(root, "d", "a.bin"), storage.join(root, "d", "b.parquet")
    assert not storage.exists(a)
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"beta" * 1000)
    assert storage.exists(a) and storage.read_bytes(a) == b"alpha"
    assert storage.list_dir(storage.join(root, "d")) == [a, b]
    assert storage.list_dir(storage.join(root, "d"), suffix=".parquet") == [b]
    assert storage.list_dir(storage.join(root, "missing")) == []
    assert (
        storage.sha256(b)
        == hashlib.sha256(b"beta" * 1000).hexdigest()
        == storage.sha256_bytes(b"beta" * 1000)
    )
    storage.delete(a)
    storage.delete(a)  # missing is fine
    assert storage.list_dir(storage.join(root, "d")) == [b]


def test_atomic_write_leaves_no_temp_and_overwrites(root):
    uri = storage.join(root, "x.json")
    storage.write_bytes(uri, b"1")
    storage.write_bytes(uri, b"22")
    assert storage.read_bytes(uri) == b"22"
    assert storage.list_dir(root) == [uri]  # no .tmp-<uuid> left behind


def test_failed_write_never_shows_final_name(tmp_path, monkeypatch):
    uri = str(tmp_path / "y.bin")
    fs, _ = storage.filesystem(uri)

    def broken_pipe(path, data):
        with open(path, "wb") as f:
            f.write(data[:3])  # half written, then the connection "dies"
        raise PermissionError("denied")

    monkeypatch.setattr(type(fs), "pipe_file", lambda self, path, data, **kw: broken_pipe(path, data))
    with pytest.raises(StorageError, match="y.bin"):
        storage.write_bytes(uri, b"0123456789")
    assert list(tmp_path.iterdir()) == []


def test_read_missing_is_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope"))


def test_retries_transient_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert storage.with_retries("read", "s3://b/k", flaky, FAST) == "ok"
    assert len(calls) == 3


def test_retry_budget_exhausted_names_uri():
    calls = []

    def always():
        calls.append(1)
        raise TimeoutError("slow")

    with pytest.raises(StorageError, match=r"s3://b/k: read failed after 3 attempts"):
        storage.with_retries("read", "s3://b/k", always, FAST)
    assert len(calls) == 3


def test_permanent_error_is_not_retried():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("no")

    with pytest.raises(StorageError, match="s3://b/k"):
        storage.with_retries("write", "s3://b/k", denied, FAST)
    assert len(calls) == 1


def test_unreachable_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setattr(storage, "DEFAULT_RETRY", FAST)
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    with pytest.raises(StorageError, match="s3://nobucket/k"):
        storage.read_bytes("s3://nobucket/k")


def test_join_and_relative():
    assert storage.join("s3://b/r/", "train", "/x.parquet") == "s3://b/r/train/x.parquet"
    assert storage.relative("s3://b/r/train/x.parquet", "s3://b/r") == "train/x.parquet"
    assert storage.is_temp("s3://b/r/x.parquet.tmp-abc") and not storage.is_temp("s3://b/r/x.parquet")
    with pytest.raises(StorageError, match="unsupported"):
        storage.filesystem("gs://b/x")


def test_list_sizes_and_read_many(root):
    a, b = storage.join(root, "a.json"), storage.join(root, "b.json")
    storage.write_bytes(a, b"1")
    storage.write_bytes(b, b"22")
    assert storage.list_sizes(root, ".json") == {a: 1, b: 2}
    assert storage.size(b) == 2
    assert storage.read_many([a, b]) == {a: b"1", b: b"22"}
    assert storage.read_many([]) == {}
