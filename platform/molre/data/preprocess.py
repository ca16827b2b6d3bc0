"""`molre preprocess`: DICOM/NIfTI + labels -> aligned int16 HU volumes in zstd Parquet shards (local or s3://).

    discover -> match labels -> hash ids -> split by patient -> batches (one shard each) -> Ray tasks:
    load + validate + align/resample + write shard + progress marker -> manifest.json + quarantine.csv

- **De-identification.** Patient ids (the label file's ``patient_id`` column, else the DICOM PatientID) and study
  keys become salted HMAC-SHA256 hashes (16 hex). The salt comes from ``--salt-file``, else ``MOLRE_PATIENT_SALT``,
  else ``~/.molre/salt`` (created, mode 600); it is never written to the output (only a fingerprint, an HMAC of a
  constant). Nothing else read from a header is stored; quarantine.csv names input paths relative to the input
  root, and DICOM UIDs in messages are blanked.
- **Studies.** One shard row per study (per label row): when several series match one study, the one with the most
  slices that loads is used and the others are quarantined ("another series of the same study was used").
- **Resume.** Batches are deterministic (a split's unfinished studies sorted by hash, ``shard_size`` at a
  time; shard id = hash of its studies' hashes, label and source fingerprints). Each shard is written under a
  temporary name and committed by rename or copy; then ``_progress/<batch>.json`` records it, with two
  fingerprints per study: of its label row (patient hash, labels, known) and of its source images
  (``source_fingerprint``: the candidate series' UIDs and file sizes, a NIfTI's gzip CRC or content; salted).
  A re-run skips every study in a marker whose shard is still there, pins already-placed patients to their
  split, deletes shard files no marker claims, and never duplicates a study. ``manifest.json`` is written
  last, after the output has been checked (no duplicate study, no patient in two splits, row counts as
  listed); shards and markers that it no longer lists are deleted after it.
- **Changed input.** A re-run reads the label file and the input afresh. A finished batch holding a study
  whose label row changed (a corrected label or patient id), whose images changed (a series replaced or
  re-sent, added or removed, a NIfTI overwritten: its source fingerprint differs) or that is no longer in the
  input or the label file (a withdrawn study) is *redone*, not refused: its remaining studies are processed
  again with their current labels and images into new batches (their patients keep their split), the gone ones
  are dropped, and the outdated batch's marker and shard are deleted once the new manifest is written. Until
  then the old manifest and its shards stay as they were, so a crash at any point leaves either the old
  dataset or the new one; the outdated markers are flagged ``superseded`` first, so that a re-run finishes the
  job whatever the input then holds. A copy of the input elsewhere (new paths, new modification times) changes
  no fingerprint. Markers of an older molre hold no label (source) fingerprints: withdrawn studies are still
  found, label corrections (replaced images) of their studies are not (a warning says so; preprocess into a
  new output to be sure); their current source fingerprints are then recorded, so that a later replacement
  is.
- **Source memo.** An uncompressed ``.nii`` is fingerprinted by its whole content (0.17 s per 84 MB): a re-run
  would read every input again to find nothing changed. ``_progress/source_digests.memo`` remembers each such
  file's content digest by its path, size, mtime, inode and ctime (``ingest.ContentMemo``); a re-run reads
  only the files whose stat changed, and the fingerprints are the same values. Kept in the output, next to the
  markers it serves (the input may be read-only, and a re-run from another machine finds it), so nothing in it
  is plain: the keys are HMACs with the salt, the digests encrypted with a pad derived from the salt (an
  unsalted content hash would link the output to the files, and to other outputs of the same files). Only a
  cache: lost or damaged, the files are read again.
- **Counts.** ``in`` = series found + files rejected by discovery = ``processed + quarantined``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from molre import __version__
from molre.data import ingest, labels, shards, storage
from molre.data.resample import DEFAULT_GRID, DEFAULT_SPACING, HU_MAX, HU_MIN, align_volume, check_geometry
from molre.data.split import (
    DEFAULT_SPLITS,
    assert_no_patient_leak,
    check_fractions,
    parse_fractions,
    split_patients,
)
from molre.errors import DataError, MolreError
from molre.findings import FINDING_IDS, NUM_FINDINGS
from molre.ray_init import start_or_join

log = logging.getLogger(__name__)

SALT_ENV = "MOLRE_PATIENT_SALT"
DEFAULT_SALT_FILE = Path("~/.molre/salt")
# a salt shorter than this is refused: with the manifest's fingerprint or one known id, a guessable salt (a word,
# a year) is found offline in seconds and every hash reverses to its MRN by enumeration. 32 characters is a
# 128-bit hex token (python -c "import secrets; print(secrets.token_hex(32))" prints 64, as the default file has)
MIN_SALT_CHARS = 32
HASH_HEX = 16  # 64-bit ids: collision odds ~ n^2 / 2^65 (3e-8 for a million studies)
DEFAULT_SHARD_SIZE = 16  # studies per shard (~16-40 MB at the default grid)
RUN_FILE = "run.json"
# not *.json: the markers are the .json files of _progress (older molre versions read every one as a marker)
SOURCE_MEMO = "source_digests.memo"
# a batch marker's flag: its batch is being redone (changed labels, withdrawn studies)
SUPERSEDED = "superseded"
# DICOM UIDs (StudyInstanceUID, SOPInstanceUID ...): four or more numbers, or three from a 0/1/2 root (the UUID
# form 2.25.<uuid as a decimal> has three), not part of a longer dotted number
_UID = re.compile(r"(?<![\d.])(?:\d+(?:\.\d+){3,}|[0-2](?:\.\d+){2,})(?!\.?\d)")
SERIES_NOT_USED = "another series of the same study was used"


# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PreprocessConfig:
    spacing: tuple[float, float, float] = DEFAULT_SPACING  # output voxel size, mm (z, y, x)
    grid: tuple[int, int, int] = DEFAULT_GRID  # output voxels (D, H, W)
    splits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    seed: int = 0
    labels_format: str = "generic"
    shard_size: int = DEFAULT_SHARD_SIZE
    min_slices: int = ingest.DEFAULT_MIN_SLICES
    antialias: bool = True  # Gaussian prefilter along downsampled axes (molre.data.resample, step 4)

    def __post_init__(self):
        check_geometry(self.spacing, "spacing")
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be 3 positive sizes (D,H,W), got {self.grid}")
        check_fractions(self.splits)
        if self.labels_format not in labels.LABEL_FORMATS:
            raise ValueError(f"labels format {self.labels_format!r} is not one of {labels.LABEL_FORMATS}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")

    def compat(self) -> dict:
        """What must not change between runs on one output (shard_size may)."""
        out = self.as_dict()
        out.pop("shard_size")
        return out

    def as_dict(self) -> dict:
        return {
            "spacing": [float(s) for s in self.spacing],
            "grid": [int(g) for g in self.grid],
            "splits": dict(self.splits),
            "seed": int(self.seed),
            "labels_format": self.labels_format,
            "shard_size": int(self.shard_size),
            "min_slices": int(self.min_slices),
            "antialias": bool(self.antialias),
            "hu_range": [HU_MIN, HU_MAX],
            "pad_value": HU_MIN,
            "alignment": "canonical LPS orientation + skull-based centring + fixed field of view (no registration)",
            "interpolation": "trilinear",
            "schema_version": shards.SCHEMA_VERSION,
        }


# ---------------------------------------------------------------------------------------------------- de-identification


def resolve_salt(salt_file: str | os.PathLike | None = None, output_uri: str | None = None) -> bytes:
    """The patient-hash salt: ``salt_file``, else $MOLRE_PATIENT_SALT, else ``~/.molre/salt`` (created 0600)."""
    if salt_file is not None:
        path = Path(salt_file).expanduser()
        if (
            output_uri
            and not storage.is_s3(output_uri)
            and path.resolve().is_relative_to(Path(output_uri).resolve())
        ):
            raise DataError(str(path), "the salt file must not lie inside the output")
        try:
            salt = path.read_bytes().strip()
        except OSError as err:
            raise DataError(str(path), f"cannot read the salt file ({type(err).__name__})") from None
        return _strong(salt, str(path))
    if os.environ.get(SALT_ENV, "").strip():
        return _strong(os.environ[SALT_ENV].strip().encode(), f"${SALT_ENV}")
    return _strong(_default_salt(DEFAULT_SALT_FILE.expanduser()), str(DEFAULT_SALT_FILE))


def _strong(salt: bytes, source: str) -> bytes:
    if not salt:
        raise DataError(source, "the salt is empty")
    if len(salt) < MIN_SALT_CHARS:
        raise DataError(
            source,
            f"the salt has {len(salt)} characters, fewer than {MIN_SALT_CHARS}: a short salt can be guessed and "
            "the hashes reversed; make one with python -c 'import secrets; print(secrets.token_hex(32))'",
        )
    return salt


def _default_salt(path: Path) -> bytes:
    """~/.molre/salt, created on first use: written to a private temp file, then linked to its name, so that a
    second first run never reads a half-written (empty) salt."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".salt-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process linked its salt first: then that one is used
            log.warning(
                "generated a new patient-hash salt in %s: keep it (re-runs on the same output need it)", path
            )
        except FileExistsError:
            pass
        except OSError as err:  # a filesystem without hard links
            raise DataError(
                str(path), f"cannot create the salt file ({type(err).__name__}); pass --salt-file"
            ) from None
        finally:
            tmp.unlink()
    return path.read_bytes().strip()


def salted_hash(salt: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256(salt, "<kind>\\0<value>") truncated to ``HASH_HEX`` hex digits."""
    return hmac.new(salt, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()[:HASH_HEX]


def salt_fingerprint(salt: bytes) -> str:
    return hmac.new(salt, b"molre salt fingerprint", hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True)
class Paths:
    """Turns input paths into what quarantine.csv may show: relative to the input root, UIDs blanked."""

    input_root: str
    labels_dir: str

    def relative(self, path: str) -> str:
        p = Path(path)
        for base in (Path(self.input_root), Path(self.labels_dir)):
            try:
                rel = p.resolve().relative_to(base)
                return self.redact(str(rel) if str(rel) != "." else base.name)
            except ValueError:
                continue
        return self.redact(p.name)

    def redact(self, text: str) -> str:
        for base in (self.input_root, self.labels_dir):
            text = text.replace(base.rstrip("/") + "/", "")
        return _UID.sub("<uid>", text)


# ---------------------------------------------------------------------------------------------------- planning


@dataclass
class StudyJob:
    """One study to process: its hashes, labels and candidate series (best first)."""

    study_hash: str
    patient_hash: str
    labels: np.ndarray  # uint8[75]
    known: np.ndarray  # uint8[75]
    refs: list[ingest.SeriesRef]
    split: str = ""
    source_fingerprint: str = ""  # salted hash of its series' ingest.source_digest (see source_fingerprint)


@dataclass
class Batch:
    batch_id: str
    split: str
    studies: list[StudyJob]


@dataclass(frozen=True)
class Quarantined:
    path: str  # relative to the input root (or the label file's name)
    reason: str
    category: str  # short reason for counting, numbers removed
    split: str = ""


def reason_category(reason: str, file_names: Collection[str] = ()) -> str:
    """A short, countable reason: 'IM-0003.dcm: truncated pixel data (100 of 2048 bytes)' -> 'truncated pixel
    data' (leading file name, details and numbers dropped). ``file_names``: the series' files, so that a leading
    name with spaces in it ('Doe John 3.dcm: ...') is known for one; a head without spaces is taken for one."""
    head, sep, rest = reason.partition(": ")
    if sep and rest and (head in file_names or " " not in head):
        reason = rest  # drop a leading file name
    short = re.split(r"[:(;]", reason, maxsplit=1)[0]
    short = re.sub(r"-?\d+(?:\.\d+)?", "#", short)
    return _UID.sub("<uid>", short).strip()[:80] or "unknown"


def _quarantine(
    paths: Paths, path: str, reason: str, split: str = "", category: str | None = None, file_names=()
) -> Quarantined:
    reason = paths.redact(reason)
    return Quarantined(paths.relative(path), reason, category or reason_category(reason, file_names), split)


def _patient_id(ref: ingest.SeriesRef, row: labels.LabelRow) -> str:
    """The label file's patient id, else the DICOM PatientID of the series' first file ("" if none)."""
    if row.patient_id:
        return row.patient_id
    if ref.kind != "dicom":
        return ""
    import pydicom

    try:
        with warnings.catch_warnings():  # pydicom warnings can quote header values
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(ref.files[0], stop_before_pixels=True, specific_tags=["PatientID"])
        return str(ds.get("PatientID", "") or "").strip()
    except Exception:  # unreadable: load_series will quarantine the series with the reason
        return ""


def plan_studies(
    refs: Sequence[ingest.SeriesRef],
    table: labels.LabelTable,
    salt: bytes,
    paths: Paths,
    memo: ingest.ContentMemo | None = None,
) -> tuple[list[StudyJob], list[Quarantined]]:
    """Group series by their label row (one study each) and hash ids; series without usable labels are
    quarantined. ``memo``: content digests remembered from the last run (``source_fingerprint``)."""
    groups: dict[str, list[ingest.SeriesRef]] = defaultdict(list)
    quarantined = []
    for ref in refs:
        try:
            table.for_study(ref.study_keys, ref.source)
        except DataError as err:
            category = "labels unusable" if "labels unusable" in err.reason else "no labels"
            quarantined.append(_quarantine(paths, err.path, err.reason, category=category))
            continue
        groups[table.match(ref.study_keys)].append(ref)
    jobs, anonymous = [], 0
    for key, members in groups.items():
        members = ingest.largest_first(members)
        row = table.rows[key]
        patient = _patient_id(members[0], row)
        if not patient:
            anonymous += 1
            patient = f"study\0{key}"  # no patient id anywhere: the study is its own patient
        jobs.append(
            StudyJob(
                study_hash=salted_hash(salt, "study", key),
                patient_hash=salted_hash(salt, "patient", patient),
                labels=row.labels.astype(np.uint8),
                known=row.known.astype(np.uint8),
                refs=members,
                source_fingerprint=source_fingerprint(salt, members, memo),
            )
        )
    if anonymous:
        log.warning(
            "%d studies have no patient id (label file or DICOM): each is treated as its own patient",
            anonymous,
        )
    return sorted(jobs, key=lambda j: j.study_hash), quarantined


def assign_splits(jobs: list[StudyJob], cfg: PreprocessConfig, pinned: dict[str, str]) -> None:
    positives = np.stack([j.labels & j.known for j in jobs]) if jobs else np.zeros((0, NUM_FINDINGS))
    splits = split_patients([j.patient_hash for j in jobs], positives, cfg.splits, cfg.seed, fixed=pinned)
    for job, split in zip(jobs, splits, strict=True):
        job.split = split
    _warn_of_lopsided_patients(jobs, cfg.splits)


def _warn_of_lopsided_patients(jobs: list[StudyJob], fractions: dict[str, float]) -> None:
    """A constant PatientID ('ANONYMOUS', a de-identification tool's placeholder) makes every study one patient's,
    and patient-level splitting then puts them all in one split: say so rather than train without a val set."""
    if not jobs:
        return
    studies_per_patient = Counter(j.patient_hash for j in jobs)
    most = max(studies_per_patient.values())
    if most >= 5 and most > 0.1 * len(jobs):
        log.warning(
            "one patient id holds %d of %d studies: if the export replaced patient ids with a constant, put "
            "the real ones (or one per study) in the label file's patient_id column",
            most, len(jobs),
        )  # fmt: skip
    filled = Counter(j.split for j in jobs)
    empty = [name for name, fraction in fractions.items() if fraction > 0 and not filled[name]]
    if empty and len(jobs) >= 2 * len(fractions):
        log.warning(
            "split %s is empty: %d studies of %d patients went to %s (splits are by patient)",
            "/".join(empty), len(jobs), len(studies_per_patient), "/".join(sorted(filled)),
        )  # fmt: skip


def label_fingerprint(job: StudyJob) -> str:
    """A hash of the study's label row as it reaches the shard: patient hash, labels, known."""
    digest = hashlib.sha256(job.patient_hash.encode())
    digest.update(np.asarray(job.labels, dtype=np.uint8).tobytes())
    digest.update(np.asarray(job.known, dtype=np.uint8).tobytes())
    return digest.hexdigest()[:HASH_HEX]


def source_fingerprint(
    salt: bytes, refs: Sequence[ingest.SeriesRef], memo: ingest.ContentMemo | None = None
) -> str:
    """A salted hash of the study's candidate series, each by ``ingest.source_digest`` (UIDs and file sizes,
    a NIfTI's gzip CRC or content; no paths, no mtimes): a series replaced, re-sent, added or removed changes
    it, a copy of the input to another disk does not. Every candidate counts, not only the series used: an
    added one may be the one used now. Salted, as every id stored: the digests come from header UIDs.
    ``memo``: the same value, files whose stat is unchanged unread (``ingest.ContentMemo``)."""
    return salted_hash(salt, "source", "\n".join(sorted(ingest.source_digest(r, memo) for r in refs)))


def make_batches(jobs: Sequence[StudyJob], shard_size: int) -> list[Batch]:
    """Per split, studies sorted by hash, ``shard_size`` at a time; batch id = hash of its study hashes, label
    and source fingerprints (a batch redone with corrected labels or a replaced series gets a new shard name:
    the old shard stays whole until the new manifest is written)."""
    batches = []
    by_split: dict[str, list[StudyJob]] = defaultdict(list)
    for job in sorted(jobs, key=lambda j: j.study_hash):
        by_split[job.split].append(job)
    for split in sorted(by_split):
        members = by_split[split]
        for start in range(0, len(members), shard_size):
            chunk = members[start : start + shard_size]
            text = "\n".join(f"{j.study_hash} {label_fingerprint(j)} {j.source_fingerprint}" for j in chunk)
            batches.append(Batch(hashlib.sha256(text.encode()).hexdigest()[:HASH_HEX], split, chunk))
    return batches


# ---------------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class BatchContext:
    """What a worker needs besides the batch (small, picklable; no salt, no raw ids)."""

    output_uri: str
    paths: Paths
    spacing: tuple[float, float, float]
    grid: tuple[int, int, int]
    min_slices: int
    antialias: bool = True


def shard_path(batch: Batch) -> str:
    return f"{batch.split}/shard-{batch.batch_id}{shards.SHARD_SUFFIX}"


def marker_uri(output_uri: str, batch_id: str) -> str:
    return storage.join(output_uri, shards.PROGRESS, f"batch-{batch_id}.json")


def process_study(job: StudyJob, ctx: BatchContext) -> tuple[dict | None, list[Quarantined]]:
    """Load the first candidate series that validates and align it; the row (or None) and what was quarantined."""
    quarantined = []
    for i, ref in enumerate(job.refs):
        try:
            volume = ingest.load_series(ref, min_slices=ctx.min_slices)
            aligned = align_volume(
                volume.hu, volume.spacing, volume.direction,
                out_spacing=ctx.spacing, grid=ctx.grid, antialias=ctx.antialias,
            )  # fmt: skip
        except DataError as err:
            names = set(ingest.file_names(ref.files))  # how reasons name the series' files
            quarantined.append(_quarantine(ctx.paths, err.path, err.reason, job.split, file_names=names))
            continue
        except Exception as err:  # a bug or an odd input must not stop the run: it is counted and shown
            reason = f"unexpected error while loading/aligning ({type(err).__name__}: {err})"
            quarantined.append(_quarantine(ctx.paths, ref.source, reason, job.split, "unexpected error"))
            continue
        row = shards.make_row(
            job.study_hash, job.patient_hash, job.split, aligned, ctx.spacing, job.labels, job.known
        )
        for other in job.refs[i + 1 :]:
            quarantined.append(
                _quarantine(ctx.paths, other.source, SERIES_NOT_USED, job.split, SERIES_NOT_USED)
            )
        return row, quarantined
    return None, quarantined


def process_batch(batch: Batch, ctx: BatchContext) -> dict:
    """Process every study of a batch, write its shard (atomic), then its progress marker; returns the marker."""
    rows, quarantined = [], []
    for job in batch.studies:
        row, lost = process_study(job, ctx)
        quarantined.extend(lost)
        if row is not None:
            rows.append(row)
    shard = None
    if rows:
        rel = shard_path(batch)
        sha, size = shards.write_shard(storage.join(ctx.output_uri, rel), rows)
        shard = asdict(shards.ShardInfo(rel, batch.split, len(rows), sha, size))
    marker = {
        "batch": batch.batch_id,
        "split": batch.split,
        "shard": shard,
        "studies": [[r["study_hash"], r["patient_hash"]] for r in rows],
        "failed_studies": sorted({j.study_hash for j in batch.studies} - {r["study_hash"] for r in rows}),
        "label_fingerprints": {j.study_hash: label_fingerprint(j) for j in batch.studies},
        "source_fingerprints": {j.study_hash: j.source_fingerprint for j in batch.studies},
        "quarantined": [asdict(q) for q in quarantined],
        "positives": np.sum([r["labels"] for r in rows], axis=0, dtype=np.int64).tolist()
        if rows
        else [0] * NUM_FINDINGS,
        "known": np.sum([r["known"] for r in rows], axis=0, dtype=np.int64).tolist()
        if rows
        else [0] * NUM_FINDINGS,
    }
    storage.write_bytes(
        marker_uri(ctx.output_uri, batch.batch_id), json.dumps(marker, sort_keys=True).encode()
    )
    return marker


def _run_inline(batches: list[Batch], ctx: BatchContext, progress) -> list[dict]:
    out = []
    for batch in batches:
        out.append(process_batch(batch, ctx))
        progress.update(1)
    return out


@contextlib.contextmanager
def _env_without(name: str):
    """``os.environ`` without ``name`` for the duration (processes started meanwhile do not inherit it)."""
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def _run_ray(batches: list[Batch], ctx: BatchContext, workers: int, progress) -> list[dict]:
    """One Ray task per batch, at most ``workers`` in flight; Ray is started here (and stopped) if needed."""
    import ray

    started, joined = not ray.is_initialized(), False
    if started:  # joined: an existing cluster, whose workers have their own environment
        with _env_without(SALT_ENV):  # the Ray processes started here inherit the environment: not the salt
            joined = start_or_join(workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        options: dict = {"num_cpus": 1}
        env = storage.forwarded_env()  # endpoint, region, profile ... and MOLRE_STORAGE_RETRY; never a secret
        if (joined or not started) and env and storage.is_s3(ctx.output_uri):
            options["runtime_env"] = {"env_vars": env}  # workers we did not start may lack the endpoint
        task = ray.remote(process_batch).options(**options)
        todo, pending, out = list(batches), [], []
        while todo or pending:
            while todo and len(pending) < workers:
                pending.append(task.remote(todo.pop(0), ctx))
            done, pending = ray.wait(pending, num_returns=1)
            try:
                out.extend(ray.get(done))
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, MolreError):  # a worker's StorageError / DataError as itself
                    raise err.cause from None
                raise
            progress.update(len(done))
        return out
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------------- resume state


def _check_run_file(output_uri: str, cfg: PreprocessConfig, fingerprint: str) -> None:
    """The output remembers the config and salt fingerprint of its first run; a different one is an error."""
    uri = storage.join(output_uri, shards.PROGRESS, RUN_FILE)
    want = {"config": cfg.compat(), "salt_fingerprint": fingerprint}
    try:
        found = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        storage.write_bytes(uri, json.dumps(want, sort_keys=True, indent=1).encode())
        return
    if found.get("salt_fingerprint") != fingerprint:
        raise DataError(
            output_uri, "was written with a different patient-hash salt; use its salt or a new output"
        )
    if found.get("config") != want["config"]:
        changed = sorted(k for k in want["config"] if found.get("config", {}).get(k) != want["config"][k])
        raise DataError(
            output_uri, f"was written with a different config ({', '.join(changed)}); use a new output"
        )


def _load_markers(output_uri: str, splits: Sequence[str]) -> dict[str, dict]:
    """Markers of finished batches whose shard is still there with its recorded size; stale ones are dropped."""
    sizes = {}
    for split in splits:
        for uri, size in storage.list_sizes(storage.join(output_uri, split), shards.SHARD_SUFFIX).items():
            sizes[storage.relative(uri, output_uri)] = size
    uris = [
        u
        for u in storage.list_dir(storage.join(output_uri, shards.PROGRESS), ".json")
        if not u.endswith(RUN_FILE)
    ]
    markers = {}
    for uri, data in storage.read_many(uris).items():
        marker = json.loads(data)
        shard = marker.get("shard")
        if shard is not None and sizes.get(shard["path"]) != shard["bytes"]:
            log.warning(
                "shard %s of a finished batch is missing or changed: its studies are redone", shard["path"]
            )
            storage.delete(uri)
            continue
        markers[marker["batch"]] = marker
    return markers


def source_memo_uri(output_uri: str) -> str:
    return storage.join(output_uri, shards.PROGRESS, SOURCE_MEMO)


def _memo_key(salt: bytes) -> Callable[[str], str]:
    """A file's stat text (path, size, times) as the memo stores it: HMAC-SHA256 with the salt, 32 hex (128
    bits: two files must never share a key)."""

    def key(text: str) -> str:
        data = f"source memo\0{text}".encode(errors="surrogateescape")  # a path may hold any bytes
        return hmac.new(salt, data, hashlib.sha256).hexdigest()[:32]

    return key


def _memo_pad(salt: bytes, key: str) -> bytes:
    """32 bytes that encrypt one remembered digest (XOR): an HMAC of its key, so a fresh pad per entry."""
    return hmac.new(salt, f"source memo pad\0{key}".encode(), hashlib.sha256).digest()


def _xor_hex(hex_digest: str, pad: bytes) -> str:
    return bytes(a ^ b for a, b in zip(bytes.fromhex(hex_digest), pad, strict=True)).hex()


def load_source_memo(output_uri: str, salt: bytes) -> ingest.ContentMemo:
    """The content digests the last run remembered (``SOURCE_MEMO``), decrypted; empty when there are none or
    they cannot be read (a warning: the files are read again, nothing else changes)."""
    memo = ingest.ContentMemo(key=_memo_key(salt))
    try:
        found = json.loads(storage.read_bytes(source_memo_uri(output_uri)))["digests"]
        memo.known = {key: _xor_hex(value, _memo_pad(salt, key)) for key, value in found.items()}
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # damaged: a cache, so start afresh
        log.warning("%s is unreadable (%s): the input files' content is read again",
                    source_memo_uri(output_uri), type(err).__name__)  # fmt: skip
    return memo


def save_source_memo(output_uri: str, salt: bytes, memo: ingest.ContentMemo) -> None:
    """Write what this run read or reused (``memo.used``) for the next, encrypted; unchanged: not rewritten."""
    if memo.used == memo.known:
        return
    digests = {key: _xor_hex(memo.used[key], _memo_pad(salt, key)) for key in sorted(memo.used)}
    storage.write_bytes(source_memo_uri(output_uri), json.dumps({"digests": digests}).encode())


@dataclass
class Changes:
    """What a re-run found changed in the studies of finished batches (counts are studies)."""

    batches: set[str] = field(default_factory=set)  # finished batches to redo
    labels: int = 0  # label row changed (labels, known, patient)
    images: int = 0  # candidate series changed (source fingerprint): replaced, re-sent, added, removed
    gone: int = 0  # no longer in the input or the label file
    unsourced: list[str] = field(default_factory=list)  # kept batches whose marker has no source fingerprints


def outdated_batches(markers: dict[str, dict], jobs: Sequence[StudyJob]) -> Changes:
    """Finished batches to redo: those holding a study whose label row or source series changed since (its
    label or source fingerprint differs) or that is no longer planned (gone from the input or the label file,
    or its labels now unusable), and those an interrupted run marked ``superseded``. A marker of an older
    molre without fingerprints of a kind detects no change of that kind."""
    labels_now = {j.study_hash: label_fingerprint(j) for j in jobs}
    sources_now = {j.study_hash: j.source_fingerprint for j in jobs}
    out, unlabelled = Changes(), 0
    for batch_id, marker in markers.items():
        if marker.get(SUPERSEDED):  # found outdated by an earlier run that did not finish: stays outdated
            out.batches.add(batch_id)
            continue
        members = _members(marker)
        lost = sum(s not in labels_now for s in members)
        relabelled = _differing(marker.get("label_fingerprints"), labels_now, members)
        replaced = _differing(marker.get("source_fingerprints"), sources_now, members)
        unlabelled += marker.get("label_fingerprints") is None
        if lost or relabelled or replaced:
            out.batches.add(batch_id)
            out.labels, out.images, out.gone = out.labels + relabelled, out.images + replaced, out.gone + lost
        elif marker.get("source_fingerprints") is None:
            out.unsourced.append(batch_id)
    if unlabelled:
        log.warning(
            "%d finished batches were written by an older molre without label fingerprints: a corrected label of "
            "their studies is not detected (withdrawn studies are); preprocess into a new output to be sure",
            unlabelled,
        )
    return out


def _members(marker: dict) -> list[str]:
    """Every study a batch marker accounts for: processed and failed."""
    return [s for s, _ in marker["studies"]] + list(marker["failed_studies"])


def _differing(recorded: dict | None, current: dict[str, str], members: Sequence[str]) -> int:
    """How many still-planned ``members`` have a recorded fingerprint other than the current one (0 when the
    marker records none)."""
    if recorded is None:
        return 0
    return sum(s in current and recorded.get(s) != current[s] for s in members)


def record_sources(output_uri: str, markers: dict[str, dict], jobs: Sequence[StudyJob]) -> None:
    """Markers of a molre before source fingerprints: their studies' current fingerprints are written into
    them, with a one-line notice. A series replaced before this run stays undetected in them; one replaced
    later is found like any other."""
    if not markers:
        return
    log.warning(
        "%d finished batches were written by an older molre without source fingerprints: a series "
        "replaced before this run is not detected in them (preprocess into a new output to be sure); their "
        "current ones are recorded now, so later replacements are", len(markers),
    )  # fmt: skip
    current = {j.study_hash: j.source_fingerprint for j in jobs}
    for batch_id, marker in sorted(markers.items()):
        marker["source_fingerprints"] = {s: current[s] for s in _members(marker)}
        storage.write_bytes(marker_uri(output_uri, batch_id), json.dumps(marker, sort_keys=True).encode())


def _sweep(output_uri: str, splits: Sequence[str], keep: set[str]) -> None:
    """Delete shard files no marker claims (left by an interrupted run) and stray temporary objects."""
    for split in splits:
        for uri in storage.list_dir(storage.join(output_uri, split)):
            if storage.relative(uri, output_uri) not in keep:
                log.info("removing unclaimed %s", storage.relative(uri, output_uri))
                storage.delete(uri)
    for folder in (output_uri, storage.join(output_uri, shards.PROGRESS)):
        for uri in storage.list_dir(folder):
            if storage.is_temp(uri):
                storage.delete(uri)


# ---------------------------------------------------------------------------------------------------- manifest


def build_manifest(
    cfg: PreprocessConfig,
    fingerprint: str,
    n_in: int,
    markers: Sequence[dict],
    early: Sequence[Quarantined],
    label_problems: int,
) -> tuple[shards.Manifest, list[Quarantined]]:
    quarantined = list(early) + [Quarantined(**q) for m in markers for q in m["quarantined"]]
    split_stats = {}
    for split in cfg.splits:
        mine = [m for m in markers if m["split"] == split]
        positives = np.sum([m["positives"] for m in mine], axis=0) if mine else np.zeros(NUM_FINDINGS, int)
        known = np.sum([m["known"] for m in mine], axis=0) if mine else np.zeros(NUM_FINDINGS, int)
        split_stats[split] = {
            "studies": sum(len(m["studies"]) for m in mine),
            "patients": len({p for m in mine for _, p in m["studies"]}),
            "quarantined": sum(len(m["quarantined"]) for m in mine),
            "positives": dict(zip(FINDING_IDS, map(int, positives), strict=True)),
            "known": dict(zip(FINDING_IDS, map(int, known), strict=True)),
        }
    processed = sum(len(m["studies"]) for m in markers)
    counts = {
        "in": n_in,
        "processed": processed,
        "quarantined": len(quarantined),
        "quarantined_by_reason": dict(sorted(Counter(q.category for q in quarantined).items())),
        "label_problems": label_problems,
        "splits": split_stats,
    }
    shard_list = sorted(
        (shards.ShardInfo(**m["shard"]) for m in markers if m["shard"] is not None), key=lambda s: s.path
    )
    config = cfg.as_dict() | {"molre_version": __version__}
    return shards.Manifest(config, counts, shard_list, fingerprint), quarantined


def verify_output(output_uri: str, manifest: shards.Manifest) -> None:
    """What is on storage matches the manifest: rows per shard, split per folder, no study twice, no patient in
    two splits. Raises ``DataError``."""
    index = shards.read_index(output_uri, manifest)
    listed = {s.path: s for s in manifest.shards}
    per_shard = Counter(index.column("shard").to_pylist())
    for path, info in listed.items():
        if per_shard[path] != info.rows:
            raise DataError(
                storage.join(output_uri, path), f"holds {per_shard[path]} rows, manifest says {info.rows}"
            )
    for split, shard in zip(
        index.column("split").to_pylist(), index.column("shard").to_pylist(), strict=True
    ):
        if listed[shard].split != split:
            raise DataError(
                storage.join(output_uri, shard), f"holds a {split!r} row in the {listed[shard].split} folder"
            )
    studies = Counter(index.column("study_hash").to_pylist())
    twice = [s for s, n in studies.items() if n > 1]
    if twice:
        raise DataError(output_uri, f"{len(twice)} studies appear more than once, e.g. study_hash {twice[0]}")
    assert_no_patient_leak(
        index.column("patient_hash").to_pylist(), index.column("split").to_pylist(), output_uri
    )


def quarantine_csv(rows: Sequence[Quarantined], problems: Sequence[Quarantined]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for q in sorted([*rows, *problems], key=lambda q: (q.path, q.reason)):
        writer.writerow([q.path, q.reason])
    return out.getvalue().encode()


# ---------------------------------------------------------------------------------------------------- entry point


def preprocess(
    input_dir: str | os.PathLike,
    labels_path: str | os.PathLike,
    labels_format: str = "generic",
    output_uri: str = "",
    *,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    grid: tuple[int, int, int] = DEFAULT_GRID,
    splits: dict[str, float] | None = None,
    seed: int = 0,
    salt: bytes | str | None = None,
    workers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    min_slices: int = ingest.DEFAULT_MIN_SLICES,
    antialias: bool = True,
    executor: str = "ray",
    progress: bool | None = None,
) -> shards.Manifest:
    """Preprocess every series under ``input_dir`` into shards at ``output_uri``; returns the manifest.

    ``executor``: "ray" (Ray tasks, ``workers`` CPUs; Ray started here if not running) or "inline" (this process,
    for tests and debugging). ``salt`` None resolves as ``resolve_salt()``. Re-running resumes (see module doc).
    """
    if not output_uri:
        raise ValueError("output_uri is required")
    cfg = PreprocessConfig(tuple(spacing), tuple(int(g) for g in grid), dict(splits or DEFAULT_SPLITS), seed,
                           labels_format, shard_size, min_slices, antialias)  # fmt: skip
    output_uri = output_uri.rstrip("/") if storage.is_s3(output_uri) else os.path.abspath(output_uri)
    salt = (
        resolve_salt(None, output_uri) if salt is None else (salt.encode() if isinstance(salt, str) else salt)
    )
    fingerprint = salt_fingerprint(salt)
    input_root = Path(input_dir).resolve()
    paths = Paths(str(input_root), str(Path(labels_path).resolve().parent))
    started = time.perf_counter()

    storage.check_bucket(output_uri)  # a missing / mistyped bucket: a clear error, never a new bucket
    _check_run_file(output_uri, cfg, fingerprint)
    refs, rejects = ingest.discover(input_root)
    table = labels.load_labels(
        labels_path, cfg.labels_format, series=refs if cfg.labels_format == "rsna" else None
    )
    early = [_quarantine(paths, err.path, err.reason) for err in rejects]
    memo = load_source_memo(output_uri, salt)
    jobs, unlabelled = plan_studies(refs, table, salt, paths, memo)
    save_source_memo(output_uri, salt, memo)
    if memo.hits or memo.reads:
        log.info("source fingerprints: %d files read whole, %d unchanged since the last run (not read)",
                 memo.reads, memo.hits)  # fmt: skip
    early += unlabelled
    problems = [
        _quarantine(paths, err.path, err.reason, category="label file problem") for err in table.problems
    ]

    loaded = _load_markers(output_uri, list(cfg.splits))
    # patients keep the split they were placed in, also those of batches about to be redone
    pinned = {p: m["split"] for m in loaded.values() for _, p in m["studies"]}
    changes = outdated_batches(loaded, jobs)
    outdated = changes.batches
    if changes.labels or changes.images or changes.gone:
        log.warning(
            "%s: %d studies changed labels, %d changed images (a series replaced, added or removed), %d are "
            "no longer in the input: the finished batches holding them are redone, without the gone ones",
            output_uri, changes.labels, changes.images, changes.gone,
        )  # fmt: skip
    # flagged first: the decision outlives a crash, whatever the input looks like next time
    for batch_id in sorted(outdated):
        if not loaded[batch_id].get(SUPERSEDED):
            marker = loaded[batch_id] | {SUPERSEDED: True}
            storage.write_bytes(marker_uri(output_uri, batch_id), json.dumps(marker, sort_keys=True).encode())
    record_sources(output_uri, {b: loaded[b] for b in changes.unsourced}, jobs)
    done = {b: m for b, m in loaded.items() if b not in outdated}
    finished = {s for m in done.values() for s, _ in m["studies"]} | {
        s for m in done.values() for s in m["failed_studies"]
    }
    assign_splits(jobs, cfg, pinned)
    batches = make_batches([j for j in jobs if j.study_hash not in finished], cfg.shard_size)
    log.info("preprocess: %d series, %d studies to do in %d batches (%d batches already done)",
             len(refs), sum(len(b.studies) for b in batches), len(batches), len(done))  # fmt: skip

    ctx = BatchContext(output_uri, paths, cfg.spacing, cfg.grid, cfg.min_slices, cfg.antialias)
    new = _execute(batches, ctx, executor, workers, progress)
    markers = sorted([*done.values(), *new], key=lambda m: m["batch"])
    manifest, quarantined = build_manifest(
        cfg, fingerprint, len(refs) + len(rejects), markers, early, len(problems)
    )
    verify_output(output_uri, manifest)
    storage.write_bytes(storage.join(output_uri, shards.QUARANTINE), quarantine_csv(quarantined, problems))
    storage.write_bytes(storage.join(output_uri, shards.MANIFEST), manifest.to_json().encode())
    # only now that the new manifest is the dataset: the outdated batches' markers, then every unlisted shard
    for batch_id in sorted(outdated - {m["batch"] for m in markers}):
        storage.delete(marker_uri(output_uri, batch_id))
    _sweep(output_uri, list(cfg.splits), {s.path for s in manifest.shards})
    _log_summary(manifest, time.perf_counter() - started)
    return manifest


def _execute(
    batches: list[Batch], ctx: BatchContext, executor: str, workers: int | None, progress
) -> list[dict]:
    from tqdm.auto import tqdm

    workers = max(1, int(workers or len(os.sched_getaffinity(0))))
    disable = None if progress is None else not progress  # None: shown on a terminal only
    with tqdm(total=len(batches), desc="preprocess", unit="shard", disable=disable) as bar:
        if executor == "inline":
            return _run_inline(batches, ctx, bar)
        if executor == "ray":
            return _run_ray(batches, ctx, workers, bar) if batches else []
    raise ValueError(f"executor must be 'ray' or 'inline', got {executor!r}")


def _log_summary(manifest: shards.Manifest, seconds: float) -> None:
    c = manifest.counts
    log.info("preprocess: %d in = %d processed + %d quarantined (%s); %d shards; %.1f s",
             c["in"], c["processed"], c["quarantined"], c["quarantined_by_reason"], len(manifest.shards), seconds)  # fmt: skip
    if c["in"] != c["processed"] + c["quarantined"]:
        log.warning("counts do not reconcile: the input changed since this output was started")


# ---------------------------------------------------------------------------------------------------- CLI


def _triple(kind: Callable[[str], float | int]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not 3 comma-separated numbers") from None
        if len(values) != 3 or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be 3 positive comma-separated numbers (z,y,x)")
        return values

    return parse


def _fractions(text: str) -> dict[str, float]:
    try:
        return parse_fractions(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="folder of DICOM series and/or NIfTI files")
    parser.add_argument("--labels", required=True, help="label file (CSV)")
    parser.add_argument("--labels-format", default="generic", choices=labels.LABEL_FORMATS)
    parser.add_argument("--output", required=True, help="output root: local path or s3://bucket/prefix")
    parser.add_argument(
        "--spacing", type=_triple(float), default=DEFAULT_SPACING, help="z,y,x mm (default 4,1,1)"
    )
    parser.add_argument(
        "--grid", type=_triple(int), default=DEFAULT_GRID, help="D,H,W voxels (default 40,256,256)"
    )
    parser.add_argument(
        "--splits", type=_fractions, default=dict(DEFAULT_SPLITS), help="train=0.8,val=0.1,test=0.1"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--workers", type=int, default=None, help="parallel Ray tasks (default: all CPUs)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="studies per shard")
    parser.add_argument("--min-slices", type=int, default=ingest.DEFAULT_MIN_SLICES)
    parser.add_argument(
        "--no-antialias",
        dest="antialias",
        action="store_false",
        help="no Gaussian prefilter along downsampled axes (a lesion thinner than the output spacing can vanish)",
    )
    parser.add_argument(
        "--salt-file", default=None, help=f"patient-hash salt (else ${SALT_ENV}, else ~/.molre/salt)"
    )


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = args.output.rstrip("/") if storage.is_s3(args.output) else os.path.abspath(args.output)
    manifest = preprocess(
        args.input,
        args.labels,
        args.labels_format,
        output,
        spacing=args.spacing,
        grid=args.grid,
        splits=args.splits,
        seed=args.seed,
        salt=resolve_salt(args.salt_file, output),
        workers=args.workers,
        shard_size=args.shard_size,
        min_slices=args.min_slices,
        antialias=args.antialias,
        executor="ray",
    )
    c = manifest.counts
    per_split = ", ".join(f"{s} {v['studies']}" for s, v in c["splits"].items())
    print(f"{c['in']} in = {c['processed']} processed ({per_split}) + {c['quarantined']} quarantined")
    for reason, n in c["quarantined_by_reason"].items():
        print(f"  quarantined {n:5d}  {reason}")
    print(f"{len(manifest.shards)} shards, manifest: {storage.join(output, shards.MANIFEST)}")
    return 0
