"""Write HU volumes as real CT DICOM series (pydicom) or NIfTI (nibabel).

Axis convention, shared by both writers and by the phantom generator:

- ``hu`` is ``[D, H, W]`` = ``[slice, row, column]``; slice 0 is the most inferior.
- In DICOM patient coordinates (LPS, mm): columns run along +x (towards the patient's left), rows along +y
  (towards posterior), slices along +z (towards superior). So ImageOrientationPatient is ``[1,0,0, 0,1,0]`` and
  slice ``k`` sits at ``origin_xyz + (0, 0, k * dz)``.
- NIfTI stores the same voxels as nibabel expects, array axes ``(i, j, k) = (column, row, slice)`` (``data[i, j, k]
  = hu[k, j, i]``), with a RAS+ affine: ``diag(-dx, -dy, dz)`` and the LPS origin negated in x and y. A DICOM series
  and a NIfTI file written from the same array and origin therefore put every voxel at the same world point.

Both writers are deliberately small and every DICOM field can be overridden (``extra`` for fixed tag values,
``per_slice_hook`` for per-file edits) so that ingest tests can build malformed inputs on top of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

# A hook sees each slice's dataset and its 0-based index just before writing; it edits the dataset in place
# (or returns a replacement), or returns False to skip writing that slice (e.g. to fake a missing slice).
SliceHook = Callable[[Dataset, int], "Dataset | bool | None"]

BRAIN_WINDOW = (40.0, 80.0)  # centre, width in HU
UINT16_MAX = 65535


def _stored_values(hu: np.ndarray, slope: float, intercept: float, pixel_representation: int | None):
    """HU -> stored integers: round((hu - intercept) / slope), as uint16 or int16 (auto: unsigned if it fits)."""
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    lo, hi = float(stored.min()), float(stored.max())
    if pixel_representation is None:
        pixel_representation = 0 if lo >= 0 and hi <= UINT16_MAX else 1
    dtype = np.uint16 if pixel_representation == 0 else np.int16
    info = np.iinfo(dtype)
    if lo < info.min or hi > info.max:
        raise ValueError(
            f"stored values {lo:.0f}..{hi:.0f} do not fit {dtype.__name__} (slope {slope}, intercept {intercept})"
        )
    return stored.astype(dtype), pixel_representation


def _uid(given: str | None, *entropy: str) -> str:
    """A given UID, else one derived from ``entropy`` (deterministic) or random when no entropy is given."""
    if given:
        return given
    return str(generate_uid(entropy_srcs=list(entropy) if entropy else None))


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def write_dicom_series(
    hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    out_dir: str | Path,
    *,
    patient_id: str,
    patient_name: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_date: str = "20240101",
    institution: str = "",
    accession: str = "",
    description: str = "",
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    pixel_representation: int | None = None,
    window: tuple[float, float] = BRAIN_WINDOW,
    extra: Mapping[str, Any] | None = None,
    per_slice_hook: SliceHook | None = None,
) -> list[Path]:
    """Write ``hu`` ``[D,H,W]`` (slice 0 inferior) as ``out_dir/IM-0001.dcm`` ... one axial slice per file.

    Stored pixels are ``round((hu - intercept) / slope)``; ``pixel_representation`` None picks unsigned when the
    stored values fit 0..65535, else signed. UIDs left as None are random, unless derived: SOP instance UIDs
    come from the series UID and the slice index, so a fixed series UID gives a byte-stable series.
    ``extra`` maps DICOM keywords to values set on every slice (a value of None deletes the element);
    ``per_slice_hook(ds, index)`` runs last. Returns the paths written, in slice order.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be [D,H,W], got shape {hu.shape}")
    dz, dy, dx = (float(s) for s in spacing_zyx)
    stored, pixel_representation = _stored_values(hu, slope, intercept, pixel_representation)
    study_uid = _uid(study_uid)
    series_uid = _uid(series_uid)
    frame_uid = _uid(None, series_uid, "frame")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    for k in range(hu.shape[0]):
        position = [float(origin_xyz[0]), float(origin_xyz[1]), float(origin_xyz[2]) + k * dz]
        ds = _slice_dataset(stored[k], k, position, (dz, dy, dx), pixel_representation)
        ds.file_meta = _file_meta(_uid(None, series_uid, str(k)))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.InstitutionName, ds.AccessionNumber = institution, accession
        ds.StudyDescription = ds.SeriesDescription = description
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.WindowCenter, ds.WindowWidth = window
        _apply_overrides(ds, extra)
        if per_slice_hook is not None:
            result = per_slice_hook(ds, k)
            if result is False:
                continue
            if isinstance(result, Dataset):
                ds = result
        path = out / f"IM-{k + 1:04d}.dcm"
        ds.preamble = ds.preamble if getattr(ds, "preamble", None) is not None else b"\0" * 128
        pydicom.dcmwrite(path, ds, enforce_file_format=False)
        paths.append(path)
    return paths


def _slice_dataset(
    pixels: np.ndarray,
    index: int,
    position: list[float],
    spacing_zyx: tuple[float, float, float],
    pixel_representation: int,
) -> Dataset:
    """The geometry and pixel module of one axial slice (identity and PHI fields are set by the caller)."""
    dz, dy, dx = spacing_zyx
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = 1, 1, index + 1
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = position
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = position[2]
    ds.PixelSpacing = [dy, dx]  # DICOM order: row spacing (between rows, mm), column spacing
    ds.SliceThickness = dz
    ds.SpacingBetweenSlices = dz
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def _apply_overrides(ds: Dataset, extra: Mapping[str, Any] | None) -> None:
    for keyword, value in (extra or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def nifti_affine(
    spacing_zyx: tuple[float, float, float], origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """RAS+ affine for array axes (column, row, slice): x and y flip sign from DICOM's LPS (see module doc)."""
    dz, dy, dx = (float(s) for s in spacing_zyx)
    affine = np.diag([-dx, -dy, dz, 1.0])
    affine[:3, 3] = [-float(origin_xyz[0]), -float(origin_xyz[1]), float(origin_xyz[2])]
    return affine


def write_nifti(
    hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    path: str | Path,
    *,
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Path:
    """Write ``hu`` ``[D,H,W]`` as int16 NIfTI (``.nii`` or ``.nii.gz``); ``data[i,j,k] = hu[k,j,i]``, RAS+ affine."""
    import nibabel as nib

    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be [D,H,W], got shape {hu.shape}")
    rounded = np.rint(hu)
    if rounded.min() < -32768 or rounded.max() > 32767:
        raise ValueError(f"HU range {rounded.min():.0f}..{rounded.max():.0f} does not fit int16")
    data = np.ascontiguousarray(rounded.astype(np.int16).transpose(2, 1, 0))
    affine = nifti_affine(spacing_zyx, origin_xyz)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)  # 1 = scanner coordinates
    image.header.set_sform(affine, code=1)
    image.header.set_data_dtype(np.int16)
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path
