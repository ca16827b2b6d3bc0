"""`molre preprocess` end to end: real DICOM (pydicom) -> Ray -> zstd Parquet shards on a loopback S3 server.

A cohort of 8 tiny studies (16x64x64, 5 patients, one NIfTI) plus a wrong-modality series and an unlabelled one.
Every header carries planted PHI; none of it may reach any output byte or log line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from molre.cli import main
from molre.data import ingest, preprocess, shards, storage
from molre.data.dicom_write import write_dicom_series, write_nifti
from molre.data.resample import align_volume
from molre.data.split import assert_no_patient_leak
from molre.errors import DataError
from molre.findings import FINDING_IDS, NUM_FINDINGS
from tests import tiny_data
from tests.data.malformed import (
    PHI_ACCESSION,
    PHI_ID,
    PHI_INSTITUTION,
    PHI_NAME,
    PHI_STRINGS,
    UNLABELLED,
    write_corpus,
)

SPACING_IN = (5.0, 3.0, 3.0)  # written series, mm (z, y, x)
SPACING_OUT = (8.0, 4.0, 4.0)
GRID = (16, 64, 64)
PHI_DATE = "19770412"
SALT = b"test-salt-not-a-secret-0123456789"
N_FINDINGS_LABELLED = 6
LABELLED = FINDING_IDS[:N_FINDINGS_LABELLED]
SETTINGS = dict(spacing=SPACING_OUT, grid=GRID, salt=SALT, shard_size=3, progress=False)


def head_ct(seed: int, shape=(16, 64, 64)) -> np.ndarray:
    """An off-centre ellipsoidal head in HU: bone shell, brain, a hyperdense blob; air around."""
    return tiny_data.head_ct(
        seed, shape, radii=(7, 24, 20), jitter=4, jitter_scale=(0.5, 1, 1), brain=0.88, blob=True
    )


def write_cohort(root: Path, n_studies: int = 8, n_patients: int = 5) -> dict:
    """DICOM series (one NIfTI) under root/input + a generic labels.csv; returns what was written."""
    rng = np.random.default_rng(0)
    input_dir, rows, uids, patients = root / "input", [], [], {}
    for i in range(n_studies):
        study = f"study_{i:02d}"
        patients[study] = f"{PHI_ID}-{i % n_patients}"
        if i == n_studies - 1:
            write_nifti(head_ct(i), SPACING_IN, input_dir / study / f"{study}.nii.gz")
        else:
            uid = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
            uids.append(uid)
            write_dicom_series(head_ct(i), SPACING_IN, input_dir / study, **phi_headers(patients[study], uid))
        rows.append([study, patients[study], *(rng.random(N_FINDINGS_LABELLED) < 0.35).astype(int)])
    write_dicom_series(
        head_ct(99), SPACING_IN, input_dir / "study_mr", modality="MR", **phi_headers(PHI_ID, None)
    )
    rows.append(["study_mr", PHI_ID, *[0] * N_FINDINGS_LABELLED])
    write_dicom_series(head_ct(98), SPACING_IN, input_dir / "study_nolabel", **phi_headers(PHI_ID, None))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["study_id", "patient_id", *LABELLED], *rows])
    return {"input": input_dir, "labels": labels, "rows": {r[0]: r for r in rows}, "uids": uids}


def phi_headers(patient_id: str, study_uid: str | None) -> dict:
    return dict(
        patient_id=patient_id,
        patient_name=PHI_NAME,
        institution=PHI_INSTITUTION,
        accession=PHI_ACCESSION,
        description=f"head CT of {PHI_NAME}",
        study_date=PHI_DATE,
        study_uid=study_uid,
    )


def expected_rows(cohort: dict, salt: bytes = SALT) -> dict[str, dict]:
    """study_hash -> the row an in-process run of ingest + align_volume gives, with labels from the CSV."""
    refs, _ = ingest.discover(cohort["input"])
    out = {}
    for ref in refs:
        key = next((k for k in ref.study_keys if k in cohort["rows"]), None)
        if key is None or key == "study_mr":
            continue
        vol = ingest.load_series(ref)
        row = cohort["rows"][key]
        out[preprocess.salted_hash(salt, "study", key)] = {
            "volume": align_volume(vol.hu, vol.spacing, vol.direction, out_spacing=SPACING_OUT, grid=GRID),
            "patient_hash": preprocess.salted_hash(salt, "patient", row[1]),
            "labels": [int(v) for v in row[2:]] + [0] * (75 - N_FINDINGS_LABELLED),
            "known": [1] * N_FINDINGS_LABELLED + [0] * (75 - N_FINDINGS_LABELLED),
        }
    return out


def read_all_rows(root: str) -> list[dict]:
    manifest = shards.read_manifest(root)
    out = []
    for info in manifest.shards:
        table = shards.read_shard(storage.join(root, info.path), verify=True)  # sha256 against the manifest
        out.extend(table.to_pylist())
    return out


def output_texts(root: str) -> dict[str, bytes]:
    """Every object under ``root`` as bytes, plus the decoded non-volume content of every Parquet shard."""
    if storage.is_s3(root):
        fs, path = storage.filesystem(root)
        names = ["s3://" + p for p in fs.find(path)]
    else:
        names = [str(p) for p in Path(root).rglob("*") if p.is_file()]
    out = {}
    for name in names:
        data = storage.read_bytes(name)
        out[name] = data
        if name.endswith(".parquet"):
            table = shards.read_shard(name)
            decoded = repr(table.drop_columns(["volume"]).to_pylist()) + repr(table.schema.metadata)
            out[name + "#decoded"] = decoded.encode()
    return out


def assert_no_phi(blobs: dict[str, bytes], extra: tuple[str, ...] = ()) -> None:
    planted = [*PHI_STRINGS, PHI_DATE, SALT.decode(), *extra]
    for name, data in blobs.items():
        for secret in planted:
            assert secret.encode() not in data, f"{secret!r} found in {name}"


def assert_rows_as_expected(rows: list[dict], cohort: dict) -> None:
    """The shard rows are the cohort's studies, each bit for bit as processing it in this process gives."""
    want = expected_rows(cohort)
    assert sorted(r["study_hash"] for r in rows) == sorted(want)
    for row in rows:
        exp = want[row["study_hash"]]
        np.testing.assert_array_equal(shards.decode_volume(row), exp["volume"])
        assert row["patient_hash"] == exp["patient_hash"]
        assert row["labels"] == exp["labels"] and row["known"] == exp["known"]


def check_dataset(root: str, cohort: dict) -> shards.Manifest:
    """Manifest counts reconcile, rows equal the in-process result bit for bit, no patient in two splits."""
    manifest = shards.read_manifest(root)
    c = manifest.counts
    assert c["in"] == 10 and c["processed"] == 8 and c["quarantined"] == 2
    assert c["in"] == c["processed"] + c["quarantined"]
    assert c["quarantined_by_reason"] == {"modality MR is not CT": 1, "no labels": 1}
    assert manifest.config["grid"] == list(GRID) and manifest.config["spacing"] == list(SPACING_OUT)
    assert "salt" not in json.dumps(manifest.config)
    rows = read_all_rows(root)
    assert_rows_as_expected(rows, cohort)
    for row in rows:
        assert row["shape"] == list(GRID) and row["spacing"] == list(SPACING_OUT)
    assert_no_patient_leak([r["patient_hash"] for r in rows], [r["split"] for r in rows])
    for split, stats in c["splits"].items():
        mine = [r for r in rows if r["split"] == split]
        assert stats["studies"] == len(mine)
        if mine:
            positives = np.sum([r["labels"] for r in mine], axis=0).tolist()
            assert [stats["positives"][f] for f in FINDING_IDS] == positives
    quarantine = storage.read_bytes(storage.join(root, shards.QUARANTINE)).decode().splitlines()
    assert quarantine[0] == "path,reason"
    assert sorted(line.split(",")[0] for line in quarantine[1:]) == ["study_mr", "study_nolabel"]
    return manifest


@pytest.fixture
def cohort(tmp_path):
    return write_cohort(tmp_path)


def give_workers_credentials(tmp_path: Path, monkeypatch) -> None:
    """The loopback server's keys in a credentials file, named by ``AWS_SHARED_CREDENTIALS_FILE``: molre forwards
    that path to Ray workers it did not start (the session's Ray, started before this test set the keys), never
    the keys themselves, as a cluster's nodes get theirs from a profile file or a role."""
    path = tmp_path / "aws-credentials"
    path.write_text(
        f"[default]\naws_access_key_id = {os.environ['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n"
    )
    path.chmod(0o600)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))


def test_cli_preprocess_to_s3_with_ray(cohort, s3_bucket, tmp_path, capfd, monkeypatch):
    give_workers_credentials(tmp_path, monkeypatch)
    salt_file = tmp_path / "salt"
    salt_file.write_bytes(SALT)
    root = storage.join(s3_bucket, "headct/v1")
    argv = ["preprocess", "--input", str(cohort["input"]), "--labels", str(cohort["labels"]), "--output", root,
            "--spacing", "8,4,4", "--grid", "16,64,64", "--workers", "2", "--shard-size", "3",
            "--salt-file", str(salt_file)]  # fmt: skip
    assert main(argv) == 0
    captured = capfd.readouterr()
    assert "10 in = 8 processed" in captured.out
    check_dataset(root, cohort)
    # the layout the training reader uses: <root>/<split>/*.parquet, nothing else in there
    for split in ("train", "val", "test"):
        names = [u.rsplit("/", 1)[-1] for u in storage.list_dir(storage.join(root, split))]
        assert all(n.startswith("shard-") and n.endswith(".parquet") for n in names)
    objects = output_texts(root)
    assert len([n for n in objects if n.endswith(".parquet")]) == 4 and any(
        n.endswith("manifest.json") for n in objects
    )
    assert_no_phi(objects | {"stdout": captured.out.encode(), "stderr": captured.err.encode()},
                  tuple(cohort["uids"]))  # fmt: skip


def test_local_rerun_is_a_no_op_and_logs_hold_no_phi(cohort, tmp_path, caplog):
    root = str(tmp_path / "out")
    caplog.set_level(logging.DEBUG)
    first = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    check_dataset(root, cohort)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*") if p.is_file()}
    second = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*") if p.is_file()}
    assert second == first
    shard_files = [p for p in before if p.suffix == ".parquet"]
    assert shard_files and all(after[p] == before[p] for p in shard_files)  # not rewritten
    assert set(after) == set(before)
    assert_no_phi(output_texts(root) | {"log": caplog.text.encode()}, tuple(cohort["uids"]))
    with pytest.raises(AssertionError, match="found in"):  # the scan does see PHI where there is some
        assert_no_phi(output_texts(str(cohort["input"])))


def test_nothing_labelled_gives_an_empty_but_valid_output(cohort, tmp_path):
    empty_labels = tmp_path / "none.csv"
    empty_labels.write_text("study_id,patient_id," + LABELLED[0] + "\n")
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(
        cohort["input"], empty_labels, "generic", root, executor="inline", **SETTINGS
    )
    assert manifest.shards == [] and manifest.counts["processed"] == 0
    assert manifest.counts["quarantined"] == manifest.counts["in"] == 10
    assert shards.read_manifest(root) == manifest


def test_interrupted_run_resumes_to_the_same_output(cohort, tmp_path, monkeypatch):
    clean = str(tmp_path / "clean")
    reference = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", clean, executor="inline", **SETTINGS
    )
    root = str(tmp_path / "out")
    real, calls = preprocess.process_batch, []

    def dies_after_two(batch, ctx):
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        calls.append(batch.batch_id)
        return real(batch, ctx)

    monkeypatch.setattr(preprocess, "process_batch", dies_after_two)
    with pytest.raises(RuntimeError, match="worker killed"):
        preprocess.preprocess(
            cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
        )
    assert not Path(root, shards.MANIFEST).exists()
    assert len(list(Path(root, shards.PROGRESS).glob("batch-*.json"))) == 2
    monkeypatch.setattr(preprocess, "process_batch", real)
    # debris of the crash: a shard no marker claims and a half-written temp object
    (Path(root) / "train" / "shard-0000000000000000.parquet").write_bytes(b"orphan")
    (Path(root) / "val").mkdir(exist_ok=True)
    (Path(root) / "val" / "shard-x.parquet.tmp-0123").write_bytes(b"half")
    resumed = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    assert resumed == reference  # same shards, same bytes (sha256), same counts
    assert not (Path(root) / "train" / "shard-0000000000000000.parquet").exists()
    assert not (Path(root) / "val" / "shard-x.parquet.tmp-0123").exists()
    check_dataset(root, cohort)


def test_lost_manifest_and_shard_are_rebuilt(cohort, tmp_path):
    root = str(tmp_path / "out")
    first = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    Path(root, shards.MANIFEST).unlink()
    Path(root, first.shards[0].path).unlink()
    second = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    assert second == first
    check_dataset(root, cohort)


def test_malformed_inputs_are_quarantined_and_good_ones_processed(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(
        corpus.input_dir, corpus.labels, "generic", root, executor="inline", min_slices=8, **SETTINGS
    )
    c = manifest.counts
    assert c["processed"] == corpus.good
    assert c["in"] == c["processed"] + c["quarantined"]
    with open(Path(root) / shards.QUARANTINE, newline="") as f:
        rows = list(csv.DictReader(f))
    for case, (path, reason) in corpus.expected.items():
        rel = os.path.relpath(Path(path).resolve(), corpus.input_dir.resolve())
        hits = [r for r in rows if r["path"] == rel]
        assert hits, f"{case}: {rel} not in quarantine.csv"
        wanted = "no label row" if case == UNLABELLED else reason
        assert any(wanted in r["reason"] for r in hits), (case, hits)
    assert_no_phi(output_texts(root))


def test_salt_sources_and_guards(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(preprocess.SALT_ENV, raising=False)
    generated = preprocess.resolve_salt()
    salt_path = tmp_path / "home" / ".molre" / "salt"
    assert stat.S_IMODE(salt_path.stat().st_mode) == 0o600 and len(generated) == 64
    assert preprocess.resolve_salt() == generated
    assert [p.name for p in salt_path.parent.iterdir()] == ["salt"]  # written beside it, then linked
    monkeypatch.setenv(preprocess.SALT_ENV, "from-env-" + "e" * 32)
    assert preprocess.resolve_salt() == b"from-env-" + b"e" * 32
    (tmp_path / "salt.txt").write_text("from-file-" + "f" * 32 + "\n")
    assert preprocess.resolve_salt(tmp_path / "salt.txt") == b"from-file-" + b"f" * 32
    # a guessable salt is refused wherever it comes from (the manifest's fingerprint would confirm a guess)
    (tmp_path / "weak.txt").write_text("mercy2023\n")
    with pytest.raises(DataError, match="weak.txt: the salt has 9 characters, fewer than 32"):
        preprocess.resolve_salt(tmp_path / "weak.txt")
    monkeypatch.setenv(preprocess.SALT_ENV, "mercy2023")
    with pytest.raises(DataError, match=r"\$MOLRE_PATIENT_SALT: the salt has 9 characters"):
        preprocess.resolve_salt()
    monkeypatch.delenv(preprocess.SALT_ENV)
    salt_path.write_bytes(b"")  # the default file emptied: refused, never an empty HMAC key
    with pytest.raises(DataError, match="salt: the salt is empty"):
        preprocess.resolve_salt()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "salt").write_text("x")
    with pytest.raises(DataError, match="must not lie inside the output"):
        preprocess.resolve_salt(tmp_path / "out" / "salt", str(tmp_path / "out"))

    root = str(tmp_path / "ds")
    settings = SETTINGS | {"salt": b"salt-one"}
    preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline", **settings)
    with pytest.raises(DataError, match="different patient-hash salt"):
        preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline",
                              **settings | {"salt": b"salt-two"})  # fmt: skip
    with pytest.raises(DataError, match=r"different config \(spacing\)"):
        preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline",
                              **settings | {"spacing": (4.0, 4.0, 4.0)})  # fmt: skip


def test_several_series_of_one_study_give_one_row(tmp_path):
    cohort = write_cohort(tmp_path, n_studies=4, n_patients=4)
    # a second, shorter series of study_00 (e.g. a reformat) in its own folder under the study folder
    extra = cohort["input"] / "study_00" / "thick"
    write_dicom_series(head_ct(0)[::2], (10.0, 3.0, 3.0), extra, **phi_headers(f"{PHI_ID}-0", None))
    first = cohort["input"] / "study_00" / "thin"
    first.mkdir()
    for p in sorted((cohort["input"] / "study_00").glob("IM-*.dcm")):
        p.rename(first / p.name)
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    rows = read_all_rows(root)
    assert len(rows) == manifest.counts["processed"] == 4
    assert manifest.counts["quarantined_by_reason"][preprocess.SERIES_NOT_USED] == 1
    assert len({r["study_hash"] for r in rows}) == 4
    assert sum(pq.read_table(p).num_rows for p in Path(root).glob("*/*.parquet")) == 4


def test_label_problems_quarantine_their_study(tmp_path):
    cohort = write_cohort(tmp_path, n_studies=4, n_patients=4)
    with open(cohort["labels"]) as f:
        rows = list(csv.reader(f))
    rows[0].append("made_up_finding")  # an unknown column: reported, ignored
    rows = [r + ["0"] if i else r for i, r in enumerate(rows)]
    conflicting = list(rows[2])
    conflicting[2] = "1" if conflicting[2] == "0" else "0"
    rows.append(conflicting)  # study_01 again, with other labels
    with open(cohort["labels"], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    c = manifest.counts
    assert c["processed"] == 3 and c["in"] == c["processed"] + c["quarantined"]
    assert c["quarantined_by_reason"]["labels unusable"] == 1 and c["label_problems"] == 2
    text = (Path(root) / shards.QUARANTINE).read_text()
    assert "study_01,labels unusable" in text and "conflicting labels" in text and "made_up_finding" in text


def test_synth_phantoms_to_s3_read_back_equal(s3_bucket, tmp_path):
    import pydicom

    from molre.data import labels, synth

    labels_path = synth.generate(tmp_path / "synth", count=6, seed=3, shape=GRID)
    root = storage.join(s3_bucket, "synth/v1")
    manifest = preprocess.preprocess(
        tmp_path / "synth", labels_path, "generic", root, executor="inline", **SETTINGS
    )
    table = labels.load_labels(labels_path)
    refs, _ = ingest.discover(tmp_path / "synth")
    rows = {r["study_hash"]: r for r in read_all_rows(root)}
    assert len(rows) == len(refs) == manifest.counts["processed"] == 6
    planted = set()
    for ref in refs:
        key = table.match(ref.study_keys)
        row, want = rows[preprocess.salted_hash(SALT, "study", key)], table.rows[key]
        vol = ingest.load_series(ref)
        aligned = align_volume(vol.hu, vol.spacing, vol.direction, out_spacing=SPACING_OUT, grid=GRID)
        np.testing.assert_array_equal(shards.decode_volume(row), aligned)
        assert row["labels"] == want.labels.tolist() and row["known"] == want.known.tolist()
        assert row["patient_hash"] == preprocess.salted_hash(SALT, "patient", want.patient_id)
        header = pydicom.dcmread(ref.files[0], stop_before_pixels=True)
        for keyword in (
            "PatientName",
            "PatientID",
            "StudyDate",
            "StudyInstanceUID",
            "InstitutionName",
            "AccessionNumber",
        ):
            planted.add(str(header.get(keyword)))
    assert_no_patient_leak([r["patient_hash"] for r in rows.values()], [r["split"] for r in rows.values()])
    assert_no_phi(output_texts(root), tuple(planted | {"SYNTH", "SYNACC"}))


def test_thick_and_thin_series_loose_in_a_study_folder_give_one_row(tmp_path):
    # a common hospital export: both reconstructions of ONE study in one folder named by the study id
    input_dir = tmp_path / "input"
    for i, (study, patient) in enumerate((("studyA", "P1"), ("studyB", "P2"))):
        uid = f"1.2.826.0.1.3680043.8.498.{2000 + i}"
        thick = write_dicom_series(
            head_ct(i), SPACING_IN, input_dir / study / "a", **phi_headers(patient, uid)
        )
        thin = write_dicom_series(head_ct(i, shape=(32, 64, 64)), (2.5, 3.0, 3.0), input_dir / study / "b",
                                  **phi_headers(patient, uid))  # fmt: skip
        for n, path in enumerate([*thick, *thin]):
            path.rename(input_dir / study / f"{n:03d}.dcm")
    labels_path = tmp_path / "labels.csv"
    labels_path.write_text(f"study_id,patient_id,{LABELLED[0]}\nstudyA,P1,1\nstudyB,P2,0\n")
    manifest = preprocess.preprocess(input_dir, labels_path, "generic", str(tmp_path / "out"),
                                     executor="inline", **SETTINGS)  # fmt: skip
    c = manifest.counts
    assert (c["in"], c["processed"]) == (4, 2)
    assert c["quarantined_by_reason"] == {preprocess.SERIES_NOT_USED: 2}
    rows = {r["study_hash"]: r for r in read_all_rows(str(tmp_path / "out"))}
    thin_refs = [r for r in ingest.discover(input_dir)[0] if len(r.files) == 32]
    assert len(rows) == len(thin_refs) == 2
    for ref in thin_refs:  # the larger (thin, 32-slice) series of each study was used
        study = Path(ref.files[0]).parent.name
        vol = ingest.load_series(ref)
        want = align_volume(vol.hu, vol.spacing, vol.direction, out_spacing=SPACING_OUT, grid=GRID)
        row = rows[preprocess.salted_hash(SALT, "study", study)]
        np.testing.assert_array_equal(shards.decode_volume(row), want)
        assert row["labels"][0] == (study == "studyA")


def test_antialias_is_a_recorded_setting_that_a_resume_must_match(tmp_path):
    cohort = write_cohort(tmp_path, n_studies=3, n_patients=3)
    plain_root, smooth_root = str(tmp_path / "plain"), str(tmp_path / "smooth")
    run = dict(executor="inline", **SETTINGS)
    smooth = preprocess.preprocess(cohort["input"], cohort["labels"], "generic", smooth_root, **run)
    plain = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", plain_root, antialias=False, **run
    )
    assert smooth.config["antialias"] is True and plain.config["antialias"] is False
    smooth_rows = {r["study_hash"]: r for r in read_all_rows(smooth_root)}
    plain_rows = {r["study_hash"]: r for r in read_all_rows(plain_root)}
    refs = {r.study_keys[0]: r for r in ingest.discover(cohort["input"])[0]}
    for key in ("study_00", "study_01"):
        vol = ingest.load_series(refs[key])
        study_hash = preprocess.salted_hash(SALT, "study", key)
        for rows, antialias in ((smooth_rows, True), (plain_rows, False)):
            want = align_volume(vol.hu, vol.spacing, vol.direction, out_spacing=SPACING_OUT, grid=GRID,
                                antialias=antialias)  # fmt: skip
            np.testing.assert_array_equal(shards.decode_volume(rows[study_hash]), want)
        assert not np.array_equal(
            shards.decode_volume(smooth_rows[study_hash]), shards.decode_volume(plain_rows[study_hash])
        )
    with pytest.raises(DataError, match=r"different config \(antialias\)"):
        preprocess.preprocess(
            cohort["input"], cohort["labels"], "generic", smooth_root, antialias=False, **run
        )


def test_cli_no_antialias_flag():
    import argparse

    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    required = ["--input", "in", "--labels", "l.csv", "--output", "out"]
    assert parser.parse_args(required).antialias is True
    assert parser.parse_args([*required, "--no-antialias"]).antialias is False


def test_default_dataset_built_before_antialias_is_not_reused():
    from molre.data.default import DEFAULT, dataset_key

    before = {k: v for k, v in DEFAULT.items() if k != "antialias"}  # the settings a pre-antialias cache used
    assert DEFAULT["antialias"] is True
    assert dataset_key(DEFAULT) != dataset_key(before)
    assert dataset_key(DEFAULT) != dataset_key({**DEFAULT, "antialias": False})


def test_a_file_name_with_spaces_stays_out_of_the_reason_counts(tmp_path):
    """quarantined_by_reason (manifest, summary log line) counts reasons, not files: a leading file name with
    spaces in it (hospital exports name files after patients) is dropped like one without."""
    cohort = write_cohort(tmp_path, n_studies=3, n_patients=3)
    victim = sorted((cohort["input"] / "study_00").glob("IM-*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:-500])  # truncated pixel data
    victim.rename(victim.with_name(f"{PHI_NAME.replace('^', ' ')} 3.dcm"))
    manifest = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", str(tmp_path / "out"), executor="inline", **SETTINGS
    )
    reasons = manifest.counts["quarantined_by_reason"]
    assert "truncated pixel data" in reasons, reasons
    assert not any("Plantedphi" in reason for reason in reasons), reasons
    assert preprocess.reason_category("Doe John 3.dcm: missing PixelSpacing", {"Doe John 3.dcm"}) == (
        "missing PixelSpacing"
    )


def test_uuid_form_uids_are_blanked_in_quarantine_texts(tmp_path):
    paths = preprocess.Paths(str(tmp_path), str(tmp_path))
    uid = "2.25.329800735698586629295641978511506172918"  # a UUID-derived UID has three components
    assert paths.redact(f"line 3: study {uid} / ID_{uid}_subdural / {uid}.dcm") == (
        "line 3: study <uid> / ID_<uid>_subdural / <uid>.dcm"
    )
    assert paths.redact("spacing 0.5x0.5 mm, 1.5 and 0.25") == "spacing 0.5x0.5 mm, 1.5 and 0.25"


def test_one_patient_id_for_many_studies_is_warned_of(caplog):
    """A de-identification tool's constant PatientID puts every study in one split, silently before."""
    cfg = preprocess.PreprocessConfig()
    zeros = np.zeros(NUM_FINDINGS, np.uint8)

    def jobs(patients: list[str]) -> list[preprocess.StudyJob]:
        return [preprocess.StudyJob(f"s{i:03d}", p, zeros, zeros, []) for i, p in enumerate(patients)]

    caplog.set_level(logging.WARNING, logger="molre.data.preprocess")
    preprocess.assign_splits(jobs([f"p{i}" for i in range(40)]), cfg, {})
    assert not caplog.records
    constant = jobs(["anonymous"] * 10)
    preprocess.assign_splits(constant, cfg, {})
    assert {job.split for job in constant} == {"train"}
    text = caplog.text
    assert "one patient id holds 10 of 10 studies" in text and "split val/test is empty" in text


# ---- re-runs after the input changed: corrected labels, withdrawn studies ------------------------------------

CORRECTED, WITHDRAWN = "study_01", "study_02"


def kill_at_the_manifest(monkeypatch) -> None:
    """Writing the manifest fails from now on, as a run killed just before it (everything else written)."""
    real_write = storage.write_bytes

    def write(uri: str, data: bytes) -> None:
        if uri.endswith("/" + shards.MANIFEST):
            raise OSError("killed")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write)


def correct_and_withdraw(cohort: dict, correct: bool = True, withdraw: str = WITHDRAWN) -> None:
    """The label file gets a corrected row (CORRECTED's first finding flipped) and loses ``withdraw``'s, whose
    series leaves the input too: what a site sends after a review and a withdrawal of consent."""
    if correct:
        row = cohort["rows"][CORRECTED]
        row[2] = 1 - int(row[2])
    del cohort["rows"][withdraw]
    shutil.rmtree(cohort["input"] / withdraw)
    with open(cohort["labels"], "w", newline="") as f:
        csv.writer(f).writerows([["study_id", "patient_id", *LABELLED], *cohort["rows"].values()])


def check_rerun_output(root: str, cohort: dict, first: shards.Manifest, first_splits: dict[str, str]) -> None:
    """The output after ``correct_and_withdraw``: the current labels, no trace of WITHDRAWN, every remaining study
    in the split it had, nothing on storage that the manifest does not list, counts that reconcile."""
    manifest = shards.read_manifest(root)
    c = manifest.counts
    assert (c["in"], c["processed"], c["quarantined"]) == (9, 7, 2)
    rows = read_all_rows(root)
    assert_rows_as_expected(rows, cohort)
    for row in rows:
        assert row["split"] == first_splits[row["study_hash"]]  # patients keep their split
    for split, stats in c["splits"].items():
        positives = np.sum([r["labels"] for r in rows if r["split"] == split] or [[0] * 75], axis=0)
        assert [stats["positives"][f] for f in FINDING_IDS] == positives.tolist()
    gone = preprocess.salted_hash(SALT, "study", WITHDRAWN)
    on_disk = [p for p in Path(root).rglob("*") if p.is_file()]
    assert sorted(str(p.relative_to(root)) for p in on_disk if p.suffix == ".parquet") == sorted(
        s.path for s in manifest.shards
    )  # the outdated shards are deleted
    for path in on_disk:
        if path.suffix == ".parquet":
            assert gone not in pq.read_table(path, columns=["study_hash"]).column(0).to_pylist(), path
        else:
            assert gone.encode() not in path.read_bytes(), path  # markers, manifest, quarantine.csv
    markers = [json.loads(p.read_bytes()) for p in Path(root, shards.PROGRESS).glob("batch-*.json")]
    assert sorted(m["shard"]["path"] for m in markers if m["shard"]) == sorted(
        s.path for s in manifest.shards
    )
    assert first.counts["in"] == 10


def test_rerun_redoes_the_batches_of_corrected_labels_and_withdrawn_studies(cohort, tmp_path, caplog):
    root = str(tmp_path / "out")
    first = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    first_splits = {r["study_hash"]: r["split"] for r in read_all_rows(root)}
    index = shards.read_index(root).to_pylist()
    touched = {r["shard"] for r in index if r["study_hash"] in {preprocess.salted_hash(SALT, "study", k)
                                                                  for k in (CORRECTED, WITHDRAWN)}}  # fmt: skip
    untouched = {s.path: Path(root, s.path).stat().st_mtime_ns for s in first.shards if s.path not in touched}
    assert untouched, "the cohort must have batches that the edit leaves alone"
    correct_and_withdraw(cohort)
    caplog.set_level(logging.WARNING)
    second = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    assert (
        f"{root}: 1 studies changed labels, 0 changed images (a series replaced, added or removed), 1 are no "
        "longer in the input" in caplog.text
    )
    assert "counts do not reconcile" not in caplog.text
    check_rerun_output(root, cohort, first, first_splits)
    # only the batches holding the two studies were redone: the other shards were neither rewritten nor renamed
    assert {p: Path(root, p).stat().st_mtime_ns for p in untouched} == untouched
    assert set(untouched) <= {s.path for s in second.shards}
    before = {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}
    assert preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline",
                                 **SETTINGS) == second  # fmt: skip
    assert {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()} == before  # then a no-op again


@pytest.mark.parametrize("crash", ["in the first batch", "at the first outdated marker's deletion"])
def test_a_crash_while_redoing_leaves_a_whole_dataset_and_a_rerun_finishes(
    crash, cohort, tmp_path, monkeypatch
):
    root = str(tmp_path / "out")
    first = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    first_splits = {r["study_hash"]: r["split"] for r in read_all_rows(root)}
    correct_and_withdraw(cohort)
    if crash == "in the first batch":
        monkeypatch.setattr(
            preprocess, "process_batch", lambda batch, ctx: (_ for _ in ()).throw(OSError("killed"))
        )
    else:
        real_delete = storage.delete

        def delete(uri: str) -> None:
            if f"/{shards.PROGRESS}/batch-" in uri:
                raise OSError("killed")
            real_delete(uri)

        monkeypatch.setattr(storage, "delete", delete)
    with pytest.raises(OSError, match="killed"):
        preprocess.preprocess(
            cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
        )
    # whatever the manifest is, old or new, every shard it lists is there, whole
    manifest = shards.read_manifest(root)
    if crash == "in the first batch":
        assert manifest == first  # the old dataset, untouched
    else:
        assert manifest.counts["processed"] == 7  # the new one, committed before the clean-up
    assert len(read_all_rows(root)) == manifest.counts["processed"]
    monkeypatch.undo()
    preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS)
    check_rerun_output(root, cohort, first, first_splits)


def test_a_redo_once_started_is_finished_even_if_the_input_comes_back(cohort, tmp_path, monkeypatch):
    """A study is withdrawn; the re-run dies as it writes the new manifest (the new batches are done, the old
    markers still there); then the study comes back. The next run must not hold the other studies of its old batch
    twice (old batch and new batch both looking complete): the old one stays superseded."""
    root = str(tmp_path / "out")
    first = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    first_rows = sorted((r["study_hash"], r["split"], r["labels"]) for r in read_all_rows(root))
    index = shards.read_index(root).to_pylist()
    per_shard = Counter(r["shard"] for r in index)
    key_of = {preprocess.salted_hash(SALT, "study", k): k for k in cohort["rows"]}
    withdraw = next(key_of[r["study_hash"]] for r in index if per_shard[r["shard"]] > 1)  # has batch mates
    assert (cohort["input"] / withdraw).is_dir()
    shutil.copytree(cohort["input"] / withdraw, tmp_path / "kept")
    labels_before = cohort["labels"].read_bytes()
    correct_and_withdraw(cohort, correct=False, withdraw=withdraw)
    kill_at_the_manifest(monkeypatch)
    with pytest.raises(OSError, match="killed"):
        preprocess.preprocess(
            cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
        )
    monkeypatch.undo()
    shutil.copytree(tmp_path / "kept", cohort["input"] / withdraw)  # the study is back, as it was
    cohort["labels"].write_bytes(labels_before)
    again = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    assert sorted((r["study_hash"], r["split"], r["labels"]) for r in read_all_rows(root)) == first_rows
    assert again.counts == first.counts


def strip_markers(root: str, *keys: str) -> None:
    """The batch markers as a molre before ``keys`` wrote them."""
    for path in Path(root, shards.PROGRESS).glob("batch-*.json"):
        marker = json.loads(path.read_bytes())
        for key in keys:
            marker.pop(key, None)
        path.write_text(json.dumps(marker))


def test_markers_of_an_older_molre_still_lose_withdrawn_studies(cohort, tmp_path, caplog):
    """Batch markers written before label fingerprints: a withdrawn study is still found (and dropped); a label
    correction cannot be, and a warning says so."""
    root = str(tmp_path / "out")
    first = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    strip_markers(root, "label_fingerprints", "source_fingerprints")
    correct_and_withdraw(cohort)
    caplog.set_level(logging.WARNING)
    second = preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )
    gone = preprocess.salted_hash(SALT, "study", WITHDRAWN)
    assert gone not in [r["study_hash"] for r in read_all_rows(root)]
    assert (second.counts["processed"], first.counts["processed"]) == (7, 8)
    assert "without label fingerprints" in caplog.text and "without source fingerprints" in caplog.text


# ---- re-runs after a study's images were replaced under its study key ----------------------------------------

REPLACED = ("study_03", "study_07")  # a DICOM series and the NIfTI


def run_inline(cohort: dict, root: str) -> shards.Manifest:
    return preprocess.preprocess(
        cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
    )


def replace_images(cohort: dict, study: str, seed: int) -> None:
    """``study``'s images replaced under its study key: the DICOM series re-sent by the PACS (a new
    SeriesInstanceUID, other pixels, the same StudyInstanceUID), or the NIfTI overwritten with a corrected
    volume."""
    folder = cohort["input"] / study
    if study == f"study_{len(cohort['uids']):02d}":  # write_cohort's last study is the NIfTI
        write_nifti(head_ct(seed), SPACING_IN, folder / f"{study}.nii.gz")
        return
    shutil.rmtree(folder)
    headers = phi_headers(cohort["rows"][study][1], cohort["uids"][int(study[-2:])])
    write_dicom_series(head_ct(seed), SPACING_IN, folder, **headers)


def test_rerun_redoes_the_batches_of_replaced_images_not_of_a_copied_input(cohort, tmp_path, caplog):
    root = str(tmp_path / "out")
    first = run_inline(cohort, root)
    first_splits = {r["study_hash"]: r["split"] for r in read_all_rows(root)}
    # the input copied to another disk (new modification times) and read from there: nothing is redone
    cohort["input"] = shutil.copytree(cohort["input"], tmp_path / "moved", copy_function=shutil.copyfile)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*.parquet")}
    assert run_inline(cohort, root) == first
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*.parquet")} == before
    hashes = {preprocess.salted_hash(SALT, "study", k) for k in REPLACED}
    touched = {r["shard"] for r in shards.read_index(root).to_pylist() if r["study_hash"] in hashes}
    untouched = {s.path: Path(root, s.path).stat().st_mtime_ns for s in first.shards if s.path not in touched}
    assert untouched, "the cohort must have batches that the replacement leaves alone"
    for seed, study in enumerate(REPLACED, start=100):
        replace_images(cohort, study, seed)
    caplog.set_level(logging.WARNING)
    second = run_inline(cohort, root)
    assert (
        f"{root}: 0 studies changed labels, 2 changed images (a series replaced, added or removed), 0 are no "
        "longer in the input" in caplog.text
    )
    assert "counts do not reconcile" not in caplog.text and second.counts == first.counts
    rows = read_all_rows(root)
    assert_rows_as_expected(rows, cohort)  # the new volumes, bit for bit
    assert {r["study_hash"]: r["split"] for r in rows} == first_splits
    assert {p: Path(root, p).stat().st_mtime_ns for p in untouched} == untouched
    on_disk = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.parquet"))
    assert on_disk == sorted(s.path for s in second.shards) and not touched & set(on_disk)
    assert run_inline(cohort, root) == second  # then a no-op again


def test_a_crash_while_redoing_replaced_images_leaves_the_old_dataset_whole(cohort, tmp_path, monkeypatch):
    """The redone batch holds the same studies with the same labels: its shard must get a new name, not
    overwrite the one the old manifest lists."""
    root = str(tmp_path / "out")
    first = run_inline(cohort, root)
    replace_images(cohort, REPLACED[0], 100)
    kill_at_the_manifest(monkeypatch)
    with pytest.raises(OSError, match="killed"):
        run_inline(cohort, root)
    monkeypatch.undo()
    assert shards.read_manifest(root) == first
    assert len(read_all_rows(root)) == 8  # every shard it lists is there, whole (sha256)
    run_inline(cohort, root)
    assert_rows_as_expected(read_all_rows(root), cohort)


def test_a_quarantined_study_is_tried_again_when_its_series_is_resent(cohort, tmp_path):
    root = str(tmp_path / "out")
    assert run_inline(cohort, root).counts["quarantined_by_reason"]["modality MR is not CT"] == 1
    shutil.rmtree(cohort["input"] / "study_mr")
    write_dicom_series(head_ct(99), SPACING_IN, cohort["input"] / "study_mr", **phi_headers(PHI_ID, None))
    counts = run_inline(cohort, root).counts
    assert (counts["processed"], counts["quarantined"], counts["quarantined_by_reason"]) == (
        9,
        1,
        {"no labels": 1},
    )
    assert "study_mr" not in storage.read_bytes(storage.join(root, shards.QUARANTINE)).decode()


def test_markers_without_source_fingerprints_are_kept_and_then_watched(cohort, tmp_path, caplog):
    """Markers of a molre before source fingerprints: a series replaced meanwhile cannot be told (its batch
    is kept, a one-line notice says so); the current fingerprints are recorded, so a later replacement is
    found."""
    root = str(tmp_path / "out")
    first = run_inline(cohort, root)
    strip_markers(root, "source_fingerprints")
    replace_images(cohort, REPLACED[0], 100)
    caplog.set_level(logging.WARNING)
    assert run_inline(cohort, root) == first  # not redone: the old volume stays
    assert caplog.text.count("without source fingerprints") == 1 and "changed images" not in caplog.text
    markers = [json.loads(p.read_bytes()) for p in Path(root, shards.PROGRESS).glob("batch-*.json")]
    assert all(len(m["source_fingerprints"]) == len(m["label_fingerprints"]) for m in markers)
    caplog.clear()
    replace_images(cohort, REPLACED[0], 101)
    run_inline(cohort, root)
    assert "0 studies changed labels, 1 changed images" in caplog.text
    assert "without source fingerprints" not in caplog.text
    assert_rows_as_expected(read_all_rows(root), cohort)


# ---- re-runs over uncompressed NIfTI: an unchanged file is not read again ------------------------------------


def nii_cohort(root: Path, n: int = 3) -> dict:
    """``n`` studies as uncompressed .nii (fingerprinted by their whole content), one patient each."""
    input_dir, rows = root / "input", {}
    for i in range(n):
        study = f"study_{i:02d}"
        write_nifti(head_ct(i), SPACING_IN, input_dir / study / f"{study}.nii")
        rows[study] = [study, f"{PHI_ID}-{i}", *[i % 2] * N_FINDINGS_LABELLED]
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["study_id", "patient_id", *LABELLED], *rows.values()])
    return {"input": input_dir, "labels": labels, "rows": rows}


def memo_counts(text: str) -> tuple[int, int]:
    """(files read whole, files remembered) as the last run logged them."""
    found = re.findall(r"source fingerprints: (\d+) files read whole, (\d+) unchanged", text)
    return tuple(map(int, found[-1])) if found else (0, 0)


def test_a_rerun_reads_no_unchanged_nii_and_still_sees_a_replaced_one(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ingest, "RACY_NS", 0)  # the files were just written: remember them all the same
    cohort = nii_cohort(tmp_path)
    root = str(tmp_path / "out")
    memo = Path(root, shards.PROGRESS, preprocess.SOURCE_MEMO)
    caplog.set_level(logging.INFO, logger="molre.data.preprocess")
    first = run_inline(cohort, root)
    assert memo_counts(caplog.text) == (3, 0) and len(json.loads(memo.read_bytes())["digests"]) == 3
    for path in cohort["input"].rglob("*.nii"):  # nothing plain: salted keys, encrypted digests
        for plain in (hashlib.sha256(path.read_bytes()).hexdigest(), path.stem, str(tmp_path)):
            assert plain not in memo.read_text()
    caplog.clear()
    assert run_inline(cohort, root) == first
    assert memo_counts(caplog.text) == (0, 3) and "changed images" not in caplog.text
    path = (
        cohort["input"] / "study_01" / "study_01.nii"
    )  # corrected in place, as by cp -p: size and mtime kept
    old = path.stat()
    time.sleep(0.05)  # past the filesystem clock's tick (RACY_NS, 0 here, covers it in real use)
    write_nifti(head_ct(101), SPACING_IN, path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    caplog.clear()
    second = run_inline(cohort, root)
    assert memo_counts(caplog.text) == (1, 2) and "0 studies changed labels, 1 changed images" in caplog.text
    assert_rows_as_expected(read_all_rows(root), cohort)  # the corrected volume
    # an output written before the memo: each file read once more, the same fingerprints as its markers hold
    memo.unlink()
    caplog.clear()
    assert run_inline(cohort, root) == second
    assert memo_counts(caplog.text) == (3, 0) and "changed images" not in caplog.text and memo.exists()


def test_a_damaged_source_memo_only_costs_a_read(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ingest, "RACY_NS", 0)
    cohort = nii_cohort(tmp_path, n=2)
    root = str(tmp_path / "out")
    first = run_inline(cohort, root)
    memo = Path(root, shards.PROGRESS, preprocess.SOURCE_MEMO)
    digests = json.loads(memo.read_bytes())["digests"]
    memo.write_text(json.dumps({"digests": {key: "not hex" for key in digests}}))
    caplog.set_level(logging.INFO, logger="molre.data.preprocess")
    assert run_inline(cohort, root) == first
    assert f"{memo} is unreadable (ValueError)" in caplog.text and memo_counts(caplog.text) == (2, 0)
    assert json.loads(memo.read_bytes())["digests"] == digests  # written afresh


def test_preprocess_into_a_missing_bucket_fails_first_naming_the_output(cohort, s3_env):
    """A mistyped bucket: one clear error before any work, and no bucket made."""
    import uuid

    import boto3

    bucket = f"molre-typo-{uuid.uuid4().hex[:12]}"
    root = f"s3://{bucket}/headct/v1"
    with pytest.raises(storage.StorageError, match=rf"^{root}: bucket s3://{bucket} does not exist"):
        preprocess.preprocess(
            cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
        )
    assert bucket not in [
        b["Name"] for b in boto3.client("s3", endpoint_url=s3_env).list_buckets()["Buckets"]
    ]


@pytest.mark.slow
def test_a_storage_error_in_a_ray_worker_reaches_the_caller_as_itself(
    cohort, tmp_path, monkeypatch, ray_local
):
    """A worker's StorageError (a node without credentials, a full disk ...) is raised as the StorageError naming
    the shard, not as Ray's task error with a worker traceback in front."""
    root = tmp_path / "out"
    real_load = preprocess._load_markers

    def load_then_block_the_train_folder(output_uri, splits):
        markers = real_load(output_uri, splits)
        (root / "train").write_bytes(b"")  # a file where the workers must make the folder: they cannot write
        return markers

    monkeypatch.setattr(preprocess, "_load_markers", load_then_block_the_train_folder)
    with pytest.raises(storage.StorageError) as info:
        preprocess.preprocess(cohort["input"], cohort["labels"], "generic", str(root), executor="ray", workers=1,
                              **SETTINGS)  # fmt: skip
    assert type(info.value) is storage.StorageError
    assert str(info.value).startswith(f"{root}/train/shard-"), str(info.value)
    assert "write failed: FileExistsError" in str(info.value)
