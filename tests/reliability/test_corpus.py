"""Bad input, end to end: every case of the malformed-input corpus (tests/data/malformed.py: volumes, label files,
run configs, search spaces, shards, checkpoints) ends in one of molre's own errors naming the item and the reason,
or in a quarantine entry; good items beside bad ones are processed; counts reconcile (in = processed +
quarantined), with Ray workers doing the work."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest

from molre.data import ingest, preprocess, shards, storage
from molre.data.preprocess import Batch, BatchContext, Paths, StudyJob
from molre.errors import MolreError
from tests.data.malformed import (
    CHECKPOINT_CASES,
    CONFIG_CASES,
    LABEL_CASES,
    PHI_STRINGS,
    READ_CASES,
    SHARD_CASES,
    SWEEP_CASES,
    UNLABELLED,
    VOLUME_CASES,
    cq500_row,
    rsna_images,
    write_corpus,
)
from tests.reliability.helpers import GRID, SALT, SETTINGS, SPACING_OUT, phi_series, write_cohort

# ---------------------------------------------------------------------------------------------------- the corpus


def _volume_kind(case) -> str:
    return "nifti" if case.name.startswith("nifti") else "dicom"


def corpus_counts() -> Counter:
    counts = Counter(_volume_kind(c) for c in VOLUME_CASES if c.name != UNLABELLED)
    counts["labels (study without a row)"] = 1
    counts.update(f"labels {c.fmt}" for c in LABEL_CASES)
    counts.update(c.kind for c in READ_CASES)
    return counts


def test_corpus_covers_every_input_kind():
    names = [c.name for c in (*VOLUME_CASES, *LABEL_CASES, *READ_CASES)]
    assert len(names) == len(set(names)), "case names must be unique"
    counts = corpus_counts()
    assert sum(counts.values()) == len(names) >= 40
    for kind in (
        "dicom",
        "nifti",
        "labels generic",
        "labels rsna",
        "labels cq500",
        "config",
        "shard",
        "checkpoint",
    ):
        assert counts[kind] >= 3, (kind, counts)
    assert counts["search space"] >= 10, counts
    for needed in ("config_unknown_key", "config_wrong_type", "config_bad_yaml", "config_not_a_mapping",
                   "override_without_value", "shard_column_of_wrong_type", "shard_truncated",
                   "shard_checksum_mismatch", "manifest_missing", "manifest_corrupt_json",
                   "manifest_wrong_schema_version", "split_empty", "checkpoint_without_config",
                   "checkpoint_corrupt_safetensors", "checkpoint_weights_of_another_shape",
                   "sweep_unknown_key", "sweep_wrong_type", "sweep_empty_choice", "sweep_low_above_high",
                   "sweep_infinite_bounds", "sweep_key_not_in_run_config", "sweep_bad_mode", "sweep_bad_yaml",
                   "sweep_not_a_mapping"):  # fmt: skip
        assert needed in names


def _read_case_params():
    for case in READ_CASES:
        marks = (
            [pytest.mark.xfail(strict=True, reason=f"known leak: {case.known_leak}")]
            if case.known_leak
            else []
        )
        yield pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", list(_read_case_params()))
def test_each_bad_config_shard_or_checkpoint_is_a_clear_error(case, tmp_path):
    item, read = case.write(tmp_path / case.name)
    try:
        read()
    except MolreError as err:
        assert isinstance(err, case.error), f"{type(err).__name__} instead of {case.error.__name__}: {err}"
        message = str(err)
    else:
        pytest.fail(f"{case.name}: no error")
    assert case.reason in message, message
    assert item in message, f"the message does not name {item!r}: {message}"
    for phi in PHI_STRINGS:
        assert phi.lower() not in message.lower(), message


def test_read_case_kinds_are_declared():
    assert {c.kind for c in CONFIG_CASES} == {"config"}
    assert {c.kind for c in SHARD_CASES} == {"shard"}
    assert {c.kind for c in CHECKPOINT_CASES} == {"checkpoint"}
    assert {c.kind for c in SWEEP_CASES} == {"search space"}


# ---------------------------------------------------------------------------------------------------- batches


def _job(ref: ingest.SeriesRef, n: int) -> StudyJob:
    import numpy as np

    return StudyJob(
        f"{n:016x}", f"{n % 2:016x}", np.zeros(75, np.uint8), np.ones(75, np.uint8), [ref], "train"
    )


def test_a_batch_with_bad_studies_still_writes_the_good_ones(tmp_path, monkeypatch):
    """One batch (one shard): good, malformed, good, and a study whose loader fails unexpectedly (a bug, not bad
    data): the shard holds the two good ones, the marker names both failures, nothing is lost."""
    cohort = write_cohort(tmp_path, n_studies=3, nifti=False)
    next(c for c in VOLUME_CASES if c.name == "missing_slice").write(cohort["input"] / "bad_missing_slice")
    refs = {Path(r.source).name: r for r in ingest.discover(cohort["input"])[0]}
    crash_source, real_load = refs["study_02"].source, ingest.load_series

    def load(ref, **kwargs):
        if ref.source == crash_source:
            raise RuntimeError("simulated bug in a loader")
        return real_load(ref, **kwargs)

    monkeypatch.setattr(ingest, "load_series", load)
    order = ["study_00", "bad_missing_slice", "study_01", "study_02"]
    batch = Batch("b0", "train", [_job(refs[name], n) for n, name in enumerate(order)])
    ctx = BatchContext(str(tmp_path / "out"), Paths(str(cohort["input"].resolve()), str(tmp_path)),
                       SPACING_OUT, GRID, 8)  # fmt: skip
    marker = preprocess.process_batch(batch, ctx)
    assert [s for s, _ in marker["studies"]] == [batch.studies[0].study_hash, batch.studies[2].study_hash]
    assert marker["failed_studies"] == sorted([batch.studies[1].study_hash, batch.studies[3].study_hash])
    reasons = {q["path"]: q for q in marker["quarantined"]}
    assert "missing slice" in reasons["bad_missing_slice"]["reason"]
    assert reasons["study_02"]["category"] == "unexpected error"
    table = shards.read_shard(storage.join(ctx.output_uri, marker["shard"]["path"]))
    assert table.num_rows == marker["shard"]["rows"] == 2
    assert len(batch.studies) == len(marker["studies"]) + len(marker["failed_studies"])


# ---------------------------------------------------------------------------------------------------- end to end


def _quarantine_rows(root: str) -> list[dict]:
    text = storage.read_bytes(storage.join(root, shards.QUARANTINE)).decode()
    return list(csv.DictReader(text.splitlines()))


@pytest.mark.slow
def test_whole_volume_corpus_through_ray_preprocess(tmp_path, ray_local):
    """All volume cases and the good series in one preprocess run on Ray workers (batches of 3 mix good and bad
    studies): each bad item is in quarantine.csv with its reason, every good one is in a shard, counts add up."""
    corpus = write_corpus(tmp_path / "corpus")
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(corpus.input_dir, corpus.labels, "generic", root, executor="ray", workers=2,
                                     min_slices=8, spacing=SPACING_OUT, grid=GRID, salt=SALT, shard_size=3,
                                     progress=False)  # fmt: skip
    c = manifest.counts
    assert c["processed"] == corpus.good
    assert c["in"] == c["processed"] + c["quarantined"]
    rows = _quarantine_rows(root)
    assert len(rows) == c["quarantined"] + c["label_problems"]
    for case, (path, reason) in corpus.expected.items():
        rel = os.path.relpath(Path(path).resolve(), corpus.input_dir.resolve())
        hits = [r for r in rows if r["path"] == rel]
        wanted = "no label row" if case == UNLABELLED else reason
        assert any(wanted in r["reason"] for r in hits), (case, rel, hits)
    # every shard row is a good series, none twice
    index = shards.read_index(root, manifest)
    assert index.num_rows == corpus.good == len(set(index.column("study_hash").to_pylist()))
    text = "\n".join(f"{r['path']},{r['reason']}" for r in rows)
    for phi in PHI_STRINGS:
        assert phi.lower() not in text.lower()


def _rsna_cohort(root: Path) -> tuple[Path, Path]:
    """Two RSNA-style studies; the label file has one malformed row for study 1's slice 2."""
    sops = rsna_images(root, n_studies=2)
    lines = ["ID,Label"] + [f"{sop}_{sub},0" for ids in sops for sop in ids
                            for sub in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid",
                                        "subdural", "any")]  # fmt: skip
    lines.append(f"{sops[1][2]}_subdural,maybe")
    (root / "stage_2_train.csv").write_text("\n".join(lines) + "\n")
    return root / "images", root / "stage_2_train.csv"


def _cq500_cohort(root: Path) -> tuple[Path, Path]:
    """Three CQ500-style studies (folders named as the download unpacks them); CQ500-CT-1's reads conflict."""
    from tests.data.malformed import CQ500_HEADER

    for i in range(3):
        phi_series(
            root / "images" / f"CQ500CT{i} CQ500CT{i}" / "Unknown Study" / "CT PLAIN THIN", i, f"P{i}", i
        )
    rows = [cq500_row("CQ500-CT-0", {"SDH": (1, 1, 0)}), cq500_row("CQ500-CT-1"), cq500_row("CQ500-CT-2"),
            cq500_row("CQ500-CT-1", {"EDH": (1, 1, 1)})]  # fmt: skip
    with open(root / "reads.csv", "w", newline="") as f:
        csv.writer(f).writerows([CQ500_HEADER, *rows])
    return root / "images", root / "reads.csv"


@pytest.mark.parametrize("fmt", ["rsna", "cq500"])
def test_label_problems_of_each_format_quarantine_their_study_only(fmt, tmp_path):
    images, label_file = (_rsna_cohort if fmt == "rsna" else _cq500_cohort)(tmp_path)
    root = str(tmp_path / "out")
    manifest = preprocess.preprocess(images, label_file, fmt, root, executor="inline", min_slices=8,
                                     **SETTINGS)  # fmt: skip
    c = manifest.counts
    n_series = 2 if fmt == "rsna" else 3
    assert c["in"] == n_series and c["processed"] == n_series - 1 and c["quarantined"] == 1
    assert c["quarantined_by_reason"] == {"labels unusable": 1} and c["label_problems"] == 1
    rows = _quarantine_rows(root)
    unusable = [r for r in rows if r["reason"].startswith("labels unusable")]
    assert len(unusable) == 1
    wanted = "is not 0 or 1" if fmt == "rsna" else "conflicting labels"
    assert wanted in unusable[0]["reason"]
    assert any(
        r["path"] == label_file.name and wanted in r["reason"] for r in rows
    )  # the file problem itself
