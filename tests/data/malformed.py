"""A corpus of malformed head CT inputs (DICOM series, NIfTI files, label files), each with the reason it must be
rejected for. Reused by the ingest, preprocess and reliability tests.

- ``VOLUME_CASES``: ``case.write(folder)`` writes one bad item into the empty ``folder`` (named after the case)
  and returns the path its error must name (the series folder, the bad file, or the NIfTI file). A case may also
  hold good series (``case.good``): a junk file in an otherwise good series folder rejects the file only.
- ``LABEL_CASES``: ``case.write(folder)`` writes a label file of format ``case.fmt`` (and, for RSNA, the DICOM
  slices it refers to under ``folder/images``) and returns the label file's path.
- ``write_corpus(root)`` writes every volume case plus good series under ``root/series`` and a generic
  ``root/labels.csv`` that labels every study except ``study_without_labels``.

Every DICOM carries the planted PHI strings in ``PHI_STRINGS`` (patient name and id, institution, accession,
free text) and every label file the planted patient id: none of them may appear in any error message.
"""

from __future__ import annotations

import csv
import gzip
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from molre.data.dicom_write import nifti_affine, write_dicom_series, write_nifti
from molre.findings import FINDING_IDS

PHI_NAME = "Plantedphi^Johanna"
PHI_ID = "PHI-MRN-4711"
PHI_INSTITUTION = "Planted PHI General Hospital"
PHI_ACCESSION = "PHIACC90210"
PHI_STRINGS = (PHI_NAME, "Plantedphi", "Johanna", PHI_ID, PHI_INSTITUTION, PHI_ACCESSION)

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
