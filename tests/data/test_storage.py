"""Storage layer: local and s3:// (moto server on loopback), atomic writes, bounded retries."""

from __future__ import annotations

import hashlib
import os

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


# ---- what Ray workers get, missing buckets, missing credentials -------------------------------------------


def test_forwarded_env_never_holds_a_secret(monkeypatch):
    """Ray keeps a runtime env in plain text (task / actor state, log files): where and how only, no key."""
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "t0k3n",
    }
    public = {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_PROFILE": "molre",
        "AWS_SHARED_CREDENTIALS_FILE": "/etc/molre/aws-credentials",
        "AWS_CA_BUNDLE": "/etc/ssl/ca.pem",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/molre",
        storage.RETRY_ENV: "8,0.5,10",
    }
    for key, value in {**secrets, **public}.items():
        monkeypatch.setenv(key, value)
    env = storage.forwarded_env()
    assert env.items() >= public.items()
    assert not set(secrets) & set(env) and not set(secrets.values()) & set(env.values())


def _missing_bucket() -> str:
    import uuid

    return f"s3://molre-missing-{uuid.uuid4().hex[:12]}"


def _buckets(endpoint: str) -> list[str]:
    import boto3

    return [b["Name"] for b in boto3.client("s3", endpoint_url=endpoint).list_buckets()["Buckets"]]


def test_a_missing_bucket_is_a_storage_error_naming_the_uri(s3_env):
    """Not a bare FileNotFoundError ("no such object"), an empty listing or False: the URI and the bucket."""
    bucket = _missing_bucket()
    uri = storage.join(bucket, "prefix", "manifest.json")
    said = rf"{uri}: \w+ failed: bucket {bucket} does not exist"
    operations = {
        "read": lambda: storage.read_bytes(uri),
        "write": lambda: storage.write_bytes(uri, b"{}"),
        "exists": lambda: storage.exists(uri),
        "size": lambda: storage.size(uri),
        "sha256": lambda: storage.sha256(uri),
        "delete": lambda: storage.delete(uri),
        "read many": lambda: storage.read_many([uri]),
    }
    for op, call in operations.items():
        with pytest.raises(StorageError, match=said):
            call()
            pytest.fail(f"{op} on a missing bucket raised nothing")
    with pytest.raises(StorageError, match=rf"{bucket}/prefix: list failed: bucket {bucket} does not exist"):
        storage.list_dir(storage.join(bucket, "prefix"))
    with pytest.raises(StorageError, match=rf"^{bucket}/out: bucket {bucket} does not exist"):
        storage.check_bucket(storage.join(bucket, "out"))
    assert bucket.removeprefix("s3://") not in _buckets(s3_env)  # HeadBucket only: nothing created


def test_check_bucket_passes_an_existing_bucket_and_local_paths(s3_bucket, tmp_path):
    storage.check_bucket(storage.join(s3_bucket, "out"))
    storage.check_bucket(s3_bucket)
    storage.check_bucket(str(tmp_path / "not-yet-there"))  # local: created on write, nothing to check
    assert storage.list_dir(s3_bucket) == []  # and nothing written


def test_check_bucket_says_access_denied(s3_bucket, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks the (unknown) key now
    with pytest.raises(StorageError, match=rf"^{s3_bucket}/out: access to bucket {s3_bucket} denied"):
        storage.check_bucket(storage.join(s3_bucket, "out"))


def test_no_credentials_is_a_clear_error_at_once(s3_bucket, monkeypatch):
    """A Ray node without credentials (molre forwards none): a StorageError naming the URI and what to do, not
    retried (no retry can find credentials)."""
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    uri = storage.join(s3_bucket, "x.json")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems (and their credentials) per process
    try:
        with pytest.raises(StorageError) as info:
            storage.read_bytes(uri)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # no credential-less filesystem for later tests
    message = str(info.value)
    assert message.startswith(f"{uri}: read failed: NoCredentialsError"), message
    assert "credentials of its own" in message and "attempts" not in message


# ---- identity: has a file or folder changed, from one listing ------------------------------------------


def test_identity_names_each_file_with_its_size_and_change_marker(root):
    import time

    a, b = storage.join(root, "w", "a.bin"), storage.join(root, "w", "sub", "b.bin")
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"beta")
    folder = storage.identity(storage.join(root, "w"))
    assert sorted(folder) == ["a.bin", "sub/b.bin"]  # recursive, relative to the folder
    markers = {"etag"} if "://" in root else {"mtime_ns", "ctime_ns", "inode"}
    assert folder["a.bin"]["size"] == 5 and set(folder["a.bin"]) == {"size", *markers}
    assert storage.identity(a) == {"a.bin": folder["a.bin"]}  # a file: itself, by its name
    time.sleep(0.02)  # past the local clock's tick: a rewrite gets a later mtime
    storage.write_bytes(b, b"BETA")  # replaced: same size, other content
    storage.write_bytes(a, b"alpha")  # the same content again (a re-upload, a copy over it)
    again = storage.identity(storage.join(root, "w"))
    assert again["sub/b.bin"]["size"] == 4 and again["sub/b.bin"] != folder["sub/b.bin"]
    if "://" in root:  # S3's ETag follows the content: an identical re-upload keeps it
        assert again["a.bin"] == folder["a.bin"]
    else:  # a local rewrite is a change (mtime); whether its content is the same is for the caller to check
        assert again["a.bin"] != folder["a.bin"]
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.identity(storage.join(root, "nope"))


def test_identity_notices_a_local_file_replaced_with_the_same_size_and_mtime(tmp_path):
    """``rsync -a`` / ``cp -p`` give a replacement the old mtime: the kernel's ctime and the new inode tell."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"old weights")
    before = storage.identity(str(weights))
    stat = weights.stat()
    replacement = tmp_path / ".model.safetensors.tmp"  # written beside, renamed over (as rsync does)
    replacement.write_bytes(b"new weights")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, weights)
    after = storage.identity(str(weights))
    [(name, was)], [(_, now)] = before.items(), after.items()
    assert name == "model.safetensors" and (now["size"], now["mtime_ns"]) == (was["size"], was["mtime_ns"])
    assert now != was and now["inode"] != was["inode"]
    overwritten = storage.identity(
        str(weights)
    )  # rewritten in place, then the mtime set back: the ctime tells
    with open(weights, "r+b") as f:
        f.write(b"NEW")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = storage.identity(str(weights))["model.safetensors"]
    assert again["inode"] == overwritten["model.safetensors"]["inode"]
    assert again["mtime_ns"] == was["mtime_ns"] and again != overwritten["model.safetensors"]


def test_identity_of_a_missing_bucket_is_a_storage_error(s3_env):
    bucket = _missing_bucket()
    uri = storage.join(bucket, "weights")
    with pytest.raises(StorageError, match=rf"{uri}: identity failed: bucket {bucket} does not exist"):
        storage.identity(uri)


def test_identity_follows_links_and_names_a_broken_one(tmp_path):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "x").write_bytes(b"12345678")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").symlink_to(tmp_path / "blobs" / "x")  # a Hugging Face snapshot
    found = storage.identity(str(tmp_path / "snap"))
    assert found["model.safetensors"]["size"] == 8  # the blob's, not the link's
    (tmp_path / "snap" / "broken").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(FileNotFoundError, match="broken"):
        storage.identity(str(tmp_path / "snap"))
