"""Leakage and PHI.

- A patient never crosses splits: ``preprocess`` checks every output before it writes the manifest (not only
  the tests do), and a dataset with a leak is refused by that check.
- No PHI from headers reaches any output byte, log line (molre's and every other logger at DEBUG, Ray workers'
  output), warning, error message or quarantine entry: tested with planted values (patient name, id, birth
  date, accession, institution, referring physician, study description, other ids, address, dates, every UID)
  through the whole ``preprocess`` path, failures included (series that fail validation must not echo header
  values).
- Pixels with the patient's details drawn in (BurnedInAnnotation YES, secondary captures / screen saves, derived
  secondary reformats from a workstation) never reach a shard: ingest refuses them, and a study's original series
  is used before a larger derived one.
- The patient-id salt is never written out: not in any output byte (raw, hex), not in a log, and it is not even
  sent to the Ray workers (what is sent can be spilled to disk by Ray's object store).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from molre.data import preprocess, shards, storage
from molre.data.split import assert_no_patient_leak
from molre.errors import DataError, MolreError
from tests.data.malformed import write_shard_dataset
from tests.reliability.helpers import (
    PHI,
    SALT,
    SETTINGS,
    UID_ROOT,
    Records,
    find_secrets,
    head_ct,
    output_blobs,
    phi_series,
    phi_values,
    write_cohort,
    write_labels,
)

PYDICOM_UID_ROOT = "1.2.826.0.1.3680043.8.498"  # every UID written here starts with it (ours and pydicom's)

# ---------------------------------------------------------------------------------------------------- cohort


def _missing_slice(ds, k):
    return k != 4


def _phi_in_number(ds, k):
    if k == 2:
        ds.add_new(0x00281052, "LO", PHI["PatientName"])  # RescaleIntercept holding the patient's name


def _undecodable(ds, k):
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    if k == 3:
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([b"not rle " * 40])
        ds["PixelData"].VR = "OB"


def write_phi_cohort(root: Path) -> dict:
    """Good studies plus studies that fail in every stage, all carrying the planted PHI.

    fails in discover: a junk file; in planning: a study without a label row, a study whose label row is bad (the
    patient's name in a finding column); in load_series: wrong modality, a missing slice, a number holding the
    patient's name, undecodable pixels under a series UID that embeds the MRN (pydicom quotes invalid UIDs), a
    series flagged BurnedInAnnotation YES.
    """
    cohort = write_cohort(root, n_studies=5, n_patients=3)
    input_dir, rows = cohort["input"], cohort["rows"]
    patient = PHI["PatientID"]
    bad = {
        "bad_modality": dict(modality="MR"),
        "bad_missing_slice": dict(per_slice_hook=_missing_slice),
        "bad_phi_in_number": dict(per_slice_hook=_phi_in_number),
        "bad_undecodable": dict(per_slice_hook=_undecodable, series_uid=f"{patient}.5"),
        "bad_burned_in": dict(extra={"BurnedInAnnotation": "YES"}),
        "bad_no_labels": {},
        "bad_label_row": {},
    }
    for n, (name, kwargs) in enumerate(bad.items(), start=50):
        phi_series(input_dir / name, n, f"{patient}-9", n, **kwargs)
        if name != "bad_no_labels":
            rows.append([name, f"{patient}-9", 0, 0, 0])
    rows[-1][2] = PHI["PatientName"]  # bad_label_row: a shifted column
    # a study labelled without a patient id: its PatientID comes from the DICOM header (then hashed)
    phi_series(input_dir / "header_patient", 60, f"{patient}-header", 60)
    rows.append(["header_patient", "", 1, 0, 0])
    (input_dir / "bad_junk").mkdir()
    (input_dir / "bad_junk" / "IM-0001.dcm").write_bytes(f"junk {PHI['PatientName']} {patient}".encode() * 20)
    write_labels(cohort["labels"], rows)
    cohort["uids"] = _input_uids(input_dir)
    return cohort


def _input_uids(input_dir: Path) -> set[str]:
    uids = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in input_dir.rglob("*.dcm"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
                if keyword in ds:
                    uids.add(str(ds.data_element(keyword).value))
    return uids


def _secrets(cohort: dict) -> list[str | bytes]:
    return [*phi_values(), *cohort["uids"], PYDICOM_UID_ROOT, SALT, SALT.hex(), SALT.decode()]


# ---------------------------------------------------------------------------------------------------- PHI


@contextlib.contextmanager
def all_logs():
    """Every record reaching the root logger at DEBUG, molre's loggers at DEBUG. pydicom's logger keeps the level
    molre.data.ingest gives it (off: its messages quote header values); forcing it back on is the operator's
    choice and SECURITY.md warns against it."""
    records, root = Records(), logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("", "molre")}
    root.addHandler(records)
    for name in saved:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(records)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_no_phi_or_salt_anywhere_through_preprocess_and_its_failures(tmp_path, capfd):
    cohort = write_phi_cohort(tmp_path)
    root = str(tmp_path / "out")
    capfd.readouterr()
    with all_logs() as logs, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline",
                                         min_slices=8, **SETTINGS)  # fmt: skip
        # and failures that abort a run: each message must be as clean as a quarantine entry
        errors = []
        for labels_path, fmt in ((cohort["labels"], "cq500"), (tmp_path / "absent.csv", "generic")):
            with pytest.raises(MolreError) as info:
                preprocess.preprocess(cohort["input"], labels_path, fmt, str(tmp_path / f"out-{fmt}"),
                                      executor="inline", **SETTINGS)  # fmt: skip
            errors.append(f"{type(info.value).__name__}: {info.value}")
    out, err = capfd.readouterr()

    c = manifest.counts
    good = 5 + 1  # the cohort's studies and header_patient
    assert c["processed"] == good and c["in"] == c["processed"] + c["quarantined"]
    quarantine = storage.read_bytes(storage.join(root, shards.QUARANTINE)).decode()
    for name in ("bad_modality", "bad_missing_slice", "bad_phi_in_number", "bad_undecodable", "bad_no_labels",
                 "bad_label_row", "bad_junk", "bad_burned_in"):  # fmt: skip
        assert name in quarantine, name  # every failure is accounted for ...
    assert "malformed RescaleIntercept element" in quarantine and "of 31 characters" in quarantine

    blobs = output_blobs(root)
    blobs |= {
        "log records": "\n".join(logs.lines).encode(),
        "stdout": out.encode(),
        "stderr": err.encode(),
        "warnings": "\n".join(str(w.message) for w in caught).encode(),
        "errors": "\n".join(errors).encode(),
    }
    assert len(logs.lines) > 3  # the scan did see molre's logging
    assert not find_secrets(blobs, _secrets(cohort))  # ... and none of them shows PHI, a UID or the salt
    # the scan would see PHI where there is some
    assert find_secrets({"input": (cohort["input"] / "study_00" / "IM-0001.dcm").read_bytes()}, phi_values())


def test_only_hashes_leave_preprocess(tmp_path):
    """Shard rows hold the salted hashes (16 hex), never an id; the header-derived patient id is hashed too."""
    cohort = write_phi_cohort(tmp_path)
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline",
                                     **SETTINGS)  # fmt: skip
    rows = [
        r for info in manifest.shards for r in shards.read_shard(storage.join(root, info.path)).to_pylist()
    ]
    hashes = {r["patient_hash"] for r in rows} | {r["study_hash"] for r in rows}
    assert all(len(h) == preprocess.HASH_HEX and int(h, 16) >= 0 for h in hashes)
    assert preprocess.salted_hash(SALT, "patient", f"{PHI['PatientID']}-header") in hashes  # from the header
    assert manifest.salt_fingerprint == preprocess.salt_fingerprint(SALT)
    assert "salt" not in repr(manifest.config).lower()


def test_the_salt_and_raw_ids_are_never_sent_to_workers(tmp_path, monkeypatch):
    """What preprocess hands its Ray tasks (batches + context) holds no salt and no header PHI. It does hold
    input paths and DICOM UIDs (study keys, RSNA SOP matching): SECURITY.md says where those go."""
    cohort = write_phi_cohort(tmp_path)
    sent = []

    def capture(batches, ctx, executor, workers, progress):
        sent.append(pickle.dumps((batches, ctx)))
        return []

    monkeypatch.setattr(preprocess, "_execute", capture)
    preprocess.preprocess(cohort["input"], cohort["labels"], "generic", str(tmp_path / "out"), executor="inline",
                          **SETTINGS)  # fmt: skip
    assert sent and len(sent[0]) > 1000
    assert not find_secrets({"task arguments": sent[0]}, [*phi_values(), SALT, SALT.hex(), SALT.decode()])


@pytest.mark.slow
def test_no_phi_in_ray_workers_output(tmp_path, ray_local, capfd):
    """The same cohort on Ray workers: nothing in the driver's captured output, the output objects, or any file
    of the Ray session's log folder (workers' stdout/stderr, raylet, GCS)."""
    cohort = write_phi_cohort(tmp_path)
    root = str(tmp_path / "out")
    preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="ray", workers=2,
                          min_slices=8, **SETTINGS)  # fmt: skip
    out, err = capfd.readouterr()
    blobs = output_blobs(root) | {"stdout": out.encode(), "stderr": err.encode()}
    for path in _ray_log_files():
        blobs[str(path)] = path.read_bytes()
    assert any("worker" in name for name in blobs)
    assert not find_secrets(blobs, _secrets(cohort))


def _ray_log_files() -> list[Path]:
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    session = Path(node.get_session_dir_path()) if node is not None else Path("/tmp/ray/session_latest")
    return [p for p in (session / "logs").rglob("*") if p.is_file() and p.stat().st_size < 64 << 20]


# ---------------------------------------------------------------------------------------------------- burned in

BURNED_HU = 3000.0  # drawn-in text: brighter than anything in the phantom (bone 1100)


def _burned(hu: np.ndarray) -> np.ndarray:
    """``hu`` with a bright text line (the patient's name, as a screen save draws it) in the air above the head."""
    out = hu.copy()
    out[:, 1:4, 4:44] = BURNED_HU
    return out


def _secondary_capture(ds, k):
    from pydicom.uid import SecondaryCaptureImageStorage

    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage


def test_burned_in_pixels_never_reach_a_shard(tmp_path):
    """A screen-save series (Secondary Capture, BurnedInAnnotation YES, text drawn in) is quarantined with a clean
    reason; a study with its original 5 mm series and a 2.5 mm DERIVED\\SECONDARY workstation reformat with the
    text drawn in (twice the slices) gets the original series into its shard."""
    input_dir, patient = tmp_path / "input", PHI["PatientID"]
    phi_series(
        input_dir / "screen_save",
        70,
        f"{patient}-1",
        70,
        hu=_burned(head_ct(70)),
        per_slice_hook=_secondary_capture,
        extra={"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"], "BurnedInAnnotation": "YES"},
    )
    phi_series(input_dir / "mixed" / "original", 71, f"{patient}-2", 71)
    phi_series(input_dir / "mixed" / "reformat", 71, f"{patient}-2", 71, series_uid=f"{UID_ROOT}.2.72",
               hu=_burned(head_ct(71, (24, 48, 48))), spacing=(2.5, 3.0, 3.0),
               extra={"ImageType": ["DERIVED", "SECONDARY", "AXIAL"], "BurnedInAnnotation": "YES"})  # fmt: skip
    labels = write_labels(tmp_path / "labels.csv", [["screen_save", f"{patient}-1", 1, 0, 0],
                                                    ["mixed", f"{patient}-2", 0, 1, 0]])  # fmt: skip
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(input_dir, labels, "generic", root, executor="inline", **SETTINGS)

    rows = [
        r for info in manifest.shards for r in shards.read_shard(storage.join(root, info.path)).to_pylist()
    ]
    assert [r["study_hash"] for r in rows] == [preprocess.salted_hash(SALT, "study", "mixed")]
    volume = shards.decode_volume(rows[0])
    assert volume.max() < 2000  # bone, not the drawn-in text (which stays above 2500 after resampling)
    quarantine = storage.read_bytes(storage.join(root, shards.QUARANTINE)).decode()
    assert "screen_save,IM-0001.dcm: BurnedInAnnotation is YES" in quarantine
    assert "mixed/reformat,another series of the same study was used" in quarantine
    assert not find_secrets(output_blobs(root), [*phi_values(), PYDICOM_UID_ROOT])


# ---------------------------------------------------------------------------------------------------- leakage


def _leaking_dataset(root: str) -> shards.Manifest:
    """A dataset whose val shard holds a study of a patient who is also in train."""
    write_shard_dataset(root, {"train": 2, "val": 2}, overlap=1)  # patient p...1 in train and in val
    manifest = shards.read_manifest(root)
    rows = shards.read_index(root, manifest).to_pylist()
    val = {r["patient_hash"] for r in rows if r["split"] == "val"}
    assert val & {r["patient_hash"] for r in rows if r["split"] == "train"} == {f"p{1:015d}"}
    return manifest


def test_a_dataset_with_a_patient_in_two_splits_is_refused(tmp_path):
    root = str(tmp_path / "ds")
    manifest = _leaking_dataset(root)
    with pytest.raises(DataError, match=r"1 patient\(s\) appear in more than one split") as info:
        preprocess.verify_output(root, manifest)
    assert info.value.path == root and "['train', 'val']" in info.value.reason


def test_preprocess_checks_every_output_for_leaks(tmp_path, monkeypatch):
    """Make the split assignment leak (a bug, or a hand-edited resume state): preprocess refuses to commit the
    output (no manifest), so nothing downstream can train on it."""
    cohort = write_cohort(tmp_path, n_studies=6, n_patients=2)
    real = preprocess.split_patients

    def leaky(patients, positives, fractions, seed, fixed=None):
        splits = real(patients, positives, fractions, seed, fixed=fixed)
        first = patients[0]
        others = [i for i, p in enumerate(patients) if p == first][1:]
        moved = next(s for s in fractions if s != splits[0])
        return [moved if i == others[0] else s for i, s in enumerate(splits)]

    monkeypatch.setattr(preprocess, "split_patients", leaky)
    root = str(tmp_path / "out")
    with pytest.raises(DataError, match="appear in more than one split"):
        preprocess.preprocess(
            cohort["input"], cohort["labels"], "generic", root, executor="inline", **SETTINGS
        )
    assert not Path(root, shards.MANIFEST).exists()


def test_several_studies_of_one_patient_share_a_split(tmp_path):
    cohort = write_cohort(tmp_path, n_studies=8, n_patients=3)
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(cohort["input"], cohort["labels"], "generic", root, executor="inline",
                                     **SETTINGS | {"splits": {"train": 0.5, "val": 0.25, "test": 0.25}})  # fmt: skip
    index = shards.read_index(root, manifest).to_pylist()
    assert len(index) == 8 and len({r["patient_hash"] for r in index}) == 3
    assert_no_patient_leak([r["patient_hash"] for r in index], [r["split"] for r in index])


def test_planted_phi_is_in_the_input_headers(tmp_path):
    """Guards the guards: every planted field really is in the cohort's headers, so a clean scan means something."""
    cohort = write_phi_cohort(tmp_path)
    ds = pydicom.dcmread(cohort["input"] / "study_00" / "IM-0001.dcm", stop_before_pixels=True)
    for keyword, value in PHI.items():
        assert str(ds.data_element(keyword).value).startswith(value), keyword
    assert len(cohort["uids"]) > 50  # study, series, frame of reference and SOP instance UIDs
    assert [u for u in cohort["uids"] if not u.startswith(PYDICOM_UID_ROOT)] == [f"{PHI['PatientID']}.5"]


def test_ray_started_by_preprocess_does_not_inherit_the_salt(monkeypatch):
    """With the salt in $MOLRE_PATIENT_SALT, the local Ray that preprocess starts (raylet, workers) must not get
    it in its environment; the driver keeps it."""
    import ray

    seen = {}

    def fake_init(**kwargs):
        seen["salt in env"] = preprocess.SALT_ENV in os.environ
        raise RuntimeError("stop here")

    monkeypatch.setenv(preprocess.SALT_ENV, SALT.decode())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        preprocess._run_ray([], None, 1, None)
    assert seen == {"salt in env": False}
    assert os.environ[preprocess.SALT_ENV] == SALT.decode()
