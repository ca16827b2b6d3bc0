"""Ingest: find CT series (DICOM folders, NIfTI files) under a directory, validate them, load them as HU volumes.

Two steps, so that a caller can account for every input (``in = processed + quarantined``):

- ``discover(input_dir) -> (refs, rejects)`` walks the tree reading DICOM *headers only*, groups DICOM files by
  SeriesInstanceUID (one ``SeriesRef`` per series, wherever its files lie) and takes each ``.nii``/``.nii.gz``
  as one series. Files that are neither (junk, zero bytes, unreadable headers, dangling symbolic links) come back
  as ``DataError`` rejects. A folder's name is a study key of the series in it unless it holds several studies
  (see ``_dicom_refs``). A second copy of an instance (the same SOPInstanceUID and the same pixel data bytes: a
  study exported twice, a PACS re-send) is dropped, so that it does not read as a duplicate slice.
- ``source_digest(ref, memo)`` fingerprints a series from what discover read (UIDs, file sizes; a NIfTI's gzip
  CRC or content), so that a re-run of ``molre preprocess`` tells a replaced series from a copied one; a
  ``ContentMemo`` spares re-reading the content of a file whose ``os.stat`` did not change since.
- ``largest_first(refs)`` orders a study's series for trying: ORIGINAL ones (ImageType) before those without an
  ImageType before DERIVED ones, then most slices first.
- ``load_series(ref) -> Volume`` decodes pixels (uncompressed, RLE, and through python-gdcm JPEG baseline /
  lossless, JPEG-LS and JPEG 2000), turns padding pixels into air, applies the rescale to HU, validates and
  returns the volume, or raises one ``DataError`` naming the series and the reason.

Volume convention (shared with ``molre.data.dicom_write``): ``hu`` is ``[D, H, W]`` float32, slice 0 the most
inferior; ``direction`` rows are the unit vectors, in patient LPS, of the array axes z (slices), y (rows),
x (columns); ``origin`` is the LPS position (mm) of voxel ``[0, 0, 0]``, so voxel ``(k, j, i)`` sits at
``origin + k*dz*direction[0] + j*dy*direction[1] + i*dx*direction[2]``.

Validation bounds (module constants, so they are documented in one place):

- axial: the slice normal within ``AXIAL_MAX_DEG`` = 30 deg of the head-foot axis (an oblique axial is accepted
  and carried in ``direction``; sagittal/coronal are 90 deg off and rejected);
- gantry tilt: a GantryDetectorTilt other than 0 (beyond ``TILT_MAX_DEG``), or slices stacked more than
  ``SHEAR_MAX_DEG`` = 0.5 deg off their normal (sheared geometry), or row/column directions not orthogonal;
- slice spacing: every step within ``max(0.05 mm, 2 %)`` of the median step; a step that is a whole multiple of
  the median is a missing slice; steps under 0.01 mm are duplicate positions;
- padding: stored values equal to PixelPaddingValue (0028,0120), or between it and PixelPaddingRangeLimit
  (0028,0121) inclusive, are set to ``PADDING_HU`` = -1024 (air) after the rescale, whatever the rescale would
  make of them (padding -32768 or 63536 would otherwise be -33792 or 62512 HU and fail the HU check);
- HU: every voxel in ``[HU_FLOOR, HU_CEIL]`` = [-3100, 32767] (below: nothing a scanner writes, padding included
  at -3024; above: does not fit the int16 shards), the minimum at most ``AIR_MAX_HU`` = -500 (a head CT field of
  view always holds air) and the maximum at least ``BONE_MIN_HU`` = 200 (and skull); a volume failing these was
  almost always stored without, or with a wrong, RescaleSlope/Intercept;
- at least ``DEFAULT_MIN_SLICES`` = 8 slices (``min_slices`` argument, never below 2);
- size: at most ``MAX_MATRIX`` = 4096 rows and columns per slice and, for NIfTI, ``MAX_SLICES`` = 4096 slices (a
  larger header value is damage, and decoding it would try to allocate that much);
- image kind: a slice with BurnedInAnnotation (0028,0301) YES, a SOPClassUID other than CT Image Storage
  (secondary captures: screen saves, dose reports, workstation exports; Enhanced CT is multi-frame, also refused),
  or an ImageType (0008,0008) holding SECONDARY, SCREEN SAVE or LOCALIZER refuses its series: such pixels can
  carry text drawn in (the patient's name) or are no diagnostic axial stack. A missing element refuses nothing
  (anonymised exports often drop ImageType); RecognizableVisualFeatures is not read (a head CT always shows a
  face: SECURITY.md);
- rescale: when any slice of a series has RescaleSlope (RescaleIntercept), every slice must have it (a slice
  without would be read with slope 1 / intercept 0, e.g. 1024 HU off); a series where no slice has them is read
  with 1 / 0 and left to the HU check below;
- header elements: every DICOM element ``load_series`` reads is converted and parsed up front (``_check_elements``);
  one that is malformed (unknown VR, a number that is not one, NaN, the wrong number of values, an unknown transfer
  syntax) is a ``DataError`` naming the file and the element, and anything the parsers still raise on damaged
  bytes becomes a ``DataError`` naming the series and the exception type only (tests/reliability fuzzes this).

De-identification: nothing read from a header leaves this module except geometry, pixels, the study keys used to
match label rows, and ``Volume.patient_id`` in its own field (needed for the salted hash; hidden from ``repr``).
Error messages name the file path (a series' files relative to its folder) and the reason only; pydicom's own
warnings and log records, which can quote header values, are suppressed (importing this module raises the
``pydicom`` logger's level above CRITICAL).
Paths are quoted as given: operators must not put patient names or ids in file or folder names.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom  # imported here so that its logging setup runs before ours below
from pydicom.multival import MultiValue
from pydicom.uid import UID

from molre.errors import DataError

DEFAULT_MIN_SLICES = 8
AXIAL_MAX_DEG = 30.0  # slice normal vs the LPS z axis
SHEAR_MAX_DEG = 0.5  # slice stacking direction vs the slice normal
TILT_MAX_DEG = 0.01  # |GantryDetectorTilt|
ORIENTATION_TOL = 1e-3  # direction cosines equal across slices / orthogonal within this
DUPLICATE_MM = 0.01  # two slices closer than this along the normal share a position
STEP_ABS_TOL_MM = 0.05  # slice step tolerance: max(0.05 mm, 2 % of the median step)
STEP_REL_TOL = 0.02
HU_FLOOR, HU_CEIL = -3100.0, 32767.0
AIR_MAX_HU, BONE_MIN_HU = -500.0, 200.0
PADDING_HU = -1024.0  # what PixelPaddingValue pixels become: air, the floor of molre.data.resample's HU clip

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Sidecar files that are neither images nor junk: skipped, not counted. Hidden files and DICOMDIR indexes too.
DEFAULT_IGNORE = (".*", "DICOMDIR", "*.csv", "*.json", "*.txt", "*.md", "*.yaml", "*.yml")
_HEADER_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "ImageType"]
# elements load_series reads (converted and checked up front by _check_elements)
_TEXT_ELEMENTS = ("Modality", "PatientID", "SOPClassUID", "ImageType", "BurnedInAnnotation")
_NUMERIC_ELEMENTS = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                     "GantryDetectorTilt", "RescaleSlope", "RescaleIntercept", "SamplesPerPixel", "BitsAllocated",
                     "NumberOfFrames", "PixelPaddingValue", "PixelPaddingRangeLimit")  # fmt: skip
_MULTI_VALUED = {"PixelSpacing": 2, "ImageOrientationPatient": 6, "ImagePositionPatient": 3}
MAX_MATRIX = 4096  # rows / columns per slice: CT is 512 or 1024; a larger value is a damaged header
MAX_SLICES = 4096  # NIfTI slices (a DICOM series' slice count is its file count)
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "DA", "DT", "TM", "AE", "AS", "UI", "CS"}
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world is RAS+, DICOM patient space is LPS+
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # the one SOP class accepted (single-frame CT slices)
# Enhanced CT and Legacy Converted Enhanced CT: multi-frame objects (their geometry is per frame)
ENHANCED_CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
# ImageType values of images that are not a diagnostic axial stack, or are pictures of one (text drawn in)
REFUSED_IMAGE_TYPES = ("SECONDARY", "SCREEN SAVE", "LOCALIZER")
# largest_first tries a study's series in this order of ImageType's first value ("": not given)
_IMAGE_TYPE_RANK = {"ORIGINAL": 0, "": 1, "DERIVED": 2}

log = logging.getLogger(__name__)

# pydicom logs (and warns) messages that can quote header values, e.g. an invalid UID. Its child loggers inherit
# this level, so nothing from pydicom reaches any handler (pydicom.config.debug() would turn it back on).
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


@dataclass(frozen=True)
class SeriesRef:
    """One series found by ``discover``: a DICOM series (its files) or one NIfTI file."""

    # what errors name: the series folder, its first file if that folder holds several series, or the NIfTI
    source: str
    kind: str  # "dicom" | "nifti"
    files: tuple[str, ...]  # DICOM files of the series sorted by name; (path,) for NIfTI
    study_keys: tuple[str, ...]  # most specific first: folder / file-stem names, then StudyInstanceUID
    study_uid: str = ""  # DICOM StudyInstanceUID ("" for NIfTI)
    # SOPInstanceUID per file in ``files`` (RSNA labels are per slice)
    sop_uids: tuple[str, ...] = field(default=(), repr=False)
    # size in bytes per file in ``files`` (DICOM; with ``sop_uids`` what ``source_digest`` hashes)
    file_sizes: tuple[int, ...] = field(default=(), repr=False)
    # ImageType's first value over the series: "DERIVED" if any file says so, else "ORIGINAL" if any file says
    # so, else "" (not given, or NIfTI); only these three values, for largest_first
    image_type: str = ""


@dataclass
class Volume:
    """A validated CT volume in HU with its geometry (see the module doc for the axis convention)."""

    hu: np.ndarray = field(repr=False)  # float32 [D, H, W], slice 0 inferior
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    direction: np.ndarray  # 3x3, rows: unit vectors of array axes z, y, x in LPS
    origin: np.ndarray  # (3,) LPS mm of voxel [0, 0, 0]
    study_keys: tuple[str, ...]
    source: str
    # raw header PatientID ("" for NIfTI): for the salted hash only, never logged, hidden from repr
    patient_id: str = field(default="", repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)


# ---------------------------------------------------------------------------------------------------- discover


def discover(
    input_dir: str | os.PathLike, *, ignore: Sequence[str] = DEFAULT_IGNORE
) -> tuple[list[SeriesRef], list[DataError]]:
    """All series under ``input_dir`` and the files that could not be part of one.

    Every file not matching an ``ignore`` pattern ends up in exactly one ref or one reject, so
    ``len(refs) + len(rejects)`` is the number of input items, except a second copy of a DICOM instance (the same
    SOPInstanceUID and pixel data as a file kept; see ``_drop_copies``), which is skipped. Order is deterministic
    (sorted paths).
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise DataError(str(root), "input directory does not exist")
    headers: dict[str, list[_Header]] = defaultdict(list)  # series uid -> its files' headers
    nifti: list[SeriesRef] = []
    rejects: list[DataError] = []
    for path in _walk(root, ignore, rejects):
        try:
            size = _check_readable(path)
            if path.name.lower().endswith(NIFTI_SUFFIXES):
                nifti.append(_nifti_ref(path, root))
            else:
                series_uid, study_uid, sop_uid, image_type = _dicom_header(path)
                headers[series_uid].append(_Header(str(path), study_uid, sop_uid, image_type, size))
        except DataError as err:
            rejects.append(err)
    refs = _dicom_refs(headers, root) + nifti
    return sorted(refs, key=lambda r: r.source), rejects


def _walk(root: Path, ignore: Sequence[str], rejects: list[DataError]) -> Iterator[Path]:
    """Files under ``root`` in sorted order. Symbolic links to folders are followed (PACS exports link study
    folders), each real folder once (a link back up the tree would loop); a folder that cannot be listed is a
    reject, so that its files are accounted for."""
    seen: set[str] = set()

    def unlisted(err: OSError) -> None:
        rejects.append(DataError(str(err.filename), f"cannot list folder ({type(err).__name__})"))

    for folder, dirs, files in os.walk(root, onerror=unlisted, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # reached again through a link: its files are already counted
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not _ignored(d, ignore))
        for name in sorted(files):
            if not _ignored(name, ignore):
                yield Path(folder) / name


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


class _Header(NamedTuple):
    """What discover keeps of one DICOM file."""

    path: str
    study_uid: str
    sop_uid: str
    image_type: str  # ImageType's first value: "ORIGINAL", "DERIVED" or ""
    size: int  # bytes


def _check_readable(path: Path) -> int:
    """The file's size, or a DataError for a file discovery cannot read: a dangling symbolic link, an
    unreadable entry, 0 bytes."""
    try:
        size = path.stat().st_size  # follows a symbolic link to its target
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and path.is_symlink():
            raise DataError(str(path), "dangling symbolic link (its target does not exist)") from None
        raise DataError(str(path), f"cannot read file ({type(exc).__name__})") from None
    if size == 0:
        raise DataError(str(path), "empty file (0 bytes)")
    return size


def _dicom_header(path: Path) -> tuple[str, str, str, str]:
    """(SeriesInstanceUID, StudyInstanceUID, SOPInstanceUID, ImageType's first value: "ORIGINAL", "DERIVED" or
    "") read without pixels, or a DataError."""
    from pydicom.errors import InvalidDicomError

    with _quiet():  # pydicom converts values lazily and may warn, quoting them, on first access: all inside
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            # values are converted lazily, here: a damaged element (unknown VR, bad length) fails now
            uids = tuple(str(ds.get(keyword, "") or "") for keyword in _HEADER_TAGS[:3])
        except InvalidDicomError:
            raise DataError(str(path), "not a DICOM file (no DICM preamble) nor NIfTI") from None
        except Exception as exc:  # any parser failure on untrusted bytes; its message may quote header values
            raise DataError(str(path), f"unreadable DICOM header ({type(exc).__name__})") from None
        try:  # only orders a study's series: a damaged ImageType is load_series' to report, not a reject here
            kind = _image_type_values(ds)[:1]
        except Exception:
            kind = []
    if not uids[0]:
        raise DataError(str(path), "DICOM header without SeriesInstanceUID (truncated file or not an image)")
    return (*uids, kind[0] if kind and kind[0] in ("ORIGINAL", "DERIVED") else "")


def _image_type_values(ds) -> list[str]:
    """ImageType (0008,0008) as upper-case values, [] when absent (one string unsplit by the parser: split)."""
    value = ds.get("ImageType")
    if value in (None, ""):
        return []
    values = value if isinstance(value, MultiValue | list | tuple) else str(value).split("\\")
    return [str(v).strip().upper() for v in values]


def _dicom_refs(headers: dict[str, list[_Header]], root: Path) -> list[SeriesRef]:
    """One ref per series. A folder holding one series names it (else the series' first file does). The folder's
    own name is a study key when every series in it belongs to one study (a thick and a thin reconstruction
    exported loose into a folder named by the study id), not when it holds several studies (RSNA's one folder of
    every slice): there the StudyInstanceUID and the folders above tell the studies apart. Second copies of an
    instance are dropped first (``_drop_copies``)."""
    series_in: dict[str, set[str]] = defaultdict(set)  # folder -> SeriesInstanceUIDs with a file in it
    studies_in: dict[str, set[str]] = defaultdict(set)  # folder -> StudyInstanceUIDs ("" = none given)
    for series_uid, entries in headers.items():
        for entry in entries:
            series_in[str(Path(entry.path).parent)].add(series_uid)
            studies_in[str(Path(entry.path).parent)].add(entry.study_uid)
    refs, dropped = [], 0
    for series_uid, entries in headers.items():
        kept = _drop_copies(sorted(entries))
        dropped += len(entries) - len(kept)
        entries = kept
        paths = [e.path for e in entries]
        # files spread over sub-folders: their common parent (a folder holding none of them directly)
        folder = Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent
        study_uid = entries[0].study_uid
        sole_series = len(series_in.get(str(folder), {series_uid})) == 1
        one_study = len(studies_in.get(str(folder), {study_uid})) == 1
        keys = _folder_keys(folder, root, include_self=one_study) + ((study_uid,) if study_uid else ())
        refs.append(
            SeriesRef(
                source=str(folder) if sole_series else paths[0],
                kind="dicom",
                files=tuple(paths),
                study_keys=_unique(keys),
                study_uid=study_uid,
                sop_uids=tuple(e.sop_uid for e in entries),
                image_type=_series_image_type({e.image_type for e in entries}),
                file_sizes=tuple(e.size for e in entries),
            )
        )
    if dropped:
        log.info(
            "discover: skipped %d second copies of DICOM instances (same SOPInstanceUID and pixels)", dropped
        )
    return refs


def _series_image_type(kinds: set[str]) -> str:
    """One value for the series: a single DERIVED file makes it DERIVED (the cautious choice for ordering)."""
    return "DERIVED" if "DERIVED" in kinds else "ORIGINAL" if "ORIGINAL" in kinds else ""


def _drop_copies(entries: list[_Header]) -> list[_Header]:
    """``entries`` (sorted by path) without second copies of an instance: a file whose SOPInstanceUID is that of
    an earlier file and whose pixel data bytes are the same (a study exported twice, a PACS re-send). Two files
    with one SOPInstanceUID but different pixels are both kept: load_series then names both. Pixel data is read
    only for files whose SOPInstanceUID repeats (no cost otherwise)."""
    by_sop: dict[str, list[int]] = defaultdict(list)
    for i, entry in enumerate(entries):
        if entry.sop_uid:
            by_sop[entry.sop_uid].append(i)
    drop: set[int] = set()
    for indices in by_sop.values():
        if len(indices) < 2:
            continue
        digests = {i: _pixel_digest(entries[i].path) for i in indices}
        for n, i in enumerate(indices):
            if digests[i] is not None and any(digests[j] == digests[i] for j in indices[:n] if j not in drop):
                drop.add(i)
    return [e for i, e in enumerate(entries) if i not in drop]


def _pixel_digest(path: str) -> str | None:
    """SHA-256 of a file's PixelData element as stored (not decoded), None when it cannot be read."""
    try:
        with _quiet():
            data = pydicom.dcmread(path).get("PixelData")
        return hashlib.sha256(bytes(data)).hexdigest() if data else None
    except Exception:  # damaged: keep the file, load_series reports it
        return None


def _folder_keys(folder: Path, root: Path, *, include_self: bool) -> tuple[str, ...]:
    """Folder names from ``folder`` up to (not including) ``root``, deepest first, ``folder``'s own name only when
    ``include_self``. A series lying directly in ``root`` is keyed by ``root``'s name (``discover('/data/study_7')``
    still yields ``study_7``)."""
    names = list(reversed(folder.relative_to(root).parts))
    if not names:
        return (root.resolve().name,) if include_self else ()
    return tuple(names if include_self else names[1:])


def _unique(keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for k in keys if k))


def _nifti_ref(path: Path, root: Path) -> SeriesRef:
    _nifti_image(path)  # header check now; voxel data is read by load_series
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    # the file stem, then its folders below root (root's own name is shared by every file in it: no key)
    keys = (stem,) + (_folder_keys(path.parent, root, include_self=True) if path.parent != root else ())
    return SeriesRef(source=str(path), kind="nifti", files=(str(path),), study_keys=_unique(keys))


# ---------------------------------------------------------------------------------------------------- source digest

GZIP_MAGIC = b"\x1f\x8b"
GZIP_HEADER, GZIP_TRAILER = 10, 8  # bytes; the trailer: CRC-32 and size mod 2^32 of the uncompressed data


def source_digest(ref: SeriesRef, memo: ContentMemo | None = None) -> str:
    """SHA-256 (hex) of what identifies the series' content, cheaply: it changes when the series is replaced,
    not when it is copied, moved or renamed (no paths, no modification times).

    - DICOM: every file's SOPInstanceUID and size, as ``discover`` read them (no more I/O). A re-sent series
      (new instance UIDs) and a file added, removed, truncated or re-encoded change it; a file rewritten with
      its SOPInstanceUID and size kept (pixels edited without a new UID, which DICOM forbids) does not. A file
      without a SOPInstanceUID counts by its whole content. Not the SeriesInstanceUID: new pixels are new
      instances anyway, and the ref (sent to Ray tasks) does not carry it.
    - NIfTI ``.nii.gz``: the file size and the gzip trailer (the CRC-32 of the whole uncompressed volume: 8
      bytes read at the end of a one-member gzip, as nibabel, dcm2niix and pigz write). ``.nii`` (or a
      ``.nii.gz`` that is no gzip): the SHA-256 of the whole file, one read of it (0.17 s for 84 MB).

    A file that cannot be read adds its error type (``load_series`` reports it; once readable, it differs).
    ``memo``: content digests remembered by the files' ``os.stat`` (the same value, without the read when the
    file is unchanged; ``ContentMemo``).
    """
    digest = hashlib.sha256(f"{ref.kind}\n".encode())
    content = memo.content_key if memo is not None else _content_key
    if ref.kind == "nifti":
        keys = [_nifti_key(ref.files[0], content)]
    else:
        n = len(ref.files)
        sops = ref.sop_uids if len(ref.sop_uids) == n else ("",) * n
        sizes = ref.file_sizes if len(ref.file_sizes) == n else (0,) * n
        keys = sorted(
            f"{sop} {size}" if sop and size else content(path)
            for path, sop, size in zip(ref.files, sops, sizes, strict=True)
        )
    digest.update("\n".join(keys).encode())
    return digest.hexdigest()


def _nifti_key(path: str, content: Callable[[str], str]) -> str:
    try:
        with open(path, "rb") as f:
            gzipped = f.read(len(GZIP_MAGIC)) == GZIP_MAGIC
            size = f.seek(0, os.SEEK_END)
            if gzipped and size >= GZIP_HEADER + GZIP_TRAILER:
                f.seek(-GZIP_TRAILER, os.SEEK_END)
                return f"gzip {size} {f.read(GZIP_TRAILER).hex()}"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__})"
    return content(path)


def _content_key(path: str) -> str:
    try:
        return f"sha256 {_read_digest(path)[0]}"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__})"


def _read_digest(path: str) -> tuple[str, os.stat_result, os.stat_result]:
    """The file's SHA-256 (hex, one read) and its stat before and after the read, of the file read (should the
    path be replaced meanwhile); OSError as the read raises it."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, before, os.fstat(f.fileno())


# a file changed less than this before its content was read is not remembered: a change right after the read,
# within the same tick of the filesystem's clock (coarse: ms; a file server's may be off ours), could leave its
# size, mtime and ctime as they were. Such a file is read again next time, nothing worse.
RACY_NS = 2 * 10**9


def stat_text(path: str, st: os.stat_result) -> str:
    """What ``ContentMemo`` keys a file's content digest by: its path, size, mtime, inode and ctime. A rewrite
    sets the mtime and the ctime (the kernel's, which ``os.utime`` cannot set back: a replacement given the
    old size and mtime, as by ``rsync -a`` or ``cp -p``, still differs), a file renamed over it is another
    inode. A ``chmod`` or a copy of the input elsewhere also changes it: one more read, never a stale digest."""
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"


@dataclass
class ContentMemo:
    """Content digests (``sha256`` hex of a whole file: ``source_digest`` of a ``.nii``, of a DICOM file without
    a SOPInstanceUID) remembered by ``key(stat_text(path, os.stat(path)))``, so that a re-run reads a file only
    when its stat changed (``molre preprocess`` keeps them in its output: ``preprocess.SOURCE_MEMO``).

    ``known``: the previous run's {key: hex digest}; ``used``: this run's, hits and new reads (what to keep for
    the next run: a file gone or changed drops out). A digest is remembered only when the file's stat was the
    same before and after the read and its ctime at least ``RACY_NS`` before the read began.
    ``key``: how a stat text is stored (``preprocess`` makes it a salted HMAC: paths may name patients)."""

    known: dict[str, str] = field(default_factory=dict)
    key: Callable[[str], str] = field(default=lambda text: text, repr=False)
    used: dict[str, str] = field(default_factory=dict)
    hits: int = 0  # digests taken from ``known``, the file unread
    reads: int = 0  # files read (not known, or changed)

    def content_key(self, path: str) -> str:
        """``_content_key(path)``, the same value, from ``known`` when the file's stat matches."""
        try:
            key = self.key(stat_text(path, os.stat(path)))
        except OSError as exc:
            return f"unreadable ({type(exc).__name__})"
        if key in self.known:
            self.hits += 1
            self.used[key] = self.known[key]
            return f"sha256 {self.known[key]}"
        self.reads += 1
        started = time.time_ns()
        try:
            digest, before, after = _read_digest(path)
        except OSError as exc:
            return f"unreadable ({type(exc).__name__})"
        text = stat_text(path, before)
        if text == stat_text(path, after) and before.st_ctime_ns < started - RACY_NS:
            self.used[self.key(text)] = digest
        return f"sha256 {digest}"


# ---------------------------------------------------------------------------------------------------- load


def largest_first(refs: Sequence[SeriesRef]) -> list[SeriesRef]:
    """A study's series in the order to try them: ORIGINAL series (ImageType) first, then those without an
    ImageType (NIfTI, exports that drop it), then DERIVED ones (reformats: a thin DERIVED\\PRIMARY MPR is a
    fallback, not preferred over the original acquisition for its slice count); within each, most slices first,
    ties by source."""
    return sorted(refs, key=lambda r: (_IMAGE_TYPE_RANK.get(r.image_type, 1), -len(r.files), r.source))


def load_series(ref: SeriesRef, *, min_slices: int = DEFAULT_MIN_SLICES) -> Volume:
    """Decode, validate and return one series as HU; any problem is a ``DataError`` naming ``ref.source``."""
    min_slices = max(2, int(min_slices))  # two positions are needed to know the slice step
    if ref.kind not in ("dicom", "nifti"):
        raise DataError(ref.source, f"unknown series kind {ref.kind!r}")
    try:
        # every header access under _quiet, not just the read: pydicom converts (and warns about) values lazily
        with _quiet():
            volume = _load_dicom(ref, min_slices) if ref.kind == "dicom" else _load_nifti(ref, min_slices)
    except DataError:
        raise
    except Exception as exc:
        # The checks above name what they find; anything else from the parsers on damaged bytes (found by the
        # fuzz tests in tests/reliability) ends here. Only the type is kept: the message could quote a header value.
        kind = "DICOM series" if ref.kind == "dicom" else "NIfTI file"
        raise DataError(ref.source, f"malformed {kind} ({type(exc).__name__})") from None
    _check_hu(volume.hu, ref.source)
    return volume


@contextmanager
def _quiet():
    """pydicom/nibabel warnings can quote header values: never let them reach a log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- DICOM


def _load_dicom(ref: SeriesRef, min_slices: int) -> Volume:
    names = file_names(ref.files)
    datasets = [_read_dataset(path, name, ref.source) for path, name in zip(ref.files, names, strict=True)]
    _check_modality(datasets, ref.source)
    _check_matrix(datasets, ref.source)
    _check_rescale(datasets, names, ref.source)
    if len(datasets) < min_slices:
        raise DataError(ref.source, f"too few slices: {len(datasets)} (minimum {min_slices})")
    row_dir, col_dir = _orientation(datasets, names, ref.source)
    _check_tilt_tag(datasets, ref.source)
    normal = np.cross(row_dir, col_dir)  # unit: row_dir and col_dir are orthonormal
    # point the normal superior, so ascending position along it = inferior -> superior
    normal = normal if normal[2] >= 0 else -normal
    _check_axial(normal, ref.source)
    positions = np.array([_position(ds, name, ref.source) for ds, name in zip(datasets, names, strict=True)])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    ordered = [datasets[i] for i in order]
    ordered_names = [names[i] for i in order]
    sops = [ref.sop_uids[i] for i in order] if len(ref.sop_uids) == len(names) else None
    dz = _slice_step(positions, normal, ordered_names, ref.source, sops)
    hu = np.stack([_slice_hu(ds, name, ref.source) for ds, name in zip(ordered, ordered_names, strict=True)])
    dy, dx = (float(v) for v in ordered[0].PixelSpacing)  # DICOM order: between rows, between columns
    return Volume(
        hu=hu,
        spacing=(dz, dy, dx),
        direction=np.stack([normal, col_dir, row_dir]),  # array axes z, y (rows), x (columns)
        origin=positions[0].astype(np.float64),
        study_keys=ref.study_keys,
        source=ref.source,
        patient_id=str(ordered[0].get("PatientID", "") or ""),
    )


def file_names(files: Sequence[str]) -> list[str]:
    """How messages name a series' files: relative to the folder holding them all (the base name when they lie
    in one folder; ``export1/IM-0006.dcm`` and ``resend/IM-0006.dcm`` when they are spread over sub-folders)."""
    base = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    return [os.path.relpath(f, base) if base else f for f in files]


def _read_dataset(path: str, name: str, source: str):
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # the header read in discover succeeded, so this is a damaged body
        raise DataError(source, f"{name}: unreadable DICOM file ({type(exc).__name__})") from None
    _check_elements(ds, name, source)
    if ds.get("PixelData") in (None, b""):
        raise DataError(source, f"{name}: no pixel data (truncated file or not an image)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(
            source, f"{name}: multi-frame (enhanced) DICOM is not supported; export single slices"
        )
    _check_image_kind(ds, name, source)
    for keyword in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"):
        if ds.get(keyword) in (None, ""):
            raise DataError(source, f"{name}: missing {keyword}")
    return ds


def _check_image_kind(ds, name: str, source: str) -> None:
    """Refuse a slice whose pixels may hold burned-in text or are not an original-type axial CT image: a
    BurnedInAnnotation of YES, a SOP class other than CT Image Storage (secondary capture: screen saves, dose
    reports, workstation exports), an ImageType with SECONDARY, SCREEN SAVE or LOCALIZER. Absent elements pass.
    Messages name only fixed words and standard SOP class names, never a header's own text."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise DataError(
            source,
            f"{name}: BurnedInAnnotation is YES (text such as patient details is drawn into the pixels)",
        )
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if not sop_class:  # Type 1 in the dataset; some writers only fill the file meta
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    if sop_class in ENHANCED_CT_STORAGE:
        raise DataError(
            source, f"{name}: multi-frame (enhanced) DICOM is not supported; export single slices"
        )
    if sop_class and sop_class != CT_IMAGE_STORAGE:
        raise DataError(
            source,
            f"{name}: SOPClassUID is {_sop_class_name(sop_class)}, not CT Image Storage (a secondary "
            "capture or other non-CT-image object)",
        )
    image_type = _image_type_values(ds)
    for word in REFUSED_IMAGE_TYPES:
        if word in image_type:
            raise DataError(
                source,
                f"{name}: ImageType {word} (a secondary, screen-save or localizer image, not an "
                "original axial CT slice)",
            )


def _sop_class_name(uid: str) -> str:
    """The standard name of a DICOM SOP class UID (pydicom's dictionary), else a placeholder: a private UID is
    not quoted (it is header text)."""
    name = UID(uid).name  # the UID itself when pydicom does not know it
    return name if uid.startswith("1.2.840.10008.") and name != uid else "a non-standard SOP class"


def _check_elements(ds, name: str, source: str) -> None:
    """Convert every element ``load_series`` reads, and parse the numeric ones, under one guard: a damaged value
    (unknown VR, a number that is not one, NaN) becomes a ``DataError`` naming the file and the element, never a
    raw pydicom/ValueError later (whose message would quote the value, and a value can be PHI)."""
    for keyword in (*_TEXT_ELEMENTS, *_NUMERIC_ELEMENTS, "PixelData"):
        try:
            value = ds.get(keyword)
            if keyword in _NUMERIC_ELEMENTS and value not in (None, ""):
                many = isinstance(value, MultiValue | list | tuple)
                numbers = [float(v) for v in (value if many else [value])]
                if not all(math.isfinite(n) for n in numbers):
                    raise ValueError("not finite")
                if many != (keyword in _MULTI_VALUED) or len(numbers) != _MULTI_VALUED.get(keyword, 1):
                    raise ValueError("wrong number of values")
            elif keyword in _TEXT_ELEMENTS and value is not None:
                str(value)
        except Exception:
            raise DataError(source, f"{name}: malformed {keyword} element") from None
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        if value not in (None, "") and not 1 <= float(value) <= MAX_MATRIX:
            raise DataError(source, f"{name}: implausible {keyword} {float(value):g} (1..{MAX_MATRIX})")
    try:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and not (isinstance(syntax, UID) and syntax.is_transfer_syntax):
            raise ValueError("not a transfer syntax")
    except Exception:
        raise DataError(
            source, f"{name}: malformed TransferSyntaxUID (not a known transfer syntax)"
        ) from None


def _check_rescale(datasets, names: list[str], source: str) -> None:
    """RescaleSlope / RescaleIntercept on every slice or on none: a slice without them, in a series whose other
    slices have them, would read with slope 1 / intercept 0 (1024 HU off for the usual -1024), unnoticed by the
    volume's HU check. A series without them at all is read with 1 / 0 and left to the HU check."""
    keywords = ("RescaleSlope", "RescaleIntercept")
    given = {kw: [ds.get(kw) not in (None, "") for ds in datasets] for kw in keywords}
    uneven = [kw for kw in keywords if any(given[kw]) and not all(given[kw])]
    if not uneven:
        return
    bad = [i for i in range(len(datasets)) if not all(given[kw][i] for kw in uneven)]
    lacking = " / ".join(kw for kw in uneven if not given[kw][bad[0]])
    more = f" (and {len(bad) - 1} more slices)" if len(bad) > 1 else ""
    raise DataError(
        source,
        f"{names[bad[0]]}: no {lacking} where other slices of the series have it (its HU would be wrong){more}",
    )


def _check_modality(datasets, source: str) -> None:
    found = sorted({str(ds.get("Modality", "") or "") for ds in datasets})
    if found != ["CT"]:
        shown = ", ".join(m if m.isalnum() and len(m) <= 4 else "?" for m in found) or "none"
        raise DataError(source, f"modality {shown} is not CT")


def _check_matrix(datasets, source: str) -> None:
    sizes = sorted({(int(ds.Rows), int(ds.Columns)) for ds in datasets})
    if len(sizes) > 1:
        raise DataError(source, "mixed matrix sizes: " + ", ".join(f"{r}x{c}" for r, c in sizes))
    spacings = sorted({tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in datasets})
    if len(spacings) > 1:
        raise DataError(source, "mixed pixel spacing: " + ", ".join(f"{a:g}x{b:g} mm" for a, b in spacings))
    samples = {int(ds.get("SamplesPerPixel", 1) or 1) for ds in datasets}
    if samples != {1}:
        raise DataError(source, "not a greyscale image (SamplesPerPixel != 1)")


def _orientation(datasets, names: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit row and column direction cosines, equal on every slice and orthogonal."""
    first = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    if first.shape != (6,):
        raise DataError(source, f"{names[0]}: ImageOrientationPatient needs 6 values")
    for ds, name in zip(datasets, names, strict=True):
        other = np.array([float(v) for v in ds.ImageOrientationPatient])
        if other.shape != (6,) or np.abs(other - first).max() > ORIENTATION_TOL:
            raise DataError(source, f"mixed orientations ({name} differs from {names[0]})")
    row_dir, col_dir = first[:3], first[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) < 0.5:
        raise DataError(source, "degenerate ImageOrientationPatient")
    row_dir, col_dir = row_dir / norms[0], col_dir / norms[1]
    if abs(float(row_dir @ col_dir)) > ORIENTATION_TOL:
        raise DataError(
            source, "sheared orientation: row and column directions are not orthogonal (gantry tilt?)"
        )
    return row_dir, col_dir


def _check_tilt_tag(datasets, source: str) -> None:
    tilts = [float(ds.get("GantryDetectorTilt", 0) or 0) for ds in datasets]
    worst = max(tilts, key=abs)
    if abs(worst) > TILT_MAX_DEG:
        raise DataError(
            source, f"gantry tilt of {worst:g} degrees (GantryDetectorTilt); resample it untilted first"
        )


def _check_axial(normal: np.ndarray, source: str) -> None:
    # angle between the slice normal and the head-foot axis: acos(|n . z|)
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > AXIAL_MAX_DEG:
        raise DataError(source, f"not axial: slice normal is {angle:.1f} degrees from the head-foot axis")


def _position(ds, name: str, source: str) -> np.ndarray:
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    if position.shape != (3,) or not np.isfinite(position).all():
        raise DataError(source, f"{name}: ImagePositionPatient needs 3 finite values")
    return position


def _slice_step(
    positions: np.ndarray, normal: np.ndarray, names: list[str], source: str, sops: list[str] | None = None
) -> float:
    """Mean spacing along the normal, after checking duplicates, shear, gaps and uniformity. ``sops``: the
    slices' SOPInstanceUIDs (in ``names`` order), to tell a re-sent instance with other pixels apart."""
    along = positions @ normal  # mm along the normal, ascending
    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < DUPLICATE_MM)
    if duplicate.size:
        i = int(duplicate[0])
        same = sops is not None and sops[i] != "" and sops[i] == sops[i + 1]
        what = " (one SOPInstanceUID, different pixel data: keep one copy)" if same else ""
        raise DataError(
            source,
            f"duplicate slice positions: {names[i]} and {names[i + 1]}{what} (and {duplicate.size - 1} more)",
        )
    # shear: in-plane drift of the last slice relative to the first, as an angle off the normal
    offset = positions[-1] - positions[0]
    drift = float(np.linalg.norm(offset - (offset @ normal) * normal))
    shear = math.degrees(math.atan2(drift, float(offset @ normal)))
    if shear > SHEAR_MAX_DEG:
        raise DataError(
            source, f"sheared slice positions: stacked {shear:.1f} degrees off the slice normal (gantry tilt)"
        )
    median = float(np.median(steps))
    tolerance = max(STEP_ABS_TOL_MM, STEP_REL_TOL * median)
    bad = np.flatnonzero(np.abs(steps - median) > tolerance)
    if bad.size:
        _raise_spacing_error(steps, bad, median, names, source)
    return float((along[-1] - along[0]) / (len(along) - 1))


def _raise_spacing_error(steps: np.ndarray, bad: np.ndarray, median: float, names: list[str], source: str):
    ratios = steps[bad] / median
    # every bad step a whole multiple (>= 2) of the usual one: slices are missing, not unevenly spaced
    if np.all((ratios > 1.5) & (np.abs(ratios - np.rint(ratios)) < 0.1)):
        i = int(bad[0])
        missing = int(np.rint(ratios).sum() - len(ratios))
        raise DataError(
            source,
            f"missing slice(s): {missing} missing, first gap of {steps[i]:.2f} mm after {names[i]} "
            f"where slices are {median:.2f} mm apart",
        )
    raise DataError(
        source, f"non-uniform slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm"
    )


def _slice_hu(ds, name: str, source: str) -> np.ndarray:
    _check_pixel_length(ds, name, source)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # any decoder plugin failure: missing codec, corrupt stream
        raise DataError(source, f"{name}: pixel data cannot be decoded ({_explain(exc, ds)})") from None
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise DataError(
            source, f"{name}: decoded pixels have shape {pixels.shape}, header says {ds.Rows}x{ds.Columns}"
        )
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)
    padding = _padding_mask(ds, pixels, name, source)
    if padding is not None:  # outside the reconstructed field of view: air, whatever the rescale made of it
        hu[padding] = PADDING_HU
    return hu


def _padding_mask(ds, pixels: np.ndarray, name: str, source: str) -> np.ndarray | None:
    """Stored values equal to PixelPaddingValue (0028,0120), or in the inclusive range between it and
    PixelPaddingRangeLimit (0028,0121) when that is given; None without padding (or for non-integer pixels)."""
    pad = ds.get("PixelPaddingValue")
    if pad in (None, "") or not np.issubdtype(pixels.dtype, np.integer):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    bounds = [_as_stored(v, pixels.dtype, keyword, name, source)
              for keyword, v in (("PixelPaddingValue", pad), ("PixelPaddingRangeLimit", limit))
              if v not in (None, "")]  # fmt: skip
    return (pixels >= min(bounds)) & (pixels <= max(bounds))


def _as_stored(value, dtype: np.dtype, keyword: str, name: str, source: str) -> int:
    """``value`` read with the bits of the pixels' integer ``dtype``: headers give a signed image's padding as
    unsigned (32768 = 0x8000 = -32768 in int16) or an unsigned image's as signed (-2000 = 63536 in uint16)."""
    bits = np.dtype(dtype).itemsize * 8
    number = int(value)
    if not -(2 ** (bits - 1)) <= number < 2**bits:  # neither a signed nor an unsigned value of that width
        raise DataError(source, f"{name}: {keyword} {number} does not fit {bits}-bit pixels")
    pattern = number % 2**bits  # the two's complement bits, 0 .. 2^bits - 1
    signed = np.issubdtype(dtype, np.signedinteger)
    return pattern - 2**bits if signed and pattern >= 2 ** (bits - 1) else pattern


def _check_pixel_length(ds, name: str, source: str) -> None:
    """Native (uncompressed) pixel data must hold rows*cols*bits/8 bytes; fewer means a truncated file."""
    if ds.file_meta.get("TransferSyntaxUID") is None or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("BitsAllocated", 16)) // 8
    got = len(ds.PixelData)
    if got < expected:
        raise DataError(source, f"{name}: truncated pixel data ({got} of {expected} bytes)")


def _explain(exc: Exception, ds) -> str:
    """Exception type and message (one line, at most 200 characters), any header text value of ``ds`` blanked."""
    text = " ".join(str(exc).split())[:200]
    try:
        for element in ds.iterall():
            value = str(element.value) if element.VR in _TEXT_VRS else ""
            if len(value) >= 3 and value in text:
                text = text.replace(value, "<redacted>")
    except Exception:  # a header element that cannot even be converted: show no text at all
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- NIfTI


def _nifti_image(path: Path):
    import nibabel as nib

    try:
        with _quiet():
            return nib.load(str(path))
    except Exception as exc:  # bad gzip, wrong magic, junk: nibabel raises several types
        raise DataError(str(path), f"unreadable NIfTI ({type(exc).__name__})") from None


def _load_nifti(ref: SeriesRef, min_slices: int) -> Volume:
    path = Path(ref.files[0])
    image = _nifti_image(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3:
        raise DataError(ref.source, f"2D image (shape {'x'.join(map(str, shape))}), expected a 3D volume")
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise DataError(
            ref.source, f"{len(shape)}D image (shape {'x'.join(map(str, shape))}), expected a 3D volume"
        )
    if max(shape[:2]) > MAX_MATRIX or shape[2] > MAX_SLICES:
        raise DataError(ref.source, f"implausible size {'x'.join(map(str, shape[:3]))} (damaged header?)")
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape[:3])  # applies scl_slope/inter
    except Exception as exc:  # truncated or corrupt compressed stream
        raise DataError(ref.source, f"unreadable NIfTI voxel data ({type(exc).__name__})") from None
    _check_finite(data, ref.source)
    if shape[2] < min_slices:
        raise DataError(ref.source, f"too few slices: {shape[2]} (minimum {min_slices})")
    hu, spacing, direction, origin = _nifti_geometry(data, image.affine, ref.source)
    return Volume(hu, spacing, direction, origin, ref.study_keys, ref.source, patient_id="")


def _check_finite(data: np.ndarray, source: str) -> None:
    nan = int(np.isnan(data).sum())
    if nan:
        raise DataError(source, f"{nan} NaN voxels")
    inf = int(np.isinf(data).sum())
    if inf:
        raise DataError(source, f"{inf} infinite voxels")


def _nifti_geometry(data: np.ndarray, affine: np.ndarray, source: str):
    """NIfTI ``data[i, j, k]`` + RAS affine -> ``hu[k, j, i]`` with LPS direction/origin, slice 0 inferior.

    The third voxel axis (k) must be the slice axis, as written by dcm2niix and molre's own writer.
    """
    columns = _LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3]  # LPS step per voxel along i, j, k
    origin = _LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    spacing_ijk = np.linalg.norm(columns, axis=0)
    if not np.isfinite(columns).all() or spacing_ijk.min() < 1e-6:
        raise DataError(source, "degenerate affine (zero or non-finite voxel size)")
    u_i, u_j, u_k = (columns[:, n] / spacing_ijk[n] for n in range(3))
    if abs(float(u_i @ u_j)) > ORIENTATION_TOL:
        raise DataError(source, "sheared affine: in-plane axes are not orthogonal (gantry tilt?)")
    normal = np.cross(u_i, u_j)
    normal = normal if normal[2] >= 0 else -normal
    _check_axial(normal, source)
    shear = math.degrees(math.acos(min(1.0, abs(float(u_k @ normal)))))
    if shear > SHEAR_MAX_DEG:
        raise DataError(
            source, f"sheared affine: slices stacked {shear:.1f} degrees off the slice normal (gantry tilt)"
        )
    hu = np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32)
    if u_k[2] < 0:  # slices run superior -> inferior: flip so slice 0 is inferior
        origin = origin + (hu.shape[0] - 1) * columns[:, 2]
        hu, u_k = np.ascontiguousarray(hu[::-1]), -u_k
    spacing = (float(spacing_ijk[2]), float(spacing_ijk[1]), float(spacing_ijk[0]))
    return hu, spacing, np.stack([u_k, u_j, u_i]), origin


# ---- HU


def _check_hu(hu: np.ndarray, source: str) -> None:
    low, high = float(hu.min()), float(hu.max())
    if low < HU_FLOOR or high > HU_CEIL:
        raise DataError(
            source,
            f"implausible HU range {low:.0f}..{high:.0f}: outside [{HU_FLOOR:.0f}, {HU_CEIL:.0f}] (wrong rescale?)",
        )
    if low > AIR_MAX_HU or high < BONE_MIN_HU:
        raise DataError(
            source,
            f"implausible HU range {low:.0f}..{high:.0f}: a head CT needs air (min <= {AIR_MAX_HU:.0f}) "
            f"and bone (max >= {BONE_MIN_HU:.0f}); missing or wrong RescaleSlope/Intercept?",
        )
