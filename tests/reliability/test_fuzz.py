"""Property-based fuzzing of the readers of untrusted bytes: random corruptions (bit flips, truncation, inserted
junk, zeroed ranges, overwritten bytes) of a valid DICOM series and of valid Parquet shards and manifests.

Property: the reader returns, or raises one of molre's own errors (``MolreError``), within a time bound; a
``DataError`` names the damaged item; no message quotes a planted header value. Anything else (a raw
``ValueError`` from pydicom, an ``OSError`` from pyarrow, a hang) is a bug. Inputs are small (16x16 slices, 2-row
shards) so that a few hundred examples run in well under a minute on two cores.

Runs are derandomized (the same examples every CI run); ``MOLRE_FUZZ_RANDOM=1`` draws fresh ones and
``MOLRE_FUZZ_EXAMPLES=N`` sets how many, for longer local campaigns.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molre.data import ingest, shards, storage
from molre.errors import DataError, MolreError
from tests.data.malformed import PHI_STRINGS, phantom, write_good_dicom, write_shard_dataset

EXAMPLES = int(os.environ.get("MOLRE_FUZZ_EXAMPLES", "0")) or None
HANG_SECONDS = 20.0  # one example (a whole series, or one shard read four ways) on a slow, loaded CI core

FUZZ = settings(
    deadline=None,  # wall time is bounded by HANG_SECONDS instead: hypothesis deadlines flake on shared cores
    derandomize=not os.environ.get("MOLRE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    print_blob=True,
)


# ---------------------------------------------------------------------------------------------------- corruption


@st.composite
def corruptions(draw, max_ops: int = 4):
    """A list of edits; positions are fractions of the current length so that shrinking keeps them meaningful."""
    where = st.floats(0, 1, exclude_max=True)
    op = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(0, 7)),
        st.tuples(st.just("truncate"), where),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("zero"), where, st.integers(1, 256)),
        st.tuples(st.just("set"), where, st.integers(0, 255)),
        st.tuples(
            st.just("flip_tail"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)
        ),  # footers, trailers
    )
    return draw(st.lists(op, min_size=1, max_size=max_ops))


def corrupt(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for edit in edits:
        kind, frac = edit[0], edit[1]
        if not out and kind != "insert":
            continue
        at = int(frac * len(out))
        if kind == "flip":
            out[at] ^= 1 << edit[2]
        elif kind == "flip_tail":  # within the last 512 bytes: Parquet footer, DICOM pixel data end
            at = max(0, len(out) - 1 - int(frac * min(512, len(out))))
            out[at] ^= 1 << edit[2]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = edit[2]
        elif kind == "zero":
            out[at : at + edit[2]] = bytes(len(out[at : at + edit[2]]))
        elif kind == "set":
            out[at] = edit[2]
    return bytes(out)


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz")


def bounded(fn):
    """Run ``fn()`` in a worker thread: its result, or its exception re-raised; a hang fails the example."""
    future = _POOL.submit(fn)
    try:
        return future.result(timeout=HANG_SECONDS)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"reader did not return within {HANG_SECONDS:.0f} s (hang)")


def assert_clean(err: MolreError, names: tuple[str, ...]) -> None:
    text = str(err)
    for phi in PHI_STRINGS:
        assert phi.lower() not in text.lower(), f"planted PHI in: {text}"
    if isinstance(err, DataError):
        assert any(err.path.startswith(n) or n.startswith(err.path) for n in names), (err.path, names)
        assert err.reason


# ---------------------------------------------------------------------------------------------------- DICOM

DICOM_SLICES = 8


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory) -> list[bytes]:
    """The bytes of each file of a valid 8-slice CT series with planted PHI (16x16 pixels)."""
    folder = tmp_path_factory.mktemp("fuzz_dicom") / "series"
    paths = write_good_dicom(folder, phantom(DICOM_SLICES, 16, 16))
    return [p.read_bytes() for p in paths]


def _ingest_all(folder: Path) -> list[MolreError]:
    errors: list[MolreError] = []
    try:
        refs, rejects = ingest.discover(folder)
    except MolreError as err:
        return [err]
    errors += rejects
    for ref in refs:
        try:
            ingest.load_series(ref)
        except MolreError as err:
            errors.append(err)
    return errors


@pytest.mark.slow
@settings(FUZZ, max_examples=EXAMPLES or 150)
@given(target=st.integers(0, DICOM_SLICES - 1), edits=corruptions(), second=st.none() | st.integers(0, 7))
def test_corrupted_dicom_never_escapes_as_a_raw_exception(dicom_series, target, edits, second):
    """One slice (sometimes two) of a good series damaged: discover + load_series return or raise MolreError."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-dicom-"))
    try:
        for i, data in enumerate(dicom_series):
            if i in (target, second):
                data = corrupt(data, edits)
            (folder / f"IM-{i + 1:04d}.dcm").write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors = bounded(lambda: _ingest_all(folder))
        for err in errors:
            assert_clean(err, (str(folder),))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- Parquet


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory) -> dict[str, bytes]:
    """A valid dataset's shard (zstd + page CRCs, as molre writes it) and an uncompressed, CRC-less variant of
    the same rows (damage then lands in values, not only in compressed streams), plus the manifest."""
    root = tmp_path_factory.mktemp("fuzz_shards")
    uri = write_shard_dataset(str(root), {"train": 2})[0]
    plain = root / "plain.parquet"
    table = pq.read_table(uri)
    pq.write_table(
        table.replace_schema_metadata(shards.SCHEMA.metadata), plain, compression="none", row_group_size=1
    )
    return {
        "zstd": Path(uri).read_bytes(),
        "plain": plain.read_bytes(),
        "manifest": (root / shards.MANIFEST).read_bytes(),
    }


def _read_every_way(root: Path, uri: str) -> list[MolreError]:
    """read_shard (whole, column subset, with checksum), verify_shard, decode_volume of every row read."""
    errors: list[MolreError] = []
    calls = (
        lambda: [shards.decode_volume(row) for row in shards.read_shard(uri).to_pylist()],
        lambda: shards.read_shard(uri, ["study_hash", "patient_hash", "split"]).to_pylist(),
        lambda: shards.read_shard(uri, verify=True),
        lambda: shards.verify_shard(uri),
        lambda: shards.read_index(str(root)).to_pylist(),
    )
    for call in calls:
        try:
            call()
        except MolreError as err:
            errors.append(err)
    return errors


@pytest.mark.slow
@settings(FUZZ, max_examples=EXAMPLES or 300)
@given(variant=st.sampled_from(["zstd", "plain"]), edits=corruptions())
def test_corrupted_shard_never_escapes_as_a_raw_exception(shard_files, variant, edits, monkeypatch_retry):
    root = Path(tempfile.mkdtemp(prefix="fuzz-shard-"))
    try:
        uri = str(root / "train" / "shard-0.parquet")
        good = shard_files[variant]
        (root / "train").mkdir()
        (root / "train" / "shard-0.parquet").write_bytes(corrupt(good, edits))
        # the manifest lists the good bytes' checksum: verify=True must refuse any change
        manifest = json.loads(shard_files["manifest"])
        manifest["shards"][0].update(sha256=storage.sha256_bytes(good), bytes=len(good))
        (root / shards.MANIFEST).write_text(json.dumps(manifest))
        errors = bounded(lambda: _read_every_way(root, uri))
        for err in errors:
            assert_clean(err, (uri, str(root), "volume"))
        if corrupt(good, edits) != good:
            assert any("sha256 mismatch" in str(e) for e in errors)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@settings(FUZZ, max_examples=EXAMPLES or 200)
@given(edits=corruptions())
def test_corrupted_manifest_never_escapes_as_a_raw_exception(shard_files, edits):
    root = Path(tempfile.mkdtemp(prefix="fuzz-manifest-"))
    try:
        (root / shards.MANIFEST).write_bytes(corrupt(shard_files["manifest"], edits))
        try:
            bounded(lambda: shards.read_manifest(str(root)))
        except MolreError as err:
            assert_clean(err, (str(root),))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# well-formed Parquet, hostile content: sizes and lengths that do not agree, absurd shapes
_int32 = st.integers(-(2**31), 2**31 - 1)


@pytest.mark.slow
@settings(FUZZ, max_examples=EXAMPLES or 200)
@given(
    shape=st.lists(st.one_of(st.integers(-3, 6), _int32), min_size=0, max_size=5),
    volume=st.binary(max_size=200),
    n_labels=st.sampled_from([0, 74, 75, 76]),
    version=st.sampled_from([1, 1, 0, 2, -1]),
)
def test_hostile_shard_content_is_a_data_error(shape, volume, n_labels, version):
    root = Path(tempfile.mkdtemp(prefix="fuzz-content-"))
    try:
        uri = str(root / "x.parquet")
        row = {"study_hash": "s", "patient_hash": "p", "split": "train", "volume": volume, "shape": shape,
               "spacing": [1.0, 1.0, 1.0], "labels": [0] * n_labels, "known": [1] * n_labels,
               "schema_version": version}  # fmt: skip
        pq.write_table(pa.Table.from_pylist([row], schema=shards.SCHEMA), uri)

        def read_and_decode():
            return [shards.decode_volume(r) for r in shards.read_shard(uri).to_pylist()]

        try:
            volumes = bounded(read_and_decode)
        except MolreError as err:
            assert_clean(err, (uri, "volume"))
        else:  # accepted: then it really is a consistent int16 volume
            assert len(shape) == 3 and min(shape) >= 1 and n_labels == 75 and version == 1
            assert volumes[0].shape == tuple(shape) and volumes[0].nbytes == len(volume)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def monkeypatch_retry(monkeypatch):
    """No retry sleeps: a local file that does not parse must not look like a flaky network (it did: pyarrow's
    OSError for undecodable pages was retried as a transient storage error, 1.4 s per read)."""
    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(attempts=2, base_delay=0.0))


def test_undecodable_shard_is_not_retried_as_a_storage_error(tmp_path, monkeypatch):
    uri = write_shard_dataset(str(tmp_path), {"train": 2})[0]
    data = Path(uri).read_bytes()
    Path(uri).write_bytes(data[:-600] + bytes(592) + data[-8:])  # a zeroed footer: thrift cannot parse it
    attempts = []
    real = storage.with_retries

    def counting(op, where, fn, policy=None):
        def once():
            attempts.append(op)
            return fn()

        return real(op, where, once, policy)

    monkeypatch.setattr(storage, "with_retries", counting)
    with pytest.raises(DataError, match="not a readable Parquet shard"):
        shards.read_shard(uri, ["study_hash"])
    assert attempts == ["read"]  # one attempt: damaged bytes are a DataError, not a transient failure


def test_page_checksums_catch_a_flipped_bit_without_the_manifest(tmp_path):
    """zstd pages carry no checksum; molre writes a CRC per page, so even a read that skips the sha256 check (a
    column subset, Ray Data) cannot return silently wrong voxels."""
    uri = write_shard_dataset(str(tmp_path), {"train": 2})[0]
    data = Path(uri).read_bytes()
    good = pq.read_table(pa.BufferReader(data)).column("volume").to_pylist()
    meta = pq.ParquetFile(uri).metadata
    flips = wrong = 0
    for rg in range(meta.num_row_groups):
        chunk = meta.row_group(rg).column(3)
        assert chunk.path_in_schema == "volume"
        for at in range(chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size, 3):
            flips += 1
            Path(uri).write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
            try:
                table = shards.read_shard(uri, ["volume"])
            except DataError as err:
                assert "CRC" in str(err) or "not a readable Parquet shard" in str(err)
                continue
            wrong += table.column("volume").to_pylist() != good
    assert flips > 50 and wrong == 0


def test_fuzz_inputs_are_valid_before_corruption(dicom_series, shard_files, tmp_path):
    """The property is only meaningful if the uncorrupted inputs read cleanly."""
    folder = tmp_path / "series"
    folder.mkdir()
    for i, data in enumerate(dicom_series):
        (folder / f"IM-{i + 1:04d}.dcm").write_bytes(data)
    assert _ingest_all(folder) == []
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-0.parquet").write_bytes(shard_files["zstd"])
    (tmp_path / shards.MANIFEST).write_bytes(shard_files["manifest"])
    assert _read_every_way(tmp_path, str(tmp_path / "train" / "shard-0.parquet")) == []
    volumes = [
        shards.decode_volume(r) for r in pq.read_table(pa.BufferReader(shard_files["plain"])).to_pylist()
    ]
    assert [v.shape for v in volumes] == [(2, 4, 4)] * 2 and all(v.dtype == np.int16 for v in volumes)


# ---------------------------------------------------------------------------------------------------- search spaces

SPACE_FILES = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))
# YAML that parses into something else: other types, special floats, huge numbers, empty collections, anchors,
# tags, nesting, indentation and flow characters; and extremes put in place of a number (a bound, a choice)
YAML_TOKENS = [
    "~", "null", "true", "[]", "{}", "[1, 2, 3]", "{a: 1}", "[", "]", "{", "}", ":", ": ", "- ", ",", "'", '"',
    "#", "&a ", "*a", "!!str ", "!!python/object:os.system ", "\t", "\n", "\n  ", "    ", "int", "float",
    "logfloat", "choice", "when", "grid", "optuna", "max", "min", "adapter.kind", "\xff", "\x00",
]  # fmt: skip
NUMBER_TOKENS = [
    ".inf", "-.inf", ".nan", "1.0e+308", "-1.0e+308", "99999999999999999999", "999999999", "-1", "0", "0.0",
    "1", "2.5", "1e-400", "[]", "~",
]  # fmt: skip
# a scalar of the file (a number, a word, a dotted key) between YAML's separators; a number
_SCALAR = re.compile(rb"(?<=[\[\s,:{])[-+\w./]+(?=[\]},:\s])")
_NUMBER = re.compile(rb"(?<=[\[\s,:{])[-+]?\d[\d.e+-]*(?=[\]},\s])")


@st.composite
def yaml_edits(draw, max_ops: int = 4):
    """Byte corruptions; YAML tokens inserted at a random place, written over it, or put in place of one of the
    file's scalars; extreme values put in place of one of its numbers (a bound or a choice)."""
    where = st.floats(0, 1, exclude_max=True)

    def tokens(values):
        return st.sampled_from(values).map(lambda t: t.encode("utf-8", "surrogateescape"))

    op = st.one_of(
        corruptions(max_ops=1).map(lambda edits: edits[0]),
        st.tuples(st.sampled_from(["insert", "overwrite", "scalar"]), where, tokens(YAML_TOKENS)),
        st.tuples(st.just("number"), where, tokens(NUMBER_TOKENS)),
    )
    return draw(st.lists(op, min_size=1, max_size=max_ops))


def corrupt_text(data: bytes, edits) -> bytes:
    out = data
    for kind, frac, *rest in edits:
        if kind == "overwrite":
            at = int(frac * len(out))
            out = out[:at] + rest[0] + out[at + len(rest[0]) :]
        elif kind in ("scalar", "number"):
            found = list((_SCALAR if kind == "scalar" else _NUMBER).finditer(out))
            if found:
                hit = found[int(frac * len(found))]
                out = out[: hit.start()] + rest[0] + out[hit.end() :]
        else:
            out = corrupt(out, [(kind, frac, *rest)])
    return out


def _load_and_sample(path: Path):
    """load_sweep, then what a sweep does with an accepted space: enumerate or sample points and build their run
    configs (a point outside the validated sample may still be an invalid config: a ConfigError, never worse)."""
    from molre.tune.space import grid_points, load_sweep, random_point, run_config_for

    spec = load_sweep(path)
    rng = np.random.default_rng(1)
    points = (
        grid_points(spec) if spec.search.algorithm == "grid" else [random_point(spec, rng) for _ in range(4)]
    )
    for point in points[:4]:
        with contextlib.suppress(MolreError):
            run_config_for(spec, point, spec.search.seeds[0])
    return spec


@pytest.mark.slow
@settings(FUZZ, max_examples=EXAMPLES or 300)
@given(source=st.sampled_from(SPACE_FILES), edits=yaml_edits())
def test_corrupted_search_space_never_escapes_as_a_raw_exception(source, edits):
    """A shipped search-space file damaged: load_sweep accepts it (and its points build or fail as ConfigError)
    or raises one of molre's errors naming the file; nothing else, and no hang."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-space-"))
    try:
        path = folder / source.name
        path.write_bytes(corrupt_text(source.read_bytes(), edits))
        try:
            bounded(lambda: _load_and_sample(path))
        except MolreError as err:
            assert str(path) in str(err), f"the message does not name the file: {err}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
