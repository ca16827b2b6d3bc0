"""One small storage layer for local paths and ``s3://`` URIs (fsspec; s3fs imported only for s3://).

- The S3 endpoint comes from the standard AWS variables (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``);
  credentials and region follow botocore's usual chain (env, profile, instance role).
- ``write_bytes`` is atomic: the data goes to ``<name>.tmp-<uuid>`` first and is renamed (local) or copied and
  deleted (S3) to the final name, so a half-written object is never visible under the final name.
- Every operation retries transient errors (connection resets, timeouts, throttling) with bounded exponential
  backoff; after the budget a ``StorageError`` names the URI and the operation. The budget is ``DEFAULT_RETRY``
  unless ``MOLRE_STORAGE_RETRY`` (``attempts[,base_delay_s[,max_delay_s]]``) says otherwise; it is read at each
  operation, in whatever process runs it, so the variable must reach Ray workers (``forwarded_env``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from molre.errors import ConfigError, MolreError

log = logging.getLogger(__name__)
T = TypeVar("T")

TMP_MARK = ".tmp-"  # temporary objects are named <final>.tmp-<uuid hex>
S3_SCHEMES = ("s3://", "s3a://")


class StorageError(MolreError, OSError):
    """A storage operation failed for good (after retries); the message names the URI."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total tries, >= 1
    base_delay: float = 0.2  # seconds before the 2nd try; doubles each time (+-25 % jitter)
    max_delay: float = 5.0


DEFAULT_RETRY = RetryPolicy()
RETRY_ENV = "MOLRE_STORAGE_RETRY"  # "attempts[,base_delay_s[,max_delay_s]]", e.g. "8,0.5,10"
# what a Ray worker needs to reach the same storage the same way as the driver (forwarded when it may lack them)
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
    RETRY_ENV,
)

# Errors that say "this object/path is not there or not allowed": retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def retry_policy() -> RetryPolicy:
    """The retry budget of this process: ``MOLRE_STORAGE_RETRY`` when set, else ``DEFAULT_RETRY``."""
    text = os.environ.get(RETRY_ENV, "").strip()
    return _parse_policy(text) if text else DEFAULT_RETRY


@functools.lru_cache(maxsize=8)
def _parse_policy(text: str) -> RetryPolicy:
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) > 3:
            raise ValueError("too many values")
        policy = RetryPolicy(int(parts[0]), *(float(p) for p in parts[1:]))
        if policy.attempts < 1 or not all(
            math.isfinite(d) and d >= 0 for d in (policy.base_delay, policy.max_delay)
        ):
            raise ValueError("out of range")
    except ValueError:
        raise ConfigError(
            f"{RETRY_ENV}={text!r}: expected attempts[,base_delay_s[,max_delay_s]] with attempts >= 1 and "
            "delays >= 0, e.g. '8,0.5,10'"
        ) from None
    return policy


def forwarded_env() -> dict[str, str]:
    """The storage variables (``FORWARDED_ENV``) set in this process, for the runtime env of Ray workers."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEMES)


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/root", "train", "x.parquet")`` -> ``s3://b/root/train/x.parquet`` (also for local paths)."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def relative(uri: str, root: str) -> str:
    """The part of ``uri`` under ``root`` (``root/a/b`` -> ``a/b``)."""
    root = str(root).rstrip("/") + "/"
    if not str(uri).startswith(root):
        raise ValueError(f"{uri} is not under {root}")
    return str(uri)[len(root) :]


def s3_options() -> dict:
    """s3fs keyword arguments from the environment: the endpoint (for MinIO, moto, Ceph ...) and a small
    botocore retry budget (s3fs retries transient errors itself and our loop sits on top)."""
    options: dict = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(uri: str):
    """``(fsspec filesystem, path inside it)`` for a local path or an s3:// URI."""
    import fsspec

    uri = str(uri)
    if is_s3(uri):
        import s3fs  # lazy: only s3:// needs it

        fs = s3fs.S3FileSystem(use_listings_cache=False, **s3_options())
        return fs, uri.split("://", 1)[1]
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path or s3://)")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(path)


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (*_PERMANENT, StorageError)):
        return False
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    # botocore / aiohttp errors that s3fs lets through (EndpointConnectionError, ReadTimeout, ...)
    module = type(err).__module__ or ""
    if module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3")):
        return True
    return isinstance(err, OSError)


def with_retries(op: str, uri: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """Run ``fn()``; retry transient errors with exponential backoff; a permanent error or an exhausted
    budget raises ``StorageError`` naming ``op`` and ``uri`` (FileNotFoundError and molre's own errors pass
    through unchanged)."""
    policy = policy or retry_policy()
    delay = policy.base_delay
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, MolreError):
            raise
        except Exception as err:
            if not _is_transient(err):
                raise StorageError(f"{uri}: {op} failed: {type(err).__name__}: {err}") from err
            if attempt == policy.attempts:
                raise StorageError(
                    f"{uri}: {op} failed after {policy.attempts} attempts: {type(err).__name__}: {err}"
                ) from err
            log.warning(
                "%s %s: %s (attempt %d/%d), retrying", op, uri, type(err).__name__, attempt, policy.attempts
            )
            time.sleep(min(delay, policy.max_delay) * random.uniform(0.75, 1.25))
            delay *= 2
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries("exists", uri, lambda: fs.exists(path))


def list_sizes(uri: str, suffix: str = "") -> dict[str, int]:
    """``{uri: size in bytes}`` of the files directly under ``uri`` whose names end with ``suffix``; {} if the
    folder does not exist."""
    fs, path = filesystem(uri)

    def _ls() -> list[dict]:
        try:
            return [e for e in fs.ls(path, detail=True) if e.get("type") == "file"]
        except FileNotFoundError:
            return []

    base = str(uri).rstrip("/")
    entries = with_retries("list", uri, _ls)
    found = {join(base, e["name"].rsplit("/", 1)[-1]): int(e.get("size") or 0) for e in entries}
    return {k: found[k] for k in sorted(found) if k.endswith(suffix)}


def list_dir(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the files directly under ``uri`` whose names end with ``suffix``; [] if it does not exist."""
    return list(list_sizes(uri, suffix))


def size(uri: str) -> int:
    """Size in bytes of the object at ``uri``."""
    fs, path = filesystem(uri)
    return int(with_retries("size", uri, lambda: fs.size(path)))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return with_retries("read", uri, lambda: fs.cat_file(path))


def read_many(uris: list[str]) -> dict[str, bytes]:
    """``{uri: bytes}`` for many objects of one filesystem, fetched concurrently on S3."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0])
    paths = {filesystem(u)[1]: u for u in uris}
    got = with_retries("read", uris[0], lambda: fs.cat(list(paths), on_error="raise"))
    return {paths[p]: data for p, data in got.items()}


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically write ``data`` to ``uri``: temp object first, then rename / copy-and-delete."""
    fs, path = filesystem(uri)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        if not is_s3(uri):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        with_retries("write", uri, lambda: fs.pipe_file(tmp, data))
        if is_s3(uri):
            with_retries("commit", uri, lambda: fs.copy(tmp, path))
        else:
            os.replace(tmp, path)  # atomic on one POSIX filesystem
    finally:
        _remove_quietly(fs, tmp)


def _remove_quietly(fs, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm_file(path)
    except Exception as err:  # a stray temp object is harmless: it never matches a final name
        log.debug("could not remove temp object %s: %s", path, err)


def delete(uri: str) -> None:
    """Remove one object/file; a missing one is fine."""
    fs, path = filesystem(uri)

    def _rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    with_retries("delete", uri, _rm)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(uri: str, chunk: int = 8 << 20) -> str:
    """Hex sha256 of the object at ``uri``, streamed in ``chunk``-byte pieces."""
    fs, path = filesystem(uri)

    def _hash() -> str:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        return digest.hexdigest()

    return with_retries("sha256", uri, _hash)


def is_temp(uri: str) -> bool:
    return TMP_MARK in str(uri).rsplit("/", 1)[-1]
