"""Shard format: schema, zstd Parquet round trip (local and s3://), manifest checksums, clear errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from molre.data import shards, storage
from molre.data.shards import Manifest
from molre.errors import DataError
from molre.findings import NUM_FINDINGS


def rows(n=3, shape=(4, 8, 8), split="train", seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        volume = rng.integers(-1024, 3072, size=shape, dtype=np.int16)
        labels = (rng.random(NUM_FINDINGS) < 0.1).astype(np.uint8)
        out.append(
            shards.make_row(f"s{i:015d}", f"p{i:015d}", split, volume, (8.0, 4.0, 4.0), labels, np.ones(75))
        )
    return out


def write_dataset(root, split_rows):
    """Shards + a manifest listing them; returns the manifest."""
    return shards.write_dataset(root, split_rows, {"grid": [4, 8, 8]}, "f")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ds")
    return storage.join(request.getfixturevalue("s3_bucket"), "ds")


def test_round_trip_is_bit_exact(root):
    written = {"train": rows(3), "val": rows(1, split="val", seed=1)}
    manifest = write_dataset(root, written)
    assert shards.read_manifest(root) == manifest
    assert shards.list_shards(root, "train") == [storage.join(root, "train/shard-0.parquet")]
    for split, rs in written.items():
        (uri,) = shards.list_shards(root, split)
        table = shards.read_shard(uri, verify=True)
        assert table.schema.equals(shards.SCHEMA, check_metadata=False)
        for want, got in zip(rs, table.to_pylist(), strict=True):
            np.testing.assert_array_equal(shards.decode_volume(got), shards.decode_volume(want))
            assert got["labels"] == want["labels"] and got["known"] == want["known"]
            assert got["study_hash"] == want["study_hash"] and got["split"] == split
            assert got["spacing"] == [8.0, 4.0, 4.0] and got["schema_version"] == shards.SCHEMA_VERSION


def test_parquet_layout_zstd_one_volume_per_row_group(tmp_path):
    uri = str(tmp_path / "train" / "shard-0.parquet")
    shards.write_shard(uri, rows(3))
    meta = pq.ParquetFile(uri).metadata
    assert meta.num_row_groups == 3
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    # readable as a plain directory of Parquet files (what ray.data.read_parquet sees)
    assert pq.read_table(str(tmp_path / "train")).num_rows == 3


def test_decode_volume_from_bytes_and_errors():
    vol = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 1024
    data = shards.encode_volume(vol)
    assert data == vol.astype("<i2").tobytes()
    out = shards.decode_volume(data, (2, 3, 4))
    np.testing.assert_array_equal(out, vol)
    out[0, 0, 0] = 7  # a writable copy
    with pytest.raises(DataError, match="do not hold"):
        shards.decode_volume(data, (2, 3, 5))
    with pytest.raises(ValueError, match="int16"):
        shards.encode_volume(vol.astype(np.float32))


def test_checksum_mismatch_names_the_shard(root):
    write_dataset(root, {"train": rows(2)})
    (uri,) = shards.list_shards(root, "train")
    shards.write_shard(uri, rows(2, seed=5))  # modified after the manifest was written
    with pytest.raises(DataError, match=r"shard-0.parquet: sha256 mismatch"):
        shards.read_shard(uri, verify=True)


def test_wrong_schema_names_shard_and_column(tmp_path):
    uri = str(tmp_path / "bad.parquet")
    table = pa.Table.from_pylist(rows(1), schema=shards.SCHEMA)
    wrong_type = table.set_column(3, "volume", pa.array(["x"], pa.string()))
    pq.write_table(wrong_type, uri)
    with pytest.raises(DataError, match=r"bad.parquet: column 'volume' has type string"):
        shards.read_shard(uri)
    pq.write_table(table.drop_columns(["known"]), uri)
    with pytest.raises(DataError, match=r"bad.parquet: missing column 'known'"):
        shards.read_shard(uri)
    pq.write_table(table.append_column("patient_name", pa.array(["x"])), uri)
    with pytest.raises(DataError, match=r"unexpected column 'patient_name'"):
        shards.read_shard(uri)
    short = table.set_column(6, "labels", pa.array([[0, 1]], pa.list_(pa.uint8())))
    pq.write_table(short, uri)
    with pytest.raises(DataError, match=r"column 'labels' must hold 75 values"):
        shards.read_shard(uri)
    with open(uri, "wb") as f:
        f.write(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet shard"):
        shards.read_shard(uri)


def test_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        shards.read_manifest(str(tmp_path))
    storage.write_bytes(str(tmp_path / "manifest.json"), b"{not json")
    with pytest.raises(DataError, match="not a valid molre manifest"):
        shards.read_manifest(str(tmp_path))
    future = Manifest(config={}, counts={}, shards=[], salt_fingerprint="f", schema_version=99)
    storage.write_bytes(str(tmp_path / "manifest.json"), future.to_json().encode())
    with pytest.raises(DataError, match="schema_version 99 is not supported"):
        shards.read_manifest(str(tmp_path))


def test_read_index(root):
    write_dataset(root, {"train": rows(2), "test": rows(1, split="test", seed=2)})
    index = shards.read_index(root).to_pylist()
    assert sorted((r["split"], r["shard"]) for r in index) == [
        ("test", "test/shard-0.parquet"),
        ("train", "train/shard-0.parquet"),
        ("train", "train/shard-0.parquet"),
    ]


# ---- rows that fit the schema but not the invariants: the shard, the row and its study are named ------------


def _with(rows_, i, **changes):
    """``rows_`` with row ``i`` changed (a labels list of 74, a volume of another grid ...)."""
    out = [dict(r) for r in rows_]
    out[i].update(changes)
    return out


def test_a_bad_row_names_the_shard_row_and_study_in_every_read(tmp_path):
    uri = str(tmp_path / "train" / "shard-0.parquet")
    good = rows(3)
    cases = {
        "labels": (_with(good, 1, labels=[0] * 74), r"column 'labels' must hold 75 values per row, holds 74"),
        "known": (_with(good, 1, known=[1] * 76), r"column 'known' must hold 75 values per row, holds 76"),
        "volume": (
            _with(good, 1, volume=good[1]["volume"][:-2]),
            r"column 'volume' does not hold int16 \[D,H,W\] of its 'shape' \[4, 8, 8\] \(510 bytes, expected 512\)",
        ),
    }
    for name, (bad, reason) in cases.items():
        shards.write_shard(uri, bad)
        said = rf"^{uri}: row 1 \(study s000000000000001\): {reason}"
        for columns in (None, ["study_hash", "labels", "known", "volume", "shape"]):  # a full read, a subset
            with pytest.raises(DataError, match=said):
                shards.read_shard(uri, columns)
                pytest.fail(f"{name}: accepted by read_shard(columns={columns})")


def test_a_row_off_the_manifest_grid_is_refused(root):
    off_grid = rows(3)
    off_grid[2] = rows(1, shape=(4, 4, 4))[0] | {
        "study_hash": "s000000000000002"
    }  # bytes agree with its shape
    write_dataset(root, {"train": off_grid})  # the manifest's grid is [4, 8, 8]
    (uri,) = shards.list_shards(root, "train")
    said = rf"^{uri}: row 2 \(study s000000000000002\): column 'shape' \[4, 4, 4\] is not the dataset's grid \[4, 8, 8\]"
    with pytest.raises(DataError, match=said):
        shards.read_shard(uri, verify=True)  # the grid comes with the manifest
    with pytest.raises(DataError, match=said):
        shards.read_shard(uri, ["study_hash", "volume", "shape"], grid=(4, 8, 8))
    assert shards.read_shard(uri).num_rows == 3  # without a grid, a consistent row is a valid row
