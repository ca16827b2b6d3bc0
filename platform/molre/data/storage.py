"""One small storage layer for local paths and ``s3://`` URIs (fsspec; s3fs imported only for s3://).

- The S3 endpoint comes from the standard AWS variables (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``);
  credentials and region follow botocore's usual chain (env, profile, instance role).
- **Secrets never travel to Ray.** ``forwarded_env`` (what the drivers put in the runtime env of Ray workers that
  they did not start) holds only where and how to reach storage: endpoint, region, profile and config-file paths,
  CA bundle, the web-identity (IRSA) token file and role, ``MOLRE_STORAGE_RETRY``. Never ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN`` or ``AWS_ACCESS_KEY_ID``: Ray keeps a runtime env in plain text in its task / actor state
  (dashboard, ``ray list``) and its log files. The nodes of a cluster molre joins need credentials of their own
  (instance role, IRSA, a profile file); without any, an operation fails with a ``StorageError`` naming the URI.
- **Buckets are never created.** ``check_bucket`` (HeadBucket) says "bucket does not exist" / "access denied" for
  an s3:// URI before anything is written there; every operation here turns S3's NoSuchBucket into a
  ``StorageError`` naming the URI (not a bare ``FileNotFoundError``, which means "no such object").
- ``write_bytes`` is atomic: the data goes to ``<name>.tmp-<uuid>`` first and is renamed (local) or copied and
  deleted (S3) to the final name, so a half-written object is never visible under the final name.
- Every operation retries transient errors (connection resets, timeouts, throttling) with bounded exponential
  backoff; after the budget a ``StorageError`` names the URI and the operation. The budget is ``DEFAULT_RETRY``
  unless ``MOLRE_STORAGE_RETRY`` (``attempts[,base_delay_s[,max_delay_s]]``) says otherwise; it is read at each
  operation, in whatever process runs it, so the variable must reach Ray workers (``forwarded_env``).
"""

from __future__ import annotations

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
# what a Ray worker needs to reach the same storage the same way as the driver (forwarded when it may lack them):
# where and how, never a secret (Ray shows a runtime env in its task / actor state and writes it to its logs)
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",  # IRSA / web identity: a path to a token file, plus the role to assume
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_EC2_METADATA_DISABLED",
    RETRY_ENV,
)
# never forwarded (the key id alone is no use to a worker and names the account's key)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_NO_CREDENTIALS_HINT = (
    "molre never sends AWS keys to Ray workers: give every node credentials of its own (an instance role, IRSA, "
    "or a profile file named by AWS_SHARED_CREDENTIALS_FILE / AWS_PROFILE)"
)

# Errors that say "this object/path is not there or not allowed": retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# botocore errors that no retry can fix (it raises them before any request): by class name, botocore unimported
_PERMANENT_BOTO = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "ParamValidationError",
    "NoRegionError",
    "ProfileNotFound",
    "InvalidConfigError",
}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"}


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
    """The storage variables (``FORWARDED_ENV``) set in this process, for the runtime env of Ray workers: where
    and how to reach storage, never a credential (``SECRET_ENV``)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in SECRET_ENV}


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


def bucket_of(uri: str) -> str:
    """``s3://bucket/a/b`` -> ``bucket``."""
    return str(uri).split("://", 1)[-1].split("/", 1)[0]


def _missing_bucket(err: BaseException) -> bool:
    """Whether a ``FileNotFoundError`` from s3fs means "no such bucket" (S3's NoSuchBucket behind it), not "no
    such object"."""
    seen: BaseException | None = err
    for _ in range(8):  # the chain s3fs builds is short
        if seen is None:
            break
        code = (getattr(seen, "response", None) or {}).get("Error", {}).get("Code")
        if code == "NoSuchBucket" or "specified bucket does not exist" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _no_bucket_error(uri: str, op: str) -> StorageError:
    return StorageError(
        f"{uri}: {op} failed: bucket s3://{bucket_of(uri)} does not exist (molre never creates buckets: check the "
        "name, or create the bucket first)"
    )


def check_bucket(uri: str) -> None:
    """For an s3:// URI: the bucket exists and these credentials may use it (one HeadBucket, with the retry
    policy), else a ``StorageError`` naming ``uri`` and saying which. Local paths: nothing to check.

    Call it before writing under ``uri``: nothing in molre creates a bucket, but Ray's storage check (``mkdir``
    through s3fs) would create a mistyped one where the credentials allow it."""
    if not is_s3(uri):
        return
    bucket = bucket_of(uri)
    if not bucket:
        raise StorageError(f"{uri}: no bucket name (expected s3://bucket/prefix)")
    fs, _ = filesystem(uri)

    def head() -> None:
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(
                f"{uri}: bucket s3://{bucket} does not exist (molre never creates buckets: check the name, or "
                "create the bucket first)"
            ) from None
        except PermissionError:
            raise StorageError(
                f"{uri}: access to bucket s3://{bucket} denied (HeadBucket: check the credentials and the bucket "
                "policy; s3:ListBucket is needed)"
            ) from None

    with_retries("check bucket", uri, head)


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (*_PERMANENT, StorageError)):
        return False
    if _PERMANENT_BOTO & {c.__name__ for c in type(err).__mro__}:
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
        except FileNotFoundError as err:
            if is_s3(uri) and _missing_bucket(err):
                raise _no_bucket_error(uri, op) from err
            raise
        except MolreError:
            raise
        except Exception as err:
            if not _is_transient(err):
                hint = f"; {_NO_CREDENTIALS_HINT}" if _is_credentials_error(err) else ""
                raise StorageError(f"{uri}: {op} failed: {type(err).__name__}: {err}{hint}") from err
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


def _is_credentials_error(err: BaseException) -> bool:
    return bool(_CREDENTIAL_ERRORS & {c.__name__ for c in type(err).__mro__})


def exists(uri: str) -> bool:
    """Whether an object or folder is at ``uri``; a missing bucket is a ``StorageError``, not False."""
    fs, path = filesystem(uri)

    def _exists() -> bool:
        try:
            fs.info(path)
            return True
        except FileNotFoundError as err:
            if is_s3(uri) and _missing_bucket(err):
                raise  # with_retries names the URI and the bucket
            return False

    return with_retries("exists", uri, _exists)


def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a folder (on S3: a prefix with objects under it)."""
    fs, path = filesystem(uri)
    return bool(with_retries("stat", uri, lambda: fs.isdir(path)))


def list_sizes(uri: str, suffix: str = "") -> dict[str, int]:
    """``{uri: size in bytes}`` of the files directly under ``uri`` whose names end with ``suffix``; {} if the
    folder does not exist."""
    fs, path = filesystem(uri)

    def _ls() -> list[dict]:
        try:
            return [e for e in fs.ls(path, detail=True) if e.get("type") == "file"]
        except FileNotFoundError as err:
            if is_s3(uri) and _missing_bucket(err):
                raise  # a missing bucket is not an empty folder: with_retries names it
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


def read_ranges(uri: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes ``[start, end)`` of each range of one object, fetched concurrently on S3 (a checkpoint's
    tensors without the rest of the file)."""
    if not ranges:
        return []
    fs, path = filesystem(uri)
    starts, ends = [r[0] for r in ranges], [r[1] for r in ranges]
    return with_retries(
        "read", uri, lambda: fs.cat_ranges([path] * len(ranges), starts, ends, on_error="raise")
    )


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
            with_retries("write", uri, lambda: fs.makedirs(os.path.dirname(path), exist_ok=True))
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
        try:
            fs.rm_file(path)
        except FileNotFoundError as err:
            if is_s3(uri) and _missing_bucket(err):
                raise

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


def identity(uri: str) -> dict[str, dict]:
    """What tells whether the file or folder at ``uri`` changed, from one listing, without reading it:
    ``{relative path: {"size": bytes, marker}}`` for the file itself (by its name) or every file under the
    folder (recursively). The marker is S3's ``etag`` (content-derived: a copy or an identical re-upload keeps
    it; a multipart upload's differs from a single PUT's) or a local file's ``mtime_ns``, ``ctime_ns`` and
    ``inode``: any rewrite or ``touch`` changes the mtime, and a file put in its place with the old size and
    mtime (``rsync -a``, ``cp -p``, ``os.utime``) still has a new ctime (set by the kernel, not settable) and,
    written beside and renamed over, a new inode; a ``chmod`` changes the ctime alone (a false change, which
    costs the caller a content check). ``FileNotFoundError`` naming ``uri`` when nothing is there (an empty
    local folder: {})."""
    fs, path = filesystem(uri)
    listing = (lambda: _s3_identity(fs, path)) if is_s3(uri) else (lambda: _local_identity(path))
    found = with_retries("identity", uri, listing)
    if found is None:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    return found


def _local_identity(path: str) -> dict[str, dict] | None:
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):

        def fail(err: OSError) -> None:  # os.walk skips unreadable folders silently otherwise
            raise err

        root = path
        files = [os.path.join(d, n) for d, _, names in os.walk(path, onerror=fail) for n in names]
    else:
        root, files = os.path.dirname(path), [path]
    out = {}
    for file in sorted(files):
        stat = os.stat(file)  # follows links (a Hugging Face snapshot's files link to its blobs)
        out[os.path.relpath(file, root)] = {
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino
        }  # fmt: skip
    return out


def _s3_identity(fs, path: str) -> dict[str, dict] | None:
    try:
        entries = fs.find(path, detail=True)  # an object: itself; a prefix: every object under <prefix>/
    except FileNotFoundError as err:
        if _missing_bucket(err):
            raise  # with_retries names the URI and the bucket
        return None
    if not entries:
        return None  # S3 has no empty folders: nothing there
    root = path.rsplit("/", 1)[0] if set(entries) == {path} else path.rstrip("/")
    out = {}
    for name in sorted(entries):
        info = entries[name]
        marker = str(info.get("ETag") or "").strip('"')
        # no ETag (an S3-compatible store that gives none): the modification time stands in
        key = {"etag": marker} if marker else {"modified": str(info.get("LastModified"))}
        out[relative(name, root)] = {"size": int(info.get("size") or 0), **key}
    return out


def is_temp(uri: str) -> bool:
    return TMP_MARK in str(uri).rsplit("/", 1)[-1]
