"""Ingest of good DICOM / NIfTI series: grouping, ordering, geometry, HU, study keys, de-identification."""

from __future__ import annotations

import logging
import math
import warnings

import nibabel as nib
import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from molre.data.dicom_write import nifti_affine, write_dicom_series, write_nifti
from molre.data.ingest import DEFAULT_MIN_SLICES, discover, load_series
from molre.errors import DataError
from tests.data.malformed import PHI_ID, PHI_NAME, SPACING, phantom, write_float_nifti, write_good_dicom


def _marked(depth: int = 10) -> np.ndarray:
    """The phantom with one distinct value per slice and a corner marker, so order and flips show."""
    hu = phantom(depth)
    hu[:, 0, 0] = -1000 + 10 * np.arange(depth)  # slice k's corner says k
    hu[:, 1, 3] = 500  # row 1, column 3: tells rows from columns
    return hu


def _only(refs):
    assert len(refs) == 1, refs
    return refs[0]


def test_dicom_series_loads_as_hu_with_geometry(tmp_path):
    hu = _marked()
    write_good_dicom(tmp_path / "study_1", hu, origin_xyz=(-10.0, 20.0, -50.0))
    refs, rejects = discover(tmp_path)
    assert rejects == []
    ref = _only(refs)
    volume = load_series(ref)
    assert volume.hu.dtype == np.float32 and volume.shape == (10, 32, 32)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])  # z, y, x in LPS
    np.testing.assert_allclose(volume.origin, [-10, 20, -50])
    assert volume.patient_id == PHI_ID
    assert volume.study_keys[0] == "study_1" and volume.study_keys[1] == ref.study_uid
    assert volume.source == str(tmp_path / "study_1")


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path):
    hu = _marked()

    def reverse(ds, k):  # file k holds the slice at the k-th highest position
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * (9 - k)]

    write_good_dicom(tmp_path / "s", hu[::-1], per_slice_hook=reverse)
    volume = load_series(_only(discover(tmp_path)[0]))
    np.testing.assert_array_equal(volume.hu, hu)  # inferior -> superior again
    np.testing.assert_allclose(volume.origin, [0, 0, 0])


def test_flipped_row_direction_keeps_inferior_first(tmp_path):
    # columns run anterior (-y): the normal row x col points inferior, ingest must still stack upward
    hu = _marked()
    write_good_dicom(tmp_path / "s", hu, extra={"ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]})
    volume = load_series(_only(discover(tmp_path)[0]))
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.direction, [[0, 0, 1], [0, -1, 0], [1, 0, 0]])


def test_oblique_axial_within_tolerance_is_carried_in_direction(tmp_path):
    angle = math.radians(12)  # head tilted in the scanner; positions stack along the tilted normal
    col = [0.0, math.cos(angle), math.sin(angle)]
    normal = np.cross([1.0, 0.0, 0.0], col)

    def tilt(ds, k):
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *col]
        ds.ImagePositionPatient = list(4.0 * k * normal)

    write_good_dicom(tmp_path / "s", _marked(), per_slice_hook=tilt)
    volume = load_series(_only(discover(tmp_path)[0]))
    np.testing.assert_allclose(volume.direction, [normal, col, [1, 0, 0]], atol=1e-6)
    assert volume.spacing[0] == pytest.approx(4.0)


def test_rescale_slope_and_intercept_give_hu(tmp_path):
    hu = 2 * np.round(_marked() / 2)  # slope 2 stores even HU exactly
    write_good_dicom(tmp_path / "s", hu, slope=2.0, intercept=-2048.0)
    np.testing.assert_array_equal(load_series(_only(discover(tmp_path)[0])).hu, hu)


def test_rle_compressed_series_decodes(tmp_path):
    hu = _marked()

    def compress(ds, k):
        ds.compress(RLELossless)

    write_good_dicom(tmp_path / "s", hu, per_slice_hook=compress)
    np.testing.assert_array_equal(load_series(_only(discover(tmp_path)[0])).hu, hu)


def test_series_are_grouped_by_uid_not_by_folder(tmp_path):
    flat = tmp_path / "flat"
    a = write_good_dicom(flat / "tmp_a", _marked(), series_uid="1.2.3.4.1", study_uid="1.2.3.9")
    b = write_good_dicom(flat / "tmp_b", _marked(9), series_uid="1.2.3.4.2", study_uid="1.2.3.9")
    for i, path in enumerate([*a, *b]):  # one folder holding both series, names interleaved
        path.rename(flat / f"{i % 7:02d}-{i:03d}.dcm")
    refs, rejects = discover(tmp_path)
    assert rejects == [] and len(refs) == 2
    assert sorted(len(r.files) for r in refs) == [9, 10]
    for ref in refs:
        assert ref.source == ref.files[0]  # a shared folder cannot name one series
        assert ref.study_keys == ("1.2.3.9",)  # the shared folder name is no study key
        assert len(ref.sop_uids) == len(ref.files)
    assert sorted(load_series(r).shape[0] for r in refs) == [9, 10]


def test_study_keys_walk_up_nested_folders(tmp_path):
    write_good_dicom(tmp_path / "CQ500CT7 CQ500CT7" / "Unknown Study" / "CT PLAIN THIN", study_uid="1.2.7")
    ref = _only(discover(tmp_path)[0])
    assert ref.study_keys == ("CT PLAIN THIN", "Unknown Study", "CQ500CT7 CQ500CT7", "1.2.7")
    # a series lying directly in the input folder is keyed by that folder's name
    write_good_dicom(tmp_path / "alone", study_uid="1.2.8")
    assert _only(discover(tmp_path / "alone")[0]).study_keys == ("alone", "1.2.8")


def test_discover_skips_sidecars_and_rejects_junk(tmp_path):
    write_good_dicom(tmp_path / "s")
    (tmp_path / "labels.csv").write_text("study_id\ns\n")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "s" / "notes.txt").write_text("free text")
    (tmp_path / "stray.bin").write_bytes(b"junk" * 50)
    refs, rejects = discover(tmp_path)
    assert len(refs) == 1
    assert [e.path for e in rejects] == [str(tmp_path / "stray.bin")]
    assert "not a DICOM file" in rejects[0].reason


def test_discover_missing_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")


def test_min_slices_is_configurable(tmp_path):
    write_good_dicom(tmp_path / "s", phantom(5))
    ref = _only(discover(tmp_path)[0])
    assert DEFAULT_MIN_SLICES == 8
    with pytest.raises(DataError, match=r"too few slices: 5 \(minimum 8\)"):
        load_series(ref)
    assert load_series(ref, min_slices=5).shape == (5, 32, 32)


def test_nifti_matches_the_same_dicom(tmp_path):
    hu = _marked()
    origin = (-10.0, 20.0, -50.0)
    write_good_dicom(tmp_path / "dcm", hu, origin_xyz=origin)
    write_nifti(hu, SPACING, tmp_path / "nii" / "case_9.nii.gz", origin_xyz=origin)
    refs = {r.kind: r for r in discover(tmp_path)[0]}
    dicom, nifti = load_series(refs["dicom"]), load_series(refs["nifti"])
    np.testing.assert_array_equal(nifti.hu, dicom.hu)
    assert nifti.spacing == pytest.approx(dicom.spacing)
    np.testing.assert_allclose(nifti.direction, dicom.direction, atol=1e-6)
    np.testing.assert_allclose(nifti.origin, dicom.origin, atol=1e-4)
    assert nifti.study_keys == ("case_9", "nii") and nifti.patient_id == ""


def test_nifti_stored_superior_first_is_flipped(tmp_path):
    hu = _marked()
    affine = nifti_affine(SPACING)
    affine[2, 2], affine[2, 3] = -SPACING[0], 36.0  # k runs downward from z = 36 mm
    write_float_nifti(hu[::-1], tmp_path / "down.nii", affine)
    volume = load_series(_only(discover(tmp_path)[0]))
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.origin, [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(volume.direction[0], [0, 0, 1])


def test_nifti_with_trailing_singleton_axis_loads(tmp_path):
    data = _marked().transpose(2, 1, 0)[..., None]  # (i, j, k, 1), as some converters write
    nib.save(nib.Nifti1Image(data, nifti_affine(SPACING)), tmp_path / "t.nii.gz")
    np.testing.assert_array_equal(load_series(_only(discover(tmp_path)[0])).hu, _marked())


def _phi_free(texts: list[str]) -> bool:
    return not [text for text in texts if PHI_ID in text or "Plantedphi" in text]


def test_no_phi_in_repr_warnings_or_logs(tmp_path, caplog):
    # an over-long PatientID (invalid LO), and a series UID that embeds the MRN (as careless exports do):
    # pydicom validates values lazily, on first access, and its warning quotes an invalid UID
    long_id = f"{PHI_ID}-" + "9" * 70
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom_series(
            phantom(),
            SPACING,
            tmp_path / "s",
            patient_id=long_id,
            patient_name=PHI_NAME,
            series_uid=f"{PHI_ID}.1",
        )
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = _only(discover(tmp_path)[0])
        volume = load_series(ref)
    assert volume.patient_id == long_id
    assert _phi_free([str(w.message) for w in caught] + [caplog.text, repr(volume), repr(ref)])


def test_no_phi_when_decoding_fails(tmp_path, caplog):
    # invalid values quoting PHI (pydicom warns "Invalid value for VR UI: '<value>'" when it converts one), also in
    # fields only the decode-error path reads (it scans the header to redact the exception text)
    def break_slice(ds, k):
        if k == 2:
            ds.file_meta.TransferSyntaxUID = RLELossless
            ds.PixelData = encapsulate([b"not rle" * 20])
            ds["PixelData"].VR = "OB"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_good_dicom(
            tmp_path / "s",
            series_uid=f"{PHI_ID}.2",
            extra={
                "FrameOfReferenceUID": f"{PHI_ID}.3",
                "StudyDate": PHI_ID,
                "PatientAge": PHI_ID,
                "PatientBirthDate": PHI_NAME,
            },
            per_slice_hook=break_slice,
        )
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="IM-0003.dcm: pixel data cannot be decoded") as info:
            load_series(_only(discover(tmp_path)[0]))
    assert _phi_free([str(w.message) for w in caught] + [caplog.text, str(info.value)])
