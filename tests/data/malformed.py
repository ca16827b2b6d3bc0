"""A corpus of malformed head CT inputs (DICOM series, NIfTI files, label files), each with the reason it must be
rejected for. Reused by the ingest, preprocess and reliability tests.

- ``VOLUME_CASES``: ``case.write(folder)`` writes one bad item into the empty ``folder`` (named after the case)
  and returns the path its error must name (the series folder, the bad file, or the NIfTI file). A case may also
  hold good series (``case.good``): a junk file in an otherwise good series folder rejects the file only.
- ``LABEL_CASES``: ``case.write(folder)`` writes a label file of format ``case.fmt`` (and, for RSNA, the DICOM
  slices it refers to under ``folder/images``) and returns the label file's path.
- ``write_corpus(root)`` writes every volume case plus good series under ``root/series`` and a generic
  ``root/labels.csv`` that labels every study except ``study_without_labels``.
- ``READ_CASES`` (``CONFIG_CASES``, ``SHARD_CASES``, ``CHECKPOINT_CASES``, ``SWEEP_CASES``): ``case.write(folder)``
  builds one bad run config, shard/manifest, checkpoint or search-space file and returns ``(item, read)``: ``read()``
  must raise ``case.error`` with ``case.reason`` in its message, which also names ``item`` (a path, or the dotted
  key / override at fault).
  ``case.known_leak`` says where a case still escapes as a raw exception (code this package may not edit).

Every DICOM carries the planted PHI strings in ``PHI_STRINGS`` (patient name and id, institution, accession,
free text) and every label file the planted patient id: none of them may appear in any error message.
"""

from __future__ import annotations

import csv
import gzip
import json
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from molre.data.dicom_write import nifti_affine, write_dicom_series, write_nifti
from molre.errors import ConfigError, DataError, MolreError, WeightsError
from molre.findings import FINDING_IDS

PHI_NAME = "Plantedphi^Johanna"
PHI_ID = "PHI-MRN-4711"
PHI_INSTITUTION = "Planted PHI General Hospital"
PHI_ACCESSION = "PHIACC90210"
PHI_STRINGS = (PHI_NAME, "Plantedphi", "Johanna", PHI_ID, PHI_INSTITUTION, PHI_ACCESSION)
PHI_SHORT_MRN = "483920"  # label files only: an MRN short enough to pass for a bad 0/1 cell

SPACING = (4.0, 0.9, 0.9)  # dz, dy, dx mm
DEPTH = 10  # slices of a good series (ingest needs >= 8)


def phantom(depth: int = DEPTH, rows: int = 32, cols: int = 32) -> np.ndarray:
    """A tiny head in HU: air, a 1000 HU skull ring, 35 HU brain; the same on every slice."""
    y, x = np.mgrid[:rows, :cols]
    radius = np.hypot((y - rows / 2) / (rows * 0.4), (x - cols / 2) / (cols * 0.35))
    image = np.where(radius < 1.0, 1000.0, -1000.0)
    image[radius < 0.85] = 35.0
    return np.repeat(image[None], depth, axis=0).astype(np.float32)


def write_good_dicom(folder: Path, hu: np.ndarray | None = None, **kwargs) -> list[Path]:
    """A valid CT series with planted PHI in every header (pydicom's warnings about odd values silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _write_phi_series(folder, hu, **kwargs)


def _write_phi_series(folder: Path, hu: np.ndarray | None, **kwargs) -> list[Path]:
    return write_dicom_series(
        phantom() if hu is None else hu,
        kwargs.pop("spacing", SPACING),
        folder,
        patient_id=PHI_ID,
        patient_name=PHI_NAME,
        institution=PHI_INSTITUTION,
        accession=PHI_ACCESSION,
        description=f"free text about {PHI_NAME}",
        **kwargs,
    )


def write_float_nifti(data_dhw: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    """float32 NIfTI of a [D,H,W] array (data[i,j,k] = hu[k,j,i]) with molre's RAS affine unless given."""
    data = np.ascontiguousarray(np.asarray(data_dhw, np.float32).transpose(2, 1, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, nifti_affine(SPACING) if affine is None else affine), path)
    return path


def _junk(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------------- DICOM


def _hooked(hook) -> Callable[[Path], Path]:
    """A case writing a good series with ``per_slice_hook=hook``; the error names the series folder."""

    def write(folder: Path) -> Path:
        write_good_dicom(folder, per_slice_hook=hook)
        return folder

    return write


def _drop_slice(ds, k):
    return k != 5  # False skips writing: a hole in the middle of the stack


def _mixed_step(ds, k):
    # 4 mm steps for the first five slices, then 5 mm
    ds.ImagePositionPatient = [0.0, 0.0, 4.0 * min(k, 4) + 5.0 * max(0, k - 4)]


def _tilted_positions(ds, k):
    # a 15 degree gantry tilt that the scanner stored as sheared positions: x drifts tan(15) * 4 mm per slice
    ds.ImagePositionPatient = [k * 4.0 * 0.2679, 0.0, k * 4.0]


def _sagittal(ds, k):
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows along +y, columns along -z
    ds.ImagePositionPatient = [k * 4.0, 0.0, 0.0]


def _one_rotated(ds, k):
    if k == 5:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9950, 0.0998]


def _duplicate_position(ds, k):
    if k == 5:
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * 4]


def _other_pixel_spacing(ds, k):
    if k == 3:
        ds.PixelSpacing = [0.8, 0.8]


def _smaller_matrix(ds, k):
    if k == 3:
        ds.Rows = ds.Columns = 24
        ds.PixelData = np.zeros((24, 24), np.uint16).tobytes()


def _rle_garbage(ds, k):
    if k == 3:
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([_junk(300, 3)])
        ds["PixelData"].VR = "OB"


def _undecodable(folder: Path) -> Path:
    # also PHI in invalid values (a UID embedding the MRN, an age that is not an age): pydicom quotes such values
    # in warnings when it converts them, which the decode-error path does while redacting the exception text
    write_good_dicom(
        folder, per_slice_hook=_rle_garbage, series_uid=f"{PHI_ID}.5", extra={"PatientAge": PHI_ID}
    )
    return folder


def _no_pixels(ds, k):
    if k == 3:
        del ds.PixelData


def _no_position(ds, k):
    if k == 3:
        del ds.ImagePositionPatient


def _truncated_pixels(folder: Path) -> Path:
    paths = write_good_dicom(folder)
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[:-500])  # cut inside PixelData
    return folder


def _truncated_header(folder: Path) -> Path:
    path = write_good_dicom(folder, phantom(1))[0]
    path.write_bytes(path.read_bytes()[:600])  # preamble + file meta + a few elements, no series uid
    return path


def _zero_bytes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "IM-0001.dcm").write_bytes(b"")
    return folder / "IM-0001.dcm"


def _junk_dcm(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "IM-0001.dcm").write_bytes(_junk(4096, 1))
    return folder / "IM-0001.dcm"


def _junk_in_series(folder: Path) -> Path:
    write_good_dicom(folder)
    (folder / "IM-9999.dcm").write_bytes(b"%PDF-1.4 not an image " + _junk(2000, 2))
    return folder / "IM-9999.dcm"


def _plain(hu=None, **kwargs) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        write_good_dicom(folder, hu, **kwargs)
        return folder

    return write


# ---------------------------------------------------------------------------------------------------- NIfTI


def _nifti(write_into: Callable[[Path], None]) -> Callable[[Path], Path]:
    """A case writing ``folder/<folder name>.nii.gz``; the error names that file."""

    def write(folder: Path) -> Path:
        path = folder / f"{folder.name}.nii.gz"
        folder.mkdir(parents=True, exist_ok=True)
        write_into(path)
        return path

    return write


def _with_nan(path: Path) -> None:
    hu = phantom()
    hu[4, 10:12, 10:12] = np.nan
    write_float_nifti(hu, path)


def _with_inf(path: Path) -> None:
    hu = phantom()
    hu[2, 5, 5] = np.inf
    write_float_nifti(hu, path)


def _textured() -> np.ndarray:
    # noise keeps the gzip stream long, so damage lands in the voxel data and not only in the header
    return phantom() + np.random.default_rng(0).normal(0, 20, (DEPTH, 32, 32)).astype(np.float32)


def _corrupt_gzip(path: Path) -> None:
    write_nifti(_textured(), SPACING, path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = _junk(64, 4)
    path.write_bytes(bytes(data))


def _truncated_gzip(path: Path) -> None:
    write_nifti(_textured(), SPACING, path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])


def _junk_nifti(path: Path) -> None:
    path.write_bytes(gzip.compress(_junk(1000, 5)))


def _four_d(path: Path) -> None:
    data = np.stack([phantom().transpose(2, 1, 0)] * 2, axis=-1)  # (i, j, k, t=2)
    nib.save(nib.Nifti1Image(data, nifti_affine(SPACING)), path)


def _two_d(path: Path) -> None:
    nib.save(nib.Nifti1Image(phantom()[0].T.copy(), nifti_affine(SPACING)), path)


def _sheared_affine(path: Path) -> None:
    affine = nifti_affine(SPACING)
    affine[0, 2] = 4.0 * 0.2679  # k steps also move in x: a 15 degree tilt
    write_float_nifti(phantom(), path, affine)


def _patch_slice(index: int, old: bytes, new: bytes) -> Callable[[Path], Path]:
    """A good series whose slice ``index`` has the bytes ``old`` replaced by ``new`` (same length) on disk: for
    damage pydicom will not write (an unknown VR, an unknown transfer syntax)."""

    def write(folder: Path) -> Path:
        path = write_good_dicom(folder)[index]
        data = path.read_bytes()
        assert data.count(old) == 1 and len(old) == len(new), (old, new)
        path.write_bytes(data.replace(old, new))
        return folder

    return write


# (0028,1052) RescaleIntercept, explicit VR little endian: group, element, VR
_INTERCEPT_DS = struct.pack("<HH", 0x0028, 0x1052) + b"DS"
_EXPLICIT_LE = b"1.2.840.10008.1.2.1\0"  # transfer syntax UID, padded to even length


def _nan_position(ds, k):
    if k == 3:
        ds.ImagePositionPatient = ["nan", 0.0, 12.0]


def _huge_matrix(ds, k):
    if k == 3:
        ds.Rows = 60000  # a damaged header: decoding would allocate 60000 x 32 pixels, or worse


def _three_pixel_spacings(ds, k):
    if k == 3:
        ds.PixelSpacing = [0.9, 0.9, 0.9]


def _phi_in_number(ds, k):
    # a numeric element holding text (a VR of LO for RescaleIntercept): the parse error must not quote it
    if k == 3:
        ds.add_new(0x00281052, "LO", PHI_NAME)


def _sagittal_nifti(path: Path) -> None:
    affine = np.array([[0, 0, -4.0, 0], [0, -0.9, 0, 0], [0.9, 0, 0, 0], [0, 0, 0, 1]])  # slices along x
    write_float_nifti(phantom(), path, affine)


def _nifti_claims(slices: int) -> Callable[[Path], None]:
    """An uncompressed NIfTI whose header says ``slices`` slices where the file holds 10 (a cut-off copy, or a
    damaged header), gzipped."""

    def write(path: Path) -> None:
        plain = path.with_name(path.name.removesuffix(".gz"))
        write_float_nifti(phantom(), plain)
        header = bytearray(plain.read_bytes())
        struct.pack_into("<h", header, 40 + 2 * 3, slices)  # dim[3] of the NIfTI-1 header (dim[] at byte 40)
        path.write_bytes(gzip.compress(bytes(header)))
        plain.unlink()

    return write


def _nifti_no_air(path: Path) -> None:
    write_float_nifti(np.full((DEPTH, 32, 32), 20.0, np.float32), path)  # a water phantom, or a wrong rescale


# ---------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class VolumeCase:
    name: str
    reason: str  # substring of the expected DataError reason
    write: Callable[[Path], Path]  # writes into the given folder; returns the path the error names
    good: int = 0  # good series the case also holds


VOLUME_CASES: tuple[VolumeCase, ...] = (
    VolumeCase("truncated_pixel_data", "truncated pixel data", _truncated_pixels),
    VolumeCase("truncated_header", "without SeriesInstanceUID", _truncated_header),
    VolumeCase("wrong_modality", "modality MR is not CT", _plain(modality="MR")),
    VolumeCase("missing_slice", "missing slice", _hooked(_drop_slice)),
    VolumeCase("mixed_slice_spacing", "non-uniform slice spacing", _hooked(_mixed_step)),
    VolumeCase("mixed_pixel_spacing", "mixed pixel spacing", _hooked(_other_pixel_spacing)),
    VolumeCase("gantry_tilt_tag", "gantry tilt", _plain(extra={"GantryDetectorTilt": 15.0})),
    VolumeCase("gantry_tilt_sheared", "sheared slice positions", _hooked(_tilted_positions)),
    VolumeCase("non_axial", "not axial", _hooked(_sagittal)),
    VolumeCase("mixed_orientation", "mixed orientations", _hooked(_one_rotated)),
    VolumeCase("zero_bytes", "empty file", _zero_bytes),
    VolumeCase("junk_named_dcm", "not a DICOM file", _junk_dcm),
    VolumeCase("junk_in_series_folder", "not a DICOM file", _junk_in_series, good=1),
    VolumeCase("duplicate_positions", "duplicate slice positions", _hooked(_duplicate_position)),
    VolumeCase("mixed_matrix", "mixed matrix sizes", _hooked(_smaller_matrix)),
    VolumeCase("too_few_slices", "too few slices", _plain(phantom(4))),
    VolumeCase("all_air", "implausible HU", _plain(np.full((DEPTH, 32, 32), -1000.0))),
    VolumeCase("all_bone", "implausible HU", _plain(np.full((DEPTH, 32, 32), 3000.0))),
    VolumeCase("missing_rescale", "RescaleSlope/Intercept", _plain(extra={"RescaleIntercept": None})),
    VolumeCase("undecodable_compressed", "pixel data cannot be decoded", _undecodable),
    VolumeCase("missing_pixel_data", "no pixel data", _hooked(_no_pixels)),
    VolumeCase("missing_position", "missing ImagePositionPatient", _hooked(_no_position)),
    VolumeCase("nifti_nan", "NaN voxels", _nifti(_with_nan)),
    VolumeCase("nifti_inf", "infinite voxels", _nifti(_with_inf)),
    VolumeCase("nifti_corrupt_gzip", "unreadable NIfTI", _nifti(_corrupt_gzip)),
    VolumeCase("nifti_truncated_gzip", "unreadable NIfTI", _nifti(_truncated_gzip)),
    VolumeCase("nifti_junk", "unreadable NIfTI", _nifti(_junk_nifti)),
    VolumeCase("nifti_4d", "4D image", _nifti(_four_d)),
    VolumeCase("nifti_2d", "2D image", _nifti(_two_d)),
    VolumeCase("nifti_sheared_affine", "sheared affine", _nifti(_sheared_affine)),
    VolumeCase("study_without_labels", "no label row", _plain()),
    # found by the fuzz tests (tests/reliability/test_fuzz.py): damage that used to escape as a raw exception
    VolumeCase(
        "unknown_vr",
        "malformed RescaleIntercept element",
        _patch_slice(3, _INTERCEPT_DS, _INTERCEPT_DS[:4] + b"Dq"),
    ),
    VolumeCase(
        "unknown_transfer_syntax",
        "malformed TransferSyntaxUID",
        _patch_slice(3, _EXPLICIT_LE, b"1.2.840.99999.1.2.1\0"),
    ),
    VolumeCase("nan_position", "malformed ImagePositionPatient element", _hooked(_nan_position)),
    VolumeCase("implausible_matrix", "implausible Rows 60000", _hooked(_huge_matrix)),
    VolumeCase("three_pixel_spacings", "malformed PixelSpacing element", _hooked(_three_pixel_spacings)),
    VolumeCase("text_in_numeric_element", "malformed RescaleIntercept element", _hooked(_phi_in_number)),
    VolumeCase("nifti_sagittal", "not axial", _nifti(_sagittal_nifti)),
    VolumeCase("nifti_header_claims_more_slices", "unreadable NIfTI voxel data", _nifti(_nifti_claims(300))),
    VolumeCase("nifti_implausible_size", "implausible size 32x32x30000", _nifti(_nifti_claims(30000))),
    VolumeCase("nifti_no_air", "implausible HU", _nifti(_nifti_no_air)),
)
UNLABELLED = "study_without_labels"


# ---------------------------------------------------------------------------------------------------- labels


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


GENERIC_HEADER = ["study_id", "patient_id", *FINDING_IDS[:4]]


def _generic(rows: list[list], header: list[str] = GENERIC_HEADER) -> Callable[[Path], Path]:
    return lambda folder: _write_csv(folder / "labels.csv", header, rows)


def _not_utf8(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_bytes(b"study_id,patient_id\n\xff\xfe\x00bad,\x81\n")
    return folder / "labels.csv"


def _raw_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        return folder / name

    return write


def _no_file(name: str) -> Callable[[Path], Path]:
    return lambda folder: folder / name


def rsna_images(folder: Path, n_studies: int = 2) -> list[list[str]]:
    """Single-slice-per-file series like RSNA's (SOPInstanceUID ``ID_<hex>``); returns SOP ids per study."""
    sops = []
    for s in range(n_studies):
        ids = [f"ID_{s:02x}{k:07x}" for k in range(DEPTH)]

        def hook(ds, k, ids=ids):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ids[k]

        write_good_dicom(folder / "images" / f"study{s}", per_slice_hook=hook)
        sops.append(ids)
    return sops


def _rsna(bad_rows: Callable[[list[list[str]]], list[list[str]]], header=("ID", "Label")) -> Callable:
    """RSNA images + ``stage_2_train.csv``: all six subtypes for each slice, then ``bad_rows(sops)``."""

    def write(folder: Path) -> Path:
        sops = rsna_images(folder)
        rows = [[f"{sop}_{subtype}", 0] for ids in sops for sop in ids for subtype in RSNA_ORDER]
        return _write_csv(folder / "stage_2_train.csv", list(header), rows + bad_rows(sops))

    return write


RSNA_ORDER = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")

CQ500_CODES = [
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
]
CQ500_HEADER = ["name", "Category"] + [f"{r}:{code}" for r in ("R1", "R2", "R3") for code in CQ500_CODES]


def cq500_row(name: str, votes: dict[str, tuple[int, int, int]] | None = None) -> list:
    """One reads.csv row: every reader says 0 except ``votes[code] = (R1, R2, R3)``."""
    votes = votes or {}
    return [name, "B1"] + [votes.get(code, (0, 0, 0))[r] for r in range(3) for code in CQ500_CODES]


def _cq500(rows: list[list], header: list[str] = CQ500_HEADER) -> Callable[[Path], Path]:
    return lambda folder: _write_csv(folder / "reads.csv", header, rows)


@dataclass(frozen=True)
class LabelCase:
    name: str
    fmt: str  # generic | rsna | cq500
    reason: str  # substring of the expected problem (or raised DataError) reason
    write: Callable[[Path], Path]  # writes into the given folder; returns the label file
    line: int | None = None  # the line the problem must name, for row-level problems


_ZEROS = [0, 0, 0, 0]
LABEL_CASES: tuple[LabelCase, ...] = (
    LabelCase(
        "generic_unknown_column",
        "generic",
        "unknown finding column 'made_up_finding'",
        _generic([["s1", PHI_ID, 0, 1]], ["study_id", "patient_id", FINDING_IDS[0], "made_up_finding"]),
    ),
    LabelCase(
        "generic_conflicting_duplicate",
        "generic",
        "conflicting labels",
        _generic([["s1", PHI_ID, *_ZEROS], ["s2", PHI_ID, *_ZEROS], ["s1", PHI_ID, 1, 0, 0, 0]]),
        line=4,
    ),
    LabelCase("generic_value_2", "generic", "is not 0 or 1", _generic([["s1", PHI_ID, 0, 2, 0, 0]]), line=2),
    LabelCase(
        "generic_missing_study_id_column",
        "generic",
        "missing required column 'study_id'",
        _generic([["s1", PHI_ID, *_ZEROS]], ["name", "patient_id", *FINDING_IDS[:4]]),
    ),
    LabelCase(
        "generic_empty_study_id",
        "generic",
        "empty study_id",
        _generic([["s1", PHI_ID, *_ZEROS], ["", PHI_ID, *_ZEROS]]),
        line=3,
    ),
    LabelCase(
        "generic_ragged_row",
        "generic",
        "fields where the header has",
        _generic([["s1", PHI_ID, 0, 1]]),
        line=2,
    ),
    LabelCase("generic_not_utf8", "generic", "not UTF-8", _not_utf8),
    LabelCase(
        "rsna_malformed_id", "rsna", "malformed ID", _rsna(lambda sops: [["ID_nosubtype", 1]]), line=122
    ),
    LabelCase(
        "rsna_unknown_subtype",
        "rsna",
        "malformed ID",
        _rsna(lambda sops: [[f"{sops[0][0]}_tumour", 1]]),
        line=122,
    ),
    LabelCase(
        "rsna_bad_label",
        "rsna",
        "is not 0 or 1",
        _rsna(lambda sops: [[f"{sops[1][2]}_subdural", "yes"]]),
        line=122,
    ),
    LabelCase(
        "rsna_unknown_sop",
        "rsna",
        "not found in the DICOM headers",
        _rsna(lambda sops: [["ID_ffffffff_epidural", 1]]),
    ),
    LabelCase(
        "rsna_missing_label_column",
        "rsna",
        "missing required column 'Label'",
        _rsna(lambda sops: [], header=("ID", "Value")),
    ),
    LabelCase(
        "cq500_missing_reader_column",
        "cq500",
        "missing reader column R3:SDH",
        _cq500(
            [[c for c, h in zip(cq500_row("CQ500-CT-0"), CQ500_HEADER, strict=True) if h != "R3:SDH"]],
            [h for h in CQ500_HEADER if h != "R3:SDH"],
        ),
    ),
    LabelCase(
        "cq500_bad_value",
        "cq500",
        "is not 0 or 1",
        _cq500([cq500_row("CQ500-CT-0"), cq500_row("CQ500-CT-1", {"EDH": (1, "maybe", 0)})]),
        line=3,
    ),
    LabelCase(
        "cq500_conflicting_duplicate",
        "cq500",
        "conflicting labels",
        _cq500([cq500_row("CQ500-CT-0"), cq500_row("CQ500-CT-0", {"SAH": (1, 1, 0)})]),
        line=3,
    ),
    LabelCase("generic_empty_file", "generic", "label file is empty", _raw_file("labels.csv", b"")),
    LabelCase("generic_missing_file", "generic", "label file does not exist", _no_file("labels.csv")),
    LabelCase(
        "generic_phi_in_finding_column",  # a shifted column puts the patient's name where a 0/1 belongs
        "generic",
        "of 18 characters for",
        _generic([["s1", PHI_ID, 0, PHI_NAME, 0, 0]]),
        line=2,
    ),
    LabelCase(
        "generic_short_mrn_in_finding_column",  # patient_id and a finding swapped: a 6-digit MRN is no bad 0/1
        "generic",
        "value of 6 digits for",
        _generic([["s1", 0, PHI_SHORT_MRN, 0, 0, 0]]),
        line=2,
    ),
    LabelCase(  # the first row is a patient's, not a header: no cell of it is quoted
        "generic_without_header_row",
        "generic",
        "missing required column 'study_id': the first row has 6 cells, none a column molre knows",
        _generic(
            [[PHI_ACCESSION, PHI_SHORT_MRN, 1, 0, 0, 0]], [PHI_ACCESSION, PHI_ID, PHI_NAME, "0", "1", "x"]
        ),
    ),
    LabelCase(
        "generic_without_header_row_repeating_a_cell",
        "generic",
        "columns 4 and 5 of the header have the same name (is the header row missing?)",
        _generic([[PHI_ACCESSION, 0, 1, 0, 0, 0]], [PHI_ACCESSION, PHI_ID, PHI_NAME, "0", "0", "1"]),
    ),
    LabelCase(  # study ids are often accession numbers: the line names the row
        "generic_conflicting_rows_of_an_accession_number",
        "generic",
        "line 3: study id repeated with conflicting labels (first at line 2)",
        _generic([[PHI_ACCESSION, PHI_ID, *_ZEROS], [PHI_ACCESSION, PHI_ID, 1, 0, 0, 0]]),
        line=3,
    ),
    LabelCase(
        "rsna_binary_file",
        "rsna",
        "not UTF-8",
        _raw_file("stage_2_train.csv", b"PK\x03\x04" + bytes(range(256))),
    ),
    LabelCase(
        "cq500_given_a_generic_file",
        "cq500",
        "missing required column 'name'",
        _generic([["s1", PHI_ID, *_ZEROS]]),
    ),
)


# ---------------------------------------------------------------------------------------------------- corpus


GOOD_SERIES = ("good_dicom_a", "good_dicom_b", "good_nifti")


@dataclass(frozen=True)
class Corpus:
    input_dir: Path  # discover() this
    labels: Path  # generic labels for every study but UNLABELLED
    expected: dict[str, tuple[str, str]]  # case name -> (path the error names, reason substring)
    good: int  # series that must load
    studies: tuple[str, ...]  # every study key written to labels.csv


def write_corpus(root: Path) -> Corpus:
    series = root / "series"
    expected = {}
    good = 0
    for case in VOLUME_CASES:
        expected[case.name] = (str(case.write(series / case.name)), case.reason)
        good += case.good
    write_good_dicom(series / "good_dicom_a")
    # PHI in a field with an invalid value: pydicom would quote it in a warning when read carelessly
    write_good_dicom(series / "good_dicom_b", origin_xyz=(-12.0, 30.0, -80.0), extra={"PatientAge": PHI_ID})
    write_nifti(phantom(), SPACING, series / "good_nifti" / "good_nifti.nii.gz")
    good += len(GOOD_SERIES)
    studies = tuple(name for name in [*expected, *GOOD_SERIES] if name != UNLABELLED)
    rows = [[name, PHI_ID, *(int(i % 7 == 0) for i in range(4))] for name in studies]
    labels = _write_csv(root / "labels.csv", GENERIC_HEADER, rows)
    return Corpus(series, labels, expected, good, studies)


# ---------------------------------------------------------------------------------------------------- read cases
# Run configs, shards / manifests and checkpoints: not inputs of a preprocess batch but files a run reads. Each
# must fail with one of molre's own errors whose message names the item and says why.


@dataclass(frozen=True)
class ReadCase:
    name: str
    kind: str  # config | shard | checkpoint | search space
    error: type[MolreError]  # the error ``read()`` must raise
    reason: str  # substring of its message
    write: Callable[[Path], tuple[str, Callable[[], object]]]  # folder -> (item the message names, read)
    known_leak: str | None = None  # where the case still escapes as a raw exception, if it does


# ---- run configs (molre.config.load_config)


def _config_file(text: str | bytes) -> Callable[[Path], tuple[str, Callable[[], object]]]:
    def write(folder: Path):
        from molre.config import load_config

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path), lambda: load_config(path)

    return write


def _config_override(*overrides: str, item: str | None = None):
    def write(folder: Path):
        from molre.config import load_config

        return item or overrides[0], lambda: load_config(None, list(overrides))

    return write


def _config_missing(folder: Path):
    from molre.config import load_config

    return str(folder / "absent.yaml"), lambda: load_config(folder / "absent.yaml")


CONFIG_CASES: tuple[ReadCase, ...] = (
    ReadCase(
        "config_unknown_key", "config", ConfigError, "unknown key", _config_file("train:\n  epochs: 3\n")
    ),
    ReadCase(
        "config_wrong_type",
        "config",
        ConfigError,
        "train.max_epochs: Input should be a valid integer",
        _config_file("train:\n  max_epochs: many\n"),
    ),
    ReadCase(
        "config_out_of_range",
        "config",
        ConfigError,
        "adapter.molre.experts: Input should be greater than 0",
        _config_file("adapter:\n  molre:\n    experts: 0\n"),
    ),
    ReadCase(
        "config_top_k_exceeds_experts",
        "config",
        ConfigError,
        "top_k=4 exceeds experts=2",
        _config_file("adapter:\n  molre:\n    experts: 2\n    top_k: 4\n"),
    ),
    ReadCase("config_bad_yaml", "config", ConfigError, "is not valid YAML", _config_file("train: [1,\n")),
    ReadCase(
        "config_not_a_mapping",
        "config",
        ConfigError,
        "top level must be a mapping",
        _config_file("- 1\n- 2\n"),
    ),
    ReadCase(
        "config_section_is_a_value",
        "config",
        ConfigError,
        "train: Input should be a valid dictionary",
        _config_file("train: 5\n"),
    ),
    ReadCase("config_missing_file", "config", ConfigError, "does not exist", _config_missing),
    ReadCase(
        "config_not_utf8",
        "config",
        ConfigError,
        "UTF-8",
        _config_file(b"train:\n  seed: \xff\xfe\x00\n"),
    ),
    ReadCase(
        "override_without_value",
        "config",
        ConfigError,
        "is not of the form dotted.key=value",
        _config_override("train.max_epochs"),
    ),
    ReadCase(
        "override_unknown_key",
        "config",
        ConfigError,
        "unknown key",
        _config_override("nope.key=1", item="nope"),
    ),
    ReadCase(
        "override_wrong_type",
        "config",
        ConfigError,
        "Input should be a valid integer",
        _config_override("train.max_epochs=abc", item="train.max_epochs"),
    ),
    ReadCase(
        "override_below_a_value",
        "config",
        ConfigError,
        "Input should be a valid integer",
        _config_override("train.max_epochs.x=1", item="train.max_epochs"),
    ),
    ReadCase(
        "override_bad_yaml",
        "config",
        ConfigError,
        "train.max_epochs",
        _config_override("train.max_epochs=[1"),
    ),
)


# ---- shards and manifests (molre.data.shards, molre.data.dataset)


def _shard_rows(
    n: int = 2, shape: tuple[int, int, int] = (2, 4, 4), split: str = "train", first: int = 0
) -> list[dict]:
    """``n`` rows: studies ``s<first>``, ``s<first+1>`` ... of patients ``p<first>`` ... (one study each)."""
    from molre.data import shards

    rng = np.random.default_rng(first)
    return [
        shards.make_row(
            f"s{i:015d}",
            f"p{i:015d}",
            split,
            rng.integers(-1024, 2000, shape, dtype=np.int16),
            (8.0, 4.0, 4.0),
            np.zeros(len(FINDING_IDS)),
            np.ones(len(FINDING_IDS)),
        )  # fmt: skip
        for i in range(first, first + n)
    ]


def write_shard_dataset(root: str, splits: dict[str, int] | None = None, overlap: int = 0) -> list[str]:
    """A small valid dataset (one shard per split, ``splits[name]`` rows each; a split with 0 rows gets no shard)
    plus its manifest, at a local path or s3:// URI; returns the shard URIs. Splits hold distinct studies and
    patients, except that with ``overlap`` > 0 each split's first ``overlap`` studies belong to patients of the
    previous split (a patient leak)."""
    from molre.data import shards, storage

    rows_by_split, first = {}, 0
    for split, n in (splits or {"train": 2, "val": 1}).items():
        rows = _shard_rows(n, split=split, first=first) if n else []
        if first:
            for row in rows[:overlap]:
                row["patient_hash"] = f"p{int(row['patient_hash'][1:]) - overlap:015d}"
        rows_by_split[split] = rows
        first += n
    manifest = shards.write_dataset(root, rows_by_split, {"grid": [2, 4, 4]}, "fingerprint")
    uris = [storage.join(root, info.path) for info in manifest.shards]
    return uris


def _bad_table(edit: Callable) -> Callable[[Path], tuple[str, Callable[[], object]]]:
    """A shard whose Arrow table is ``edit(table)`` (valid Parquet, wrong content) read with ``read_shard``."""

    def write(folder: Path):
        import pyarrow.parquet as pq

        from molre.data import shards

        path = folder / "train" / "shard-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(edit(pa.Table.from_pylist(_shard_rows(), schema=shards.SCHEMA)), path)
        return str(path), lambda: shards.read_shard(str(path))

    return write


def _set(name: str, values: list, kind) -> Callable:
    return lambda t: t.set_column(t.schema.get_field_index(name), name, pa.array(values, kind))


def _bad_bytes(edit: Callable[[bytes], bytes], read: str = "read") -> Callable:
    """A listed shard whose file bytes are ``edit(good bytes)``; ``read``: read_shard | verify | columns."""

    def write(folder: Path):
        from molre.data import shards

        (uri, _) = write_shard_dataset(str(folder))
        Path(uri).write_bytes(edit(Path(uri).read_bytes()))
        calls = {
            "read": lambda: shards.read_shard(uri),
            "verify": lambda: shards.verify_shard(uri),
            "columns": lambda: shards.read_shard(uri, ["study_hash", "split"]),
        }
        return uri, calls[read]

    return write


def _flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :]


def _flip_in_volume_page(data: bytes) -> bytes:
    """One bit flipped in the last byte of the first volume page: zstd has no checksum of its own, so only the
    page CRC tells this from good data."""
    import io

    import pyarrow.parquet as pq

    chunk = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(3)  # column 3 = volume
    assert chunk.path_in_schema == "volume"
    at = chunk.data_page_offset + chunk.total_compressed_size - 1
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _bad_manifest(edit: Callable[[dict], object] | bytes | None) -> Callable:
    """A dataset whose manifest.json is ``edit(manifest dict)`` as JSON, raw bytes, or gone (None)."""

    def write(folder: Path):
        from molre.data import shards

        write_shard_dataset(str(folder))
        path = folder / shards.MANIFEST
        if edit is None:
            path.unlink()
        elif isinstance(edit, bytes):
            path.write_bytes(edit)
        else:
            path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        return str(path), lambda: shards.read_manifest(str(folder))

    return write


def _with(**changes) -> Callable[[dict], dict]:
    return lambda raw: raw | changes


def _escaping_shard(raw: dict) -> dict:
    raw["shards"][0]["path"] = "train/../../outside.parquet"
    return raw


def _unlisted_shard(folder: Path):
    from molre.data import shards

    write_shard_dataset(str(folder))
    uri = str(folder / "train" / "shard-extra.parquet")
    shards.write_shard(uri, _shard_rows(1))
    return uri, lambda: shards.verify_shard(uri)


def _empty_split(folder: Path):
    from molre.data import dataset

    write_shard_dataset(str(folder), {"train": 2, "val": 0})
    return str(folder / "val"), lambda: dataset.split_files(str(folder), "val")


def _missing_shard(folder: Path):
    from molre.data import dataset

    (uri, _) = write_shard_dataset(str(folder))
    Path(uri).unlink()
    return uri, lambda: dataset.split_files(str(folder), "train")


def _raw_volume(folder: Path):
    from molre.data import shards

    return "volume", lambda: shards.decode_volume(b"\0" * 30, (2, 4, 4))


SHARD_CASES: tuple[ReadCase, ...] = (
    ReadCase(
        "shard_column_of_wrong_type",
        "shard",
        DataError,
        "column 'volume' has type string",
        _bad_table(_set("volume", ["x", "y"], "string")),
    ),
    ReadCase(
        "shard_missing_column",
        "shard",
        DataError,
        "missing column 'known'",
        _bad_table(lambda t: t.drop_columns(["known"])),
    ),
    ReadCase(
        "shard_phi_column",  # a column that is not in the schema (here: what must never be stored) is refused
        "shard",
        DataError,
        "unexpected column 'patient_name'",
        _bad_table(lambda t: t.append_column("patient_name", pa.array([PHI_NAME] * 2))),
    ),
    ReadCase(
        "shard_short_label_list",
        "shard",
        DataError,
        "column 'labels' must hold 75 values",
        _bad_table(_set("labels", [[0, 1], [1, 0]], pa.list_(pa.uint8()))),
    ),
    ReadCase(
        "shard_volume_shorter_than_shape",
        "shard",
        DataError,
        "does not hold int16 [D,H,W] of its 'shape'",
        _bad_table(_set("volume", [b"\0" * 64, b"\0" * 62], "binary")),
    ),
    ReadCase(
        "shard_negative_shape",
        "shard",
        DataError,
        "non-positive size",
        _bad_table(_set("shape", [[2, 4, 4], [-2, -4, 4]], pa.list_(pa.int32()))),
    ),
    ReadCase(
        "shard_future_schema_version",
        "shard",
        DataError,
        "column 'schema_version' holds [1, 2]",
        _bad_table(_set("schema_version", [1, 2], "int16")),
    ),
    ReadCase(
        "shard_null_values",
        "shard",
        DataError,
        "column 'split' has null values",
        _bad_table(_set("split", ["train", None], "string")),
    ),
    ReadCase(
        "shard_truncated",
        "shard",
        DataError,
        "not a readable Parquet shard",
        _bad_bytes(lambda d: d[: len(d) // 2]),
    ),
    ReadCase(
        "shard_truncated_footer_only_read",  # the column-subset path (footer + chunks through fsspec)
        "shard",
        DataError,
        "not a readable Parquet shard",
        _bad_bytes(lambda d: d[: len(d) - 9], read="columns"),
    ),
    ReadCase(
        "shard_zero_bytes", "shard", DataError, "not a readable Parquet shard", _bad_bytes(lambda d: b"")
    ),
    ReadCase(
        "shard_not_parquet",
        "shard",
        DataError,
        "not a readable Parquet shard",
        _bad_bytes(lambda d: b"%PDF-1.4" * 64),
    ),
    ReadCase(
        "shard_corrupt_page",  # one bit flipped inside a compressed page: the reader must not hand back garbage
        "shard",
        DataError,
        "CRC",
        _bad_bytes(_flip_in_volume_page),
    ),
    ReadCase(
        "shard_checksum_mismatch",
        "shard",
        DataError,
        "sha256 mismatch",
        _bad_bytes(_flip_middle, read="verify"),
    ),
    ReadCase("shard_not_in_manifest", "shard", DataError, "not listed in the manifest", _unlisted_shard),
    ReadCase("split_empty", "shard", DataError, "split 'val' is empty", _empty_split),
    ReadCase(
        "shard_listed_but_missing", "shard", DataError, "listed in the manifest is missing", _missing_shard
    ),
    ReadCase("volume_bytes_do_not_fit_shape", "shard", DataError, "do not hold an int16 volume", _raw_volume),
    ReadCase("manifest_missing", "shard", DataError, "no manifest", _bad_manifest(None)),
    ReadCase(
        "manifest_corrupt_json", "shard", DataError, "not a valid molre manifest", _bad_manifest(b"{not json")
    ),
    ReadCase("manifest_not_utf8", "shard", DataError, "not UTF-8", _bad_manifest(b"\xff\xfe{}")),
    ReadCase(
        "manifest_not_an_object",
        "shard",
        DataError,
        "not a valid molre manifest",
        _bad_manifest(lambda raw: [raw]),
    ),
    ReadCase(
        "manifest_wrong_schema_version",
        "shard",
        DataError,
        "schema_version 99 is not supported",
        _bad_manifest(_with(schema_version=99)),
    ),
    ReadCase(
        "manifest_schema_version_not_a_number",
        "shard",
        DataError,
        "'schema_version' must be an integer",
        _bad_manifest(_with(schema_version="1")),
    ),
    ReadCase(
        "manifest_other_taxonomy",
        "shard",
        DataError,
        "finding ids differ",
        _bad_manifest(_with(finding_ids=list(reversed(FINDING_IDS)))),
    ),
    ReadCase(
        "manifest_finding_ids_not_a_list",
        "shard",
        DataError,
        "'finding_ids' must be a list",
        _bad_manifest(_with(finding_ids=75)),
    ),
    ReadCase(
        "manifest_shard_path_escapes_root",
        "shard",
        DataError,
        "inside the root",
        _bad_manifest(_escaping_shard),
    ),
)


# ---- checkpoints (molre.train.checkpoint)


def _checkpoint_dir(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _safetensors_bytes(shapes: dict[str, tuple[int, ...]]) -> bytes:
    import torch
    from safetensors.torch import save

    return save({name: torch.zeros(shape) for name, shape in shapes.items()})


def _checkpoint(files: Callable[[], dict[str, bytes]], call: str, item: str = "") -> Callable:
    def write(folder: Path):
        from molre.train import checkpoint

        directory = _checkpoint_dir(folder / "ckpt", files())
        calls = {
            "config": lambda: checkpoint.read_config(directory),
            "weights": lambda: checkpoint.read_weights(directory),
            "state": lambda: checkpoint.read_state(directory),
        }
        return str(directory / item) if item else str(directory), calls[call]

    return write


def _misfit(shapes: dict[str, tuple[int, ...]]) -> Callable:
    """Weights saved for one model loaded into another (``nn.Linear(4, 3)``: weight [3, 4], bias [3])."""

    def write(folder: Path):
        import torch

        from molre.train import checkpoint

        directory = _checkpoint_dir(folder / "ckpt", {"best.safetensors": _safetensors_bytes(shapes)})
        state = checkpoint.read_weights(directory)
        return str(directory), lambda: checkpoint.load_trained_state(
            torch.nn.Linear(4, 3), state, str(directory)
        )

    return write


CHECKPOINT_CASES: tuple[ReadCase, ...] = (
    ReadCase(
        "checkpoint_without_config", "checkpoint", WeightsError, "no config.yaml", _checkpoint(dict, "config")
    ),
    ReadCase(
        "checkpoint_config_unknown_key",
        "checkpoint",
        ConfigError,
        "backbone.nope: unknown key",
        _checkpoint(lambda: {"config.yaml": b"backbone:\n  nope: 1\n"}, "config", "config.yaml"),
    ),
    ReadCase(
        "checkpoint_config_not_a_mapping",
        "checkpoint",
        ConfigError,
        "top level must be a mapping",
        _checkpoint(lambda: {"config.yaml": b"- a\n"}, "config", "config.yaml"),
    ),
    ReadCase(
        "checkpoint_config_bad_yaml",
        "checkpoint",
        MolreError,
        "config.yaml",
        _checkpoint(lambda: {"config.yaml": b"backbone: [unclosed\n"}, "config", "config.yaml"),
    ),
    ReadCase(
        "checkpoint_without_weights",
        "checkpoint",
        WeightsError,
        "no best.safetensors",
        _checkpoint(dict, "weights"),
    ),
    ReadCase(
        "checkpoint_corrupt_safetensors",
        "checkpoint",
        WeightsError,
        "best.safetensors",
        _checkpoint(lambda: {"best.safetensors": b"garbage" * 10}, "weights", "best.safetensors"),
    ),
    ReadCase(
        "checkpoint_truncated_safetensors",
        "checkpoint",
        WeightsError,
        "best.safetensors",
        _checkpoint(
            lambda: {"best.safetensors": _safetensors_bytes({"w": (8, 8)})[:-16]},
            "weights",
            "best.safetensors",
        ),
    ),
    ReadCase(
        "checkpoint_weights_of_another_shape",
        "checkpoint",
        WeightsError,
        "mis-shaped ['weight (2, 4) vs (3, 4)']",
        _misfit({"weight": (2, 4), "bias": (3,)}),
    ),
    ReadCase(
        "checkpoint_weights_missing_a_tensor",
        "checkpoint",
        WeightsError,
        "missing ['bias']",
        _misfit({"weight": (3, 4)}),
    ),
    ReadCase(
        "checkpoint_weights_of_another_model",
        "checkpoint",
        WeightsError,
        "unexpected ['router.w1']",
        _misfit({"weight": (3, 4), "bias": (3,), "router.w1": (4, 4)}),
    ),
    ReadCase(
        "checkpoint_state_corrupt",
        "checkpoint",
        MolreError,
        "state.json",
        _checkpoint(lambda: {"state.json": b'{"epoch": 3, '}, "state", "state.json"),
    ),
)


# ---- search-space files (molre.tune.space.load_sweep)


def _space_file(
    text: str, overrides: tuple[str, ...] = ()
) -> Callable[[Path], tuple[str, Callable[[], object]]]:
    def write(folder: Path):
        from molre.tune.space import load_sweep

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "space.yaml"
        path.write_text(text)
        return str(path), lambda: load_sweep(path, list(overrides))

    return write


def _space(dimensions: str, search: str = "") -> str:
    """A search-space file named ``t`` whose ``space:`` holds ``dimensions`` (one ``key: {...}`` per line)."""
    lines = "".join(f"  {line}\n" for line in dimensions.splitlines())
    return f"name: t\nspace:\n{lines}" + (f"search: {search}\n" if search else "")


def _sweep(name: str, reason: str, text: str, overrides: tuple[str, ...] = ()) -> ReadCase:
    return ReadCase(name, "search space", ConfigError, reason, _space_file(text, overrides))


SWEEP_CASES: tuple[ReadCase, ...] = (
    _sweep("sweep_unknown_key", "spaces: unknown key", "name: t\nspaces: {}\n"),
    _sweep("sweep_missing_name", "name: Field required", "space: {loss.gamma: {float: [0, 1]}}\n"),
    _sweep("sweep_name_not_a_path_component", "name: String should match pattern", "name: ../escape\n"),
    _sweep(
        "sweep_wrong_type",
        "search.num_samples: Input should be a valid integer",
        "name: t\nsearch: {num_samples: many}\n",
    ),
    _sweep(
        "sweep_dimension_not_a_mapping",
        "space.adapter.kind: Input should be a valid dictionary",
        "name: t\nspace:\n  adapter.kind: [none]\n",
    ),
    _sweep("sweep_empty_choice", "empty choice", "name: t\nspace:\n  loss.gamma: {choice: []}\n"),
    _sweep(
        "sweep_unknown_distribution",
        "space.loss.gamma.normal: unknown key",
        "name: t\nspace:\n  loss.gamma: {normal: [0, 1]}\n",
    ),
    _sweep(
        "sweep_two_distributions",
        "give exactly one of",
        "name: t\nspace:\n  loss.gamma: {float: [0, 1], choice: [1]}\n",
    ),
    _sweep(
        "sweep_low_above_high",
        "low 3.0 > high 1.0",
        "name: t\nspace:\n  loss.gamma: {float: [3.0, 1.0]}\n",
    ),
    _sweep(
        "sweep_infinite_bounds",
        "bounds must be finite numbers",
        "name: t\nspace:\n  loss.gamma: {float: [-.inf, .inf]}\n",
    ),
    _sweep(
        "sweep_logfloat_from_zero",
        "logfloat needs a positive low",
        "name: t\nspace:\n  optim.lr_adapter: {logfloat: [0.0, 1.0e-3]}\n",
    ),
    _sweep(
        "sweep_three_bounds",
        "Tuple should have at most 2 items",
        "name: t\nspace:\n  adapter.molre.rank: {int: [4, 8, 16]}\n",
    ),
    _sweep(
        "sweep_key_not_in_run_config",
        "space key 'adapter.molre.expert' is not a run-config key",
        "name: t\nspace:\n  adapter.molre.expert: {choice: [2]}\n",
    ),
    _sweep(
        "sweep_point_out_of_range",
        "adapter.molre.experts: Input should be greater than 0",
        "name: t\nspace:\n  adapter.molre.experts: {choice: [0, 2]}\n",
    ),
    _sweep(
        "sweep_unknown_base_key",
        "train.batchsize: unknown key",
        "name: t\nbase: {train: {batchsize: 2}}\n",
    ),
    _sweep("sweep_override_of_unknown_key", "train.epochs: unknown key", "name: t\n", ("train.epochs=3",)),
    _sweep(
        "sweep_condition_on_undefined_key",
        "condition on 'adapter.kind', which the space does not define",
        "name: t\nspace:\n  adapter.molre.experts: {choice: [2], when: {adapter.kind: molre}}\n",
    ),
    _sweep(
        "sweep_bad_mode",
        "Input should be 'max' or 'min' (got 'up')",
        "name: t\nsearch: {objectives: [[val/best_mean_auc, up]]}\n",
    ),
    _sweep(
        "sweep_metric_not_a_name",
        "search.objectives.0.0: Input should be a valid string",
        "name: t\nsearch: {objectives: [[[val, auc], max]]}\n",
    ),
    _sweep(
        "sweep_no_objective",
        "search.objectives: List should have at least 1",
        "name: t\nsearch: {objectives: []}\n",
    ),
    _sweep("sweep_no_seeds", "search.seeds: List should have at least 1", "name: t\nsearch: {seeds: []}\n"),
    _sweep(
        "sweep_misspelt_objective",
        "'val/best_mean_acu' is not a metric trials report; did you mean val/best_mean_auc",
        "name: t\nsearch: {objectives: [[val/best_mean_acu, max]]}\n",
    ),
    _sweep(
        "sweep_grid_over_floats",
        "loss.gamma: a grid needs choice or int",
        "name: t\nspace:\n  loss.gamma: {float: [0, 1]}\nsearch: {algorithm: grid}\n",
    ),
    _sweep(
        "sweep_grid_too_large",
        "has more than 10000 grid values",
        "name: t\nspace:\n  adapter.molre.rank: {int: [1, 1000000000]}\nsearch: {algorithm: grid}\n",
    ),
    _sweep(
        "sweep_unknown_algorithm",
        "search.algorithm: Input should be 'optuna'",
        "name: t\nsearch: {algorithm: random}\n",
    ),
    _sweep("sweep_bad_yaml", "is not valid YAML", "name: t\nspace: {loss.gamma: {float: [0, 1]\n"),
    _sweep(
        "sweep_nested_too_deeply",
        "nested too deeply",
        "name: t\nbase: " + "[" * 5000 + "\n",
    ),
    _sweep("sweep_not_a_mapping", "top level must be a mapping", "- name: t\n"),
)

READ_CASES: tuple[ReadCase, ...] = CONFIG_CASES + SHARD_CASES + CHECKPOINT_CASES + SWEEP_CASES
