"""The DICOM and NIfTI writers: files read back with pydicom / nibabel give the same HU and geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from molre.data.dicom_write import nifti_affine, write_dicom_series, write_nifti

SPACING = (4.0, 0.9, 0.8)  # dz, dy, dx in mm


@pytest.fixture
def hu() -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = rng.integers(-1024, 3071, size=(5, 12, 10)).astype(np.float32)
    vol[0, 0, 0], vol[1, 0, 0] = -1024.4, 40.6  # rounding: stored values are integers
    return vol


def _read_series(paths):
    return [pydicom.dcmread(p) for p in paths]


def test_dicom_series_round_trip(tmp_path, hu):
    paths = write_dicom_series(
        hu,
        SPACING,
        tmp_path / "s",
        patient_id="PID-1",
        patient_name="DOE^JANE",
        study_date="20230102",
        institution="TEST HOSPITAL",
        accession="ACC9",
        description="HEAD",
        origin_xyz=(-10.0, -20.0, 5.0),
    )
    assert [p.name for p in paths] == [f"IM-000{i}.dcm" for i in range(1, 6)]
    slices = _read_series(paths)
    first = slices[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == CTImageStorage == first.file_meta.MediaStorageSOPClassUID
    assert first.Modality == "CT"
    assert (first.PatientID, str(first.PatientName)) == ("PID-1", "DOE^JANE")
    assert (first.StudyDate, first.InstitutionName, first.AccessionNumber) == (
        "20230102",
        "TEST HOSPITAL",
        "ACC9",
    )
    assert first.StudyDescription == "HEAD"
    assert (first.Rows, first.Columns, first.BitsAllocated) == (12, 10, 16)
    assert [float(v) for v in first.PixelSpacing] == [0.9, 0.8]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 4.0
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]

    z = [float(s.ImagePositionPatient[2]) for s in slices]
    assert z == [5.0 + 4.0 * k for k in range(5)]
    assert [s.InstanceNumber for s in slices] == [1, 2, 3, 4, 5]
    assert all([float(v) for v in s.ImagePositionPatient[:2]] == [-10.0, -20.0] for s in slices)
    assert len({s.StudyInstanceUID for s in slices}) == len({s.SeriesInstanceUID for s in slices}) == 1
    sop = [s.SOPInstanceUID for s in slices]
    assert len(set(sop)) == 5
    assert all(s.SOPInstanceUID == s.file_meta.MediaStorageSOPInstanceUID for s in slices)

    back = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices])
    np.testing.assert_array_equal(back, np.rint(hu))


def test_dicom_slope_and_signed_storage(tmp_path, hu):
    paths = write_dicom_series(hu, SPACING, tmp_path, patient_id="P", slope=2.0, intercept=0.0)
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == 1  # negative stored values -> signed
    back = ds.pixel_array * 2.0
    np.testing.assert_allclose(back, hu[0], atol=1.0)


def test_dicom_fixed_uids_are_byte_stable(tmp_path, hu):
    kwargs = dict(patient_id="P", study_uid="1.2.3", series_uid="1.2.3.4")
    a = write_dicom_series(hu, SPACING, tmp_path / "a", **kwargs)
    b = write_dicom_series(hu, SPACING, tmp_path / "b", **kwargs)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_dicom_overrides_and_hook(tmp_path, hu):
    def hook(ds, index):
        if index == 2:
            return False  # a missing slice
        ds.ImagePositionPatient = [0.0, 0.0, index * 5.0]
        return None

    paths = write_dicom_series(
        hu, SPACING, tmp_path, patient_id="P", extra={"Modality": "MR", "KVP": None}, per_slice_hook=hook
    )
    assert [p.name for p in paths] == ["IM-0001.dcm", "IM-0002.dcm", "IM-0004.dcm", "IM-0005.dcm"]
    ds = pydicom.dcmread(paths[-1])
    assert ds.Modality == "MR" and "KVP" not in ds
    assert float(ds.ImagePositionPatient[2]) == 20.0


def test_dicom_rejects_values_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        write_dicom_series(np.full((1, 2, 2), 70000.0), SPACING, tmp_path, patient_id="P")


def test_nifti_round_trip(tmp_path, hu):
    path = write_nifti(hu, SPACING, tmp_path / "v.nii.gz", origin_xyz=(-10.0, -20.0, 5.0))
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.int16 and data.shape == (10, 12, 5)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), np.rint(hu))
    np.testing.assert_allclose(image.affine, nifti_affine(SPACING, (-10.0, -20.0, 5.0)))
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    np.testing.assert_allclose(image.header.get_zooms(), (0.8, 0.9, 4.0))
    # voxel (column 1, row 2, slice 3) -> RAS world = (-(x_lps), -(y_lps), z)
    world = image.affine @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(world[:3], [-(-10.0 + 0.8), -(-20.0 + 1.8), 5.0 + 12.0])
