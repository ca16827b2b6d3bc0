"""The preprocessed dataset on storage: zstd Parquet shards, one row per study, plus ``manifest.json``.

Layout under the output root (a local path or ``s3://bucket/prefix``)::

    manifest.json                  counts, config, shard list with sha256 (written last: the run's commit point)
    quarantine.csv                 path,reason for every input that was not processed
    <split>/shard-<id>.parquet     train/, val/, test/ (readable as ray.data.read_parquet("<root>/<split>"))
    _progress/                     run.json (config check) + one marker per finished batch (resume state)

Row schema (``SCHEMA``, version ``SCHEMA_VERSION``)::

    study_hash      string           salted HMAC-SHA256 of the study key, 16 hex
    patient_hash    string           salted HMAC-SHA256 of the patient id, 16 hex
    split           string           train | val | test
    volume          binary           int16 little-endian HU, C-order [D, H, W]
    shape           list<int32>[3]   (D, H, W)
    spacing         list<float32>[3] (z, y, x) mm
    labels          list<uint8>[75]  1 = finding present, FINDING_IDS order
    known           list<uint8>[75]  1 = finding annotated (0 = unknown: masked from loss and metrics)
    schema_version  int16
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from molre.data import storage
from molre.errors import DataError
from molre.findings import FINDING_IDS, NUM_FINDINGS

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
PROGRESS = "_progress"
SHARD_SUFFIX = ".parquet"
ZSTD_LEVEL = 3
ROWS_PER_GROUP = 1  # one volume (~1-3 MB compressed at the default grid) per row group

SCHEMA = pa.schema(
    [
        pa.field("study_hash", pa.string(), nullable=False),
        pa.field("patient_hash", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("volume", pa.binary(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("spacing", pa.list_(pa.float32()), nullable=False),
        pa.field("labels", pa.list_(pa.uint8()), nullable=False),
        pa.field("known", pa.list_(pa.uint8()), nullable=False),
        pa.field("schema_version", pa.int16(), nullable=False),
    ],
    metadata={"molre.schema_version": str(SCHEMA_VERSION), "molre.finding_ids": ",".join(FINDING_IDS)},
)
_SHARD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*/[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet")
LIST_LENGTHS = {"shape": 3, "spacing": 3, "labels": NUM_FINDINGS, "known": NUM_FINDINGS}


# ---------------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    path: str  # relative to the output root: "<split>/shard-<id>.parquet"
    split: str
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """What a preprocessing run produced; ``manifest.json`` at the output root (never holds the salt)."""

    config: dict  # spacing, grid, splits, seed, labels_format, shard_size, ...
    counts: (
        dict  # in / processed / quarantined (+ by reason), per split studies / patients / positives / known
    )
    shards: list[ShardInfo]
    salt_fingerprint: str  # HMAC of a constant under the salt: tells salts apart, reveals nothing
    schema_version: int = SCHEMA_VERSION
    finding_ids: list[str] = field(default_factory=lambda: list(FINDING_IDS))
    format: str = "molre-shards"

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError(f"top level is a {type(raw).__name__}, not an object")
            shards = [ShardInfo(**s) for s in raw.pop("shards")]
            manifest = cls(shards=shards, **raw)
            _check_manifest_types(manifest)
        except (ValueError, TypeError, KeyError) as err:
            raise DataError(where, f"not a valid molre manifest ({type(err).__name__}: {err})") from None
        if manifest.schema_version != SCHEMA_VERSION:
            raise DataError(
                where,
                f"schema_version {manifest.schema_version} is not supported (this molre reads {SCHEMA_VERSION})",
            )
        if tuple(manifest.finding_ids) != FINDING_IDS:
            raise DataError(where, "finding ids differ from this molre's taxonomy (findings.yaml)")
        return manifest


def _check_manifest_types(manifest: Manifest) -> None:
    """JSON that parsed into the dataclasses can still hold the wrong types: say so before anyone uses them."""
    for name, kind in (("config", dict), ("counts", dict), ("salt_fingerprint", str), ("finding_ids", list)):
        if not isinstance(getattr(manifest, name), kind):
            raise TypeError(f"{name!r} must be a {kind.__name__}")
    if type(manifest.schema_version) is not int:
        raise TypeError("'schema_version' must be an integer")
    for info in manifest.shards:
        if not (isinstance(info.path, str) and isinstance(info.split, str) and isinstance(info.sha256, str)):
            raise TypeError(f"shard entry {info.path!r}: path, split and sha256 must be strings")
        if not _SHARD_PATH.fullmatch(info.path) or info.path.split("/")[0] != info.split:
            # never follow a path out of the dataset root (``../``, absolute paths, other URIs)
            raise ValueError(
                f"shard entry {info.path!r} is not '<split>/<name>{SHARD_SUFFIX}' inside the root"
            )
        if type(info.rows) is not int or type(info.bytes) is not int or info.rows < 0 or info.bytes < 0:
            raise TypeError(f"shard entry {info.path!r}: rows and bytes must be non-negative integers")


def read_manifest(uri: str) -> Manifest:
    """The manifest of the dataset rooted at ``uri`` (local path or s3://). No manifest is a ``DataError``; a
    missing bucket a ``StorageError`` saying so."""
    return read_manifest_and_sha256(uri)[0]


def read_manifest_and_sha256(uri: str) -> tuple[Manifest, str]:
    """The manifest and the sha256 of its bytes, from one read: the dataset's identity (the manifest lists every
    shard's sha256, the grid and the preprocessing settings) for run fingerprints and sweep records."""
    where = storage.join(uri, MANIFEST)
    try:
        data = storage.read_bytes(where)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise DataError(
            where, "no manifest: not a preprocessed dataset, or its run has not finished"
        ) from None
    except UnicodeDecodeError:
        raise DataError(where, "not a valid molre manifest (not UTF-8 text)") from None
    return Manifest.from_json(text, where), storage.sha256_bytes(data)


def manifest_grid(manifest: Manifest, where: str = MANIFEST) -> tuple[int, int, int] | None:
    """The dataset's output grid (D, H, W) from the manifest's config (None when it records none)."""
    grid = manifest.config.get("grid")
    if grid is None:
        return None
    if (
        not isinstance(grid, list | tuple)
        or len(grid) != 3
        or not all(type(n) is int and n > 0 for n in grid)
    ):
        raise DataError(where, f"config 'grid' is {str(grid)[:80]}, not three positive sizes (D, H, W)")
    return (grid[0], grid[1], grid[2])


def list_shards(uri: str, split: str, manifest: Manifest | None = None) -> list[str]:
    """Full URIs of the shards of ``split`` listed in the manifest (sorted)."""
    manifest = manifest or read_manifest(uri)
    return sorted(storage.join(uri, s.path) for s in manifest.shards_of(split))


def _root_of(shard_uri: str) -> str:
    return shard_uri.rsplit("/", 2)[0]  # <root>/<split>/<name>


def verify_shard(uri: str, manifest: Manifest | None = None) -> bytes:
    """Check the shard's sha256 against the manifest; returns its bytes. A mismatch is a ``DataError``."""
    root = _root_of(uri)
    manifest = manifest or read_manifest(root)
    rel = storage.relative(uri, root)
    entry = next((s for s in manifest.shards if s.path == rel), None)
    if entry is None:
        raise DataError(uri, "shard is not listed in the manifest")
    data = storage.read_bytes(uri)
    digest = storage.sha256_bytes(data)
    if digest != entry.sha256:
        raise DataError(
            uri,
            f"sha256 mismatch: manifest says {entry.sha256}, shard has {digest} (corrupt or modified shard)",
        )
    return data


# ---------------------------------------------------------------------------------------------------- volumes


def encode_volume(volume: np.ndarray) -> bytes:
    """int16 [D,H,W] -> little-endian C-order bytes."""
    if volume.dtype != np.int16 or volume.ndim != 3:
        raise ValueError(f"volume must be int16 [D,H,W], got {volume.dtype} {volume.shape}")
    return np.ascontiguousarray(volume, dtype="<i2").tobytes()


def decode_volume(row_or_bytes, shape: Sequence[int] | None = None) -> np.ndarray:
    """A shard row (mapping with ``volume`` and ``shape``) or raw bytes + ``shape`` -> int16 [D,H,W] (a copy)."""
    if isinstance(row_or_bytes, Mapping):
        data, shape = row_or_bytes["volume"], row_or_bytes["shape"] if shape is None else shape
    else:
        data = row_or_bytes
    if shape is None:
        raise ValueError("decode_volume needs the shape (D, H, W) with raw bytes")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError("volume", f"shape {shape} is not three positive sizes (D, H, W)")
    if len(data) != 2 * math.prod(shape):  # math.prod: exact, numpy's int64 product can overflow
        raise DataError("volume", f"{len(data)} bytes do not hold an int16 volume of shape {shape}")
    return np.frombuffer(data, dtype="<i2").reshape(shape).astype(np.int16, copy=True)


# ---------------------------------------------------------------------------------------------------- writing


def make_row(
    study_hash: str,
    patient_hash: str,
    split: str,
    volume: np.ndarray,
    spacing: Sequence[float],
    labels: np.ndarray,
    known: np.ndarray,
) -> dict:
    """One shard row (plain Python values, ``SCHEMA`` order)."""
    return {
        "study_hash": study_hash,
        "patient_hash": patient_hash,
        "split": split,
        "volume": encode_volume(volume),
        "shape": [int(n) for n in volume.shape],
        "spacing": [float(s) for s in spacing],
        "labels": np.asarray(labels, dtype=np.uint8).tolist(),
        "known": np.asarray(known, dtype=np.uint8).tolist(),
        "schema_version": SCHEMA_VERSION,
    }


def shard_bytes(rows: Sequence[dict]) -> bytes:
    """Rows -> the bytes of one zstd Parquet file (``ROWS_PER_GROUP`` rows per row group)."""
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    sink = io.BytesIO()
    small = [f.name for f in SCHEMA if f.name != "volume"]
    pq.write_table(
        table,
        sink,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        row_group_size=ROWS_PER_GROUP,
        use_dictionary=["split"],
        write_statistics=small,  # min/max of a multi-MB binary is useless
        # CRC32 per page: zstd carries no checksum, so without this a flipped bit in a page decodes to wrong
        # voxels silently whenever the manifest's sha256 is not checked (column reads, Ray Data)
        write_page_checksum=True,
    )
    return sink.getvalue()


def write_shard(uri: str, rows: Sequence[dict]) -> tuple[str, int]:
    """Write rows atomically to ``uri``; returns (sha256, bytes)."""
    data = shard_bytes(rows)
    storage.write_bytes(uri, data)
    return storage.sha256_bytes(data), len(data)


def write_dataset(
    root: str, rows_by_split: dict[str, Sequence[dict]], config: dict, salt_fingerprint: str
) -> Manifest:
    """One shard per non-empty split (``<split>/shard-0.parquet``) plus the manifest, written last.

    For small datasets built in code (tests, benchmarks); ``preprocess`` writes real ones batch by batch."""
    infos = []
    for split, rows in rows_by_split.items():
        if rows:
            rel = f"{split}/shard-0{SHARD_SUFFIX}"
            sha, size = write_shard(storage.join(root, rel), rows)
            infos.append(ShardInfo(rel, split, len(rows), sha, size))
    manifest = Manifest(config=dict(config), counts={}, shards=infos, salt_fingerprint=salt_fingerprint)
    storage.write_bytes(storage.join(root, MANIFEST), manifest.to_json().encode())
    return manifest


# ---------------------------------------------------------------------------------------------------- reading


def check_schema(schema: pa.Schema, where: str) -> None:
    """``DataError`` naming ``where`` and the column when ``schema`` is not ``SCHEMA`` (ignoring metadata)."""
    for expected in SCHEMA:
        if expected.name not in schema.names:
            raise DataError(where, f"missing column {expected.name!r} (expected {expected.type})")
        found = schema.field(expected.name).type
        if found != expected.type:
            raise DataError(where, f"column {expected.name!r} has type {found}, expected {expected.type}")
    extra = [n for n in schema.names if n not in SCHEMA.names]
    if extra:
        raise DataError(
            where, f"unexpected column {extra[0]!r} (schema version {SCHEMA_VERSION} has {SCHEMA.names})"
        )


def check_table(table: pa.Table, where: str, grid: Sequence[int] | None = None) -> None:
    """Schema plus the per-row invariants (``check_rows``) and schema_version."""
    check_schema(table.schema, where)
    check_rows(table, where, grid)
    versions = set(table.column("schema_version").to_pylist())
    if versions - {SCHEMA_VERSION}:
        raise DataError(where, f"column 'schema_version' holds {sorted(versions)}, expected {SCHEMA_VERSION}")


def check_rows(table: pa.Table, where: str, grid: Sequence[int] | None = None) -> None:
    """The per-row invariants of whichever ``SCHEMA`` columns ``table`` holds (a full shard or a column subset):
    no nulls, list lengths (``LIST_LENGTHS``), positive shape, volume bytes = 2 * prod(shape), and shape = ``grid``
    (the manifest's, when given). A ``DataError`` names ``where`` (the shard), the row and its study_hash when read.

    Cheap: list lengths and byte counts come from Arrow offsets; no volume is decoded."""
    names = [n for n in SCHEMA.names if n in table.column_names]
    for name in names:
        if table.column(name).null_count:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(where, f"{_row(table, row)}: column {name!r} has null values")
    if not table.num_rows:
        return
    for name, length in LIST_LENGTHS.items():
        if name in names:
            lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != length)
            if bad.size:
                row = int(bad[0])
                raise DataError(
                    where,
                    f"{_row(table, row)}: column {name!r} must hold {length} values per row, "
                    f"holds {int(lengths[row])}",
                )
    if "shape" not in names:
        return
    shapes = np.array(table.column("shape").to_pylist(), dtype=np.int64).reshape(-1, 3)
    bad = np.flatnonzero((shapes < 1).any(axis=1))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            where, f"{_row(table, row)}: column 'shape' {shapes[row].tolist()} has a non-positive size"
        )
    if grid is not None:
        want = np.array([int(g) for g in grid], dtype=np.int64)
        bad = np.flatnonzero((shapes != want).any(axis=1))
        if bad.size:
            row = int(bad[0])
            raise DataError(
                where,
                f"{_row(table, row)}: column 'shape' {shapes[row].tolist()} is not the dataset's grid "
                f"{want.tolist()} (manifest.json)",
            )
    if "volume" in names:
        sizes = pc.binary_length(table.column("volume")).to_numpy(zero_copy_only=False).astype(np.int64)
        # Python ints: an absurd shape must not overflow numpy's int64 product into a match
        want_bytes = [2 * math.prod(int(n) for n in shape) for shape in shapes]
        bad = [i for i, (got, want) in enumerate(zip(sizes.tolist(), want_bytes, strict=True)) if got != want]
        if bad:
            row = bad[0]
            raise DataError(
                where,
                f"{_row(table, row)}: column 'volume' does not hold int16 [D,H,W] of its 'shape' "
                f"{shapes[row].tolist()} ({int(sizes[row])} bytes, expected {want_bytes[row]})",
            )


def _row(table: pa.Table, row: int) -> str:
    """``row 3 (study 0123abcd...)``: the study_hash (a salted hash, never an id) when the table holds it."""
    if "study_hash" not in table.column_names:
        return f"row {row}"
    study = table.column("study_hash")[row].as_py()
    return f"row {row} (study {str(study)[:64]})" if study is not None else f"row {row}"


def read_shard(
    uri: str,
    columns: Sequence[str] | None = None,
    *,
    verify: bool = False,
    grid: Sequence[int] | None = None,
) -> pa.Table:
    """One shard as a ``pyarrow.Table`` after schema validation and the row checks (``check_rows``) of the columns
    read. ``verify``: sha256 against the manifest first (whose grid then checks each row's shape); ``grid``: the
    dataset's (D, H, W) to check the shapes against (the manifest's ``config.grid``).

    With ``columns`` (and no ``verify``) only the footer and those column chunks are fetched."""
    if verify or columns is None:
        if verify:
            manifest = read_manifest(_root_of(uri))
            data = verify_shard(uri, manifest)
            grid = (
                grid if grid is not None else manifest_grid(manifest, storage.join(_root_of(uri), MANIFEST))
            )
        else:
            data = storage.read_bytes(uri)
        table = _read_parquet(uri, lambda: pa.BufferReader(data), columns)
    else:
        fs, path = storage.filesystem(uri)
        table = storage.with_retries(
            "read", uri, lambda: _read_parquet(uri, lambda: fs.open(path, "rb"), columns)
        )
    if columns is None:
        check_table(table, uri, grid)
    else:
        check_rows(table, uri, grid)
    return table


def check_footer(uri: str, data: bytes | None = None) -> None:
    """Read only the shard's Parquet footer (or parse ``data``, its bytes, when given) and check the schema: a
    ``DataError`` naming the shard when it is not a readable shard of ``SCHEMA``; storage errors are retried."""
    if data is not None:
        _read_parquet(uri, lambda: pa.BufferReader(data), None, footer_only=True)
        return
    fs, path = storage.filesystem(uri)
    storage.with_retries(
        "read", uri, lambda: _read_parquet(uri, lambda: fs.open(path, "rb"), None, footer_only=True)
    )


def _read_parquet(
    uri: str, source, columns: Sequence[str] | None, footer_only: bool = False
) -> pa.Table | None:
    try:
        with source() as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            check_schema(parquet.schema_arrow, uri)
            if footer_only:
                return None
            table = parquet.read(columns=list(columns) if columns else None)
            table.validate(full=True)  # offsets in bounds, strings UTF-8: what to_pylist() and Ray rely on
            return table
    except (DataError, FileNotFoundError):
        raise
    # ArrowInvalid (bad magic, bad footer), ArrowMemoryError (absurd sizes), UnicodeDecodeError (a string column
    # or metadata that is not UTF-8) ...: the bytes are not a shard
    except (pa.ArrowException, ValueError, TypeError, LookupError) as err:
        raise DataError(
            uri, f"not a readable Parquet shard ({type(err).__name__}: {_one_line(err)})"
        ) from None
    except OSError as err:
        # pyarrow reports undecodable bytes (thrift, zstd, page headers) as a plain OSError without errno; a
        # storage failure keeps its own type (or an errno, s3fs) and goes on to ``storage.with_retries``
        if type(err) is OSError and err.errno is None:
            raise DataError(uri, f"not a readable Parquet shard (corrupt: {_one_line(err)})") from None
        raise


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit]


def read_index(uri: str, manifest: Manifest | None = None) -> pa.Table:
    """``study_hash, patient_hash, split`` of every row of every shard in the manifest, plus ``shard``."""
    manifest = manifest or read_manifest(uri)
    parts = []
    for info in manifest.shards:
        table = read_shard(storage.join(uri, info.path), ["study_hash", "patient_hash", "split"])
        parts.append(table.append_column("shard", pa.array([info.path] * table.num_rows, pa.string())))
    if not parts:
        return pa.table(
            {n: pa.array([], pa.string()) for n in ("study_hash", "patient_hash", "split", "shard")}
        )
    return pa.concat_tables(parts)
