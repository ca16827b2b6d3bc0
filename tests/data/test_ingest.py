"""Ingest of good DICOM / NIfTI series: grouping, ordering, geometry, HU, study keys, de-identification."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    EnhancedCTImageStorage,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from molre.data import ingest, labels
from molre.data.dicom_write import nifti_affine, write_dicom_series, write_nifti
from molre.data.ingest import DEFAULT_MIN_SLICES, discover, largest_first, load_series, source_digest
from molre.errors import DataError
from molre.findings import FINDING_IDS
from tests.data.jpeg_lossless import encode_frame
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


def _loose_in_one_folder(folder: Path, *series: list[Path]) -> None:
    """Move the files of several written series into ``folder`` itself, names interleaved (as RSNA's export)."""
    for i, path in enumerate(p for paths in series for p in paths):
        path.rename(folder / f"{i % 7:02d}-{i:03d}.dcm")


def _outside_circle(shape=(10, 32, 32)) -> np.ndarray:
    """Voxels outside the phantom's reconstruction circle (its corners), where scanners write padding."""
    y, x = np.mgrid[: shape[1], : shape[2]]
    corner = np.hypot(y - shape[1] / 2, x - shape[2] / 2) > 0.45 * shape[1]
    return np.broadcast_to(corner, shape)


def _set_padding_element(value: int, vr: str):
    def hook(ds, k):
        ds.add_new(0x00280120, vr, value)  # PixelPaddingValue, VR as the scanner wrote it

    return hook


@pytest.mark.parametrize(
    "stored, representation, extra, hook",
    [
        pytest.param([-32768], 1, {"PixelPaddingValue": -32768}, None, id="signed -32768"),
        pytest.param([63536], 0, {"PixelPaddingValue": 63536}, None, id="unsigned 63536"),
        pytest.param(
            [-32768], 1, {}, _set_padding_element(32768, "US"), id="signed pixels, padding as US 32768"
        ),
        pytest.param(
            [-32768, -31000, -30000],
            1,
            {"PixelPaddingValue": -32768, "PixelPaddingRangeLimit": -30000},
            None,
            id="range -32768..-30000",
        ),
    ],
)
def test_pixel_padding_becomes_air(tmp_path, stored, representation, extra, hook):
    hu = _marked()
    corner = _outside_circle(hu.shape)
    padded = hu.copy()
    # stored = HU + 1024 (intercept -1024): padding values spread over the corner voxels
    padded[corner] = np.resize(np.array(stored, dtype=np.float32), int(corner.sum())) - 1024.0
    write_good_dicom(
        tmp_path / "s", padded, pixel_representation=representation, extra=extra, per_slice_hook=hook
    )
    volume = load_series(_only(discover(tmp_path)[0]))
    want = np.where(corner, -1024.0, hu)
    np.testing.assert_array_equal(volume.hu, want)


def test_pixel_padding_range_ends_at_its_limit(tmp_path):
    hu = _marked()
    padded = hu.copy()
    padded[_outside_circle(hu.shape)] = -29999.0 - 1024.0  # one above the range limit: not padding
    write_good_dicom(tmp_path / "s", padded, pixel_representation=1,
                     extra={"PixelPaddingValue": -32768, "PixelPaddingRangeLimit": -30000})  # fmt: skip
    with pytest.raises(DataError, match=r"implausible HU range -31023\.\."):
        load_series(_only(discover(tmp_path)[0]))


def _compress(syntax):
    def hook(ds, k):
        ds.compress(syntax)

    return hook


@pytest.mark.parametrize(
    "syntax, intercept",
    [(JPEG2000Lossless, -1024.0), (JPEG2000Lossless, 0.0), (RLELossless, 0.0)],
    ids=["jpeg2000-unsigned", "jpeg2000-signed", "rle-signed"],
)
def test_compressed_series_equals_the_uncompressed_one(tmp_path, syntax, intercept):
    hu = _marked()  # intercept 0: stored = HU, signed int16
    write_good_dicom(tmp_path / "plain", hu, intercept=intercept)
    write_good_dicom(tmp_path / "packed", hu, intercept=intercept, per_slice_hook=_compress(syntax))
    refs = {Path(r.source).name: r for r in discover(tmp_path)[0]}
    assert pydicom.dcmread(refs["packed"].files[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(refs["packed"]).hu, load_series(refs["plain"]).hu)


def _encapsulated(syntax, frames: list[bytes]):
    """A slice hook replacing slice k's pixels with the compressed ``frames[k]``."""

    def hook(ds, k):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([frames[k]])
        ds["PixelData"].VR = "OB"

    return hook


@pytest.mark.parametrize("representation", [0, 1], ids=["unsigned", "signed"])
def test_jpeg_lossless_sv1_series_decodes(tmp_path, representation):
    # the transfer syntax most CT exports use; pydicom cannot write it: tests/data/jpeg_lossless.py does
    hu = _marked()
    intercept = -1024.0 if representation == 0 else 0.0
    stored = (hu - intercept).astype(np.uint16 if representation == 0 else np.int16)
    frames = [encode_frame(stored[k]) for k in range(hu.shape[0])]
    write_good_dicom(tmp_path / "s", hu, intercept=intercept, pixel_representation=representation,
                     per_slice_hook=_encapsulated(JPEGLosslessSV1, frames))  # fmt: skip
    np.testing.assert_array_equal(load_series(_only(discover(tmp_path)[0])).hu, hu)


def test_jpeg_ls_series_decodes(tmp_path):
    # pydicom's bundled 64x64 signed MR slice, JPEG-LS lossless and uncompressed, as the pixels of a CT series
    jpeg_ls = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    plain = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array  # int16, 127 .. 2145
    hu = np.repeat(plain[None].astype(np.float32) - 1024.0, 8, axis=0)  # -897 .. 1121 HU: air and bone

    def swap(ds, k):
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = jpeg_ls.PixelData  # already encapsulated
        ds["PixelData"].VR = "OB"

    write_good_dicom(tmp_path / "s", hu, pixel_representation=1, per_slice_hook=swap)
    np.testing.assert_array_equal(load_series(_only(discover(tmp_path)[0])).hu, hu)


def test_jpeg_decoders_are_installed():
    for syntax in (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless):
        assert "gdcm" in get_decoder(syntax).available_plugins, syntax.name
    # pydicom's bundled JPEG Lossless SV1 (RGB) image decodes to the same pixels as its RLE twin
    jpeg = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    assert jpeg.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    np.testing.assert_array_equal(
        jpeg.pixel_array, pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array
    )


def test_pixel_padding_that_fits_no_pixel_value_is_a_clear_error(tmp_path):
    write_good_dicom(tmp_path / "s", per_slice_hook=_set_padding_element(70000, "UL"))  # a damaged header
    with pytest.raises(DataError, match="IM-0001.dcm: PixelPaddingValue 70000 does not fit 16-bit pixels"):
        load_series(_only(discover(tmp_path)[0]))


def test_series_are_grouped_by_uid_not_by_folder(tmp_path):
    # RSNA's layout: one folder holding the slices of several studies
    flat = tmp_path / "flat"
    a = write_good_dicom(flat / "tmp_a", _marked(), series_uid="1.2.3.4.1", study_uid="1.2.3.9")
    b = write_good_dicom(flat / "tmp_b", _marked(9), series_uid="1.2.3.4.2", study_uid="1.2.3.8")
    _loose_in_one_folder(flat, a, b)
    refs, rejects = discover(tmp_path)
    assert rejects == [] and len(refs) == 2
    assert sorted(len(r.files) for r in refs) == [9, 10]
    for ref in refs:
        assert ref.source == ref.files[0]  # a shared folder cannot name one series
        assert ref.study_keys == (ref.study_uid,)  # the name of a folder of several studies is no study key
        assert len(ref.sop_uids) == len(ref.files)
    assert sorted(load_series(r).shape[0] for r in refs) == [9, 10]


def test_series_of_one_study_in_one_folder_keep_its_name_as_study_key(tmp_path):
    # a hospital export: a thick and a thin reconstruction of one study loose in a folder named by the study id
    for study, uid in (("studyA", "1.2.5.1"), ("studyB", "1.2.5.2")):
        thick = write_good_dicom(tmp_path / study / "a", _marked(10), study_uid=uid)
        thin = write_good_dicom(tmp_path / study / "b", _marked(12), spacing=(2.0, 0.9, 0.9), study_uid=uid)
        _loose_in_one_folder(tmp_path / study, thick, thin)
    refs, rejects = discover(tmp_path)
    assert rejects == [] and len(refs) == 4
    table_path = tmp_path / "labels.csv"
    table_path.write_text(f"study_id,patient_id,{FINDING_IDS[0]}\nstudyA,P1,1\nstudyB,P2,0\n")
    table = labels.load_labels(table_path)
    for ref in refs:
        study = Path(ref.files[0]).parent.name
        assert ref.source == ref.files[0]  # two series: the folder still names neither
        assert ref.study_keys == (study, ref.study_uid)
        assert table.match(ref.study_keys) == study
    assert sorted(len(r.files) for r in refs) == [10, 10, 12, 12]


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


def test_dangling_symlink_is_a_reject_not_an_abort(tmp_path):
    write_good_dicom(tmp_path / "s")
    link = tmp_path / "s" / "IM-0099.dcm"
    link.symlink_to(tmp_path / "moved-away.dcm")  # e.g. a file deleted or moved after the link was made
    refs, rejects = discover(tmp_path)
    assert len(_only(refs).files) == 10
    assert [(e.path, e.reason) for e in rejects] == [
        (str(link), "dangling symbolic link (its target does not exist)")
    ]
    assert load_series(refs[0]).shape == (10, 32, 32)


def test_linked_study_folders_are_followed_once_and_a_loop_ends(tmp_path):
    write_good_dicom(tmp_path / "archive" / "s1")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "s1").symlink_to(tmp_path / "archive" / "s1")  # a PACS export's linked folder
    (tmp_path / "export" / "up").symlink_to(tmp_path / "export")  # a link back up the tree
    refs, rejects = discover(tmp_path / "export")
    assert len(_only(refs).files) == 10 and rejects == []
    refs, rejects = discover(tmp_path)  # the same folder by its path and through the link: counted once
    assert len(_only(refs).files) == 10 and rejects == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder")
def test_a_folder_that_cannot_be_listed_is_a_reject(tmp_path):
    write_good_dicom(tmp_path / "s")
    locked = tmp_path / "locked"
    write_good_dicom(locked)
    locked.chmod(0)
    try:
        refs, rejects = discover(tmp_path)
    finally:
        locked.chmod(0o755)
    assert len(_only(refs).files) == 10
    assert [(e.path, e.reason) for e in rejects] == [(str(locked), "cannot list folder (PermissionError)")]


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


# ---------------------------------------------------------------------------------------------------- image kind


def _set_sop_class(uid: str):
    def hook(ds, k):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid

    return hook


def _on_slice(index: int, **values):
    def hook(ds, k):
        if k == index:
            for keyword, value in values.items():
                setattr(ds, keyword, value)

    return hook


@pytest.mark.parametrize(
    "extra, hook, reason",
    [
        pytest.param({}, _on_slice(3, BurnedInAnnotation="YES"), "IM-0004.dcm: BurnedInAnnotation is YES",
                     id="burned-in annotation on one slice"),
        pytest.param({"BurnedInAnnotation": "YES", "ImageType": ["DERIVED", "PRIMARY", "AXIAL"]}, None,
                     "IM-0001.dcm: BurnedInAnnotation is YES", id="burned-in reformat"),
        pytest.param({}, _set_sop_class(SecondaryCaptureImageStorage),
                     "IM-0001.dcm: SOPClassUID is Secondary Capture Image Storage, not CT Image Storage",
                     id="secondary capture"),
        pytest.param({}, _set_sop_class("1.2.826.0.1.3680043.8.498.999.1"),
                     "IM-0001.dcm: SOPClassUID is a non-standard SOP class, not CT Image Storage",
                     id="private SOP class"),
        pytest.param({}, _set_sop_class(EnhancedCTImageStorage),
                     "IM-0001.dcm: multi-frame (enhanced) DICOM is not supported", id="enhanced CT"),
        pytest.param({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, None, "IM-0001.dcm: ImageType SECONDARY",
                     id="derived secondary reformat"),
        pytest.param({}, _on_slice(6, ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"]),
                     "IM-0007.dcm: ImageType SECONDARY", id="screen save in the series"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, None, "IM-0001.dcm: ImageType LOCALIZER",
                     id="localizer"),
        pytest.param({"ImageType": "DERIVED\\PRIMARY\\SCREEN SAVE"}, None, "IM-0001.dcm: ImageType SCREEN SAVE",
                     id="screen save, one string"),
    ],
)  # fmt: skip
def test_burned_in_secondary_and_localizer_series_are_refused(tmp_path, extra, hook, reason):
    # the planted PHI, as a screen save or a workstation export would also draw it into the pixels
    write_good_dicom(tmp_path / "s", extra=extra, per_slice_hook=hook)
    with pytest.raises(DataError, match=re.escape(reason)) as info:
        load_series(_only(discover(tmp_path)[0]))
    assert info.value.path == str(tmp_path / "s")
    assert _phi_free([str(info.value)]) and "1.2.826" not in str(info.value)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"ImageType": None, "BurnedInAnnotation": None}, id="no ImageType, no BurnedInAnnotation"),
        pytest.param({"SOPClassUID": None}, id="no SOPClassUID in the dataset (file meta: CT)"),
        pytest.param({"ImageType": ["DERIVED", "PRIMARY", "AXIAL"], "BurnedInAnnotation": "NO"},
                     id="derived primary reformat"),
        pytest.param({"RecognizableVisualFeatures": "YES"}, id="recognizable visual features (a face)"),
        pytest.param({"BurnedInAnnotation": "no"}, id="lower-case no"),
    ],
)  # fmt: skip
def test_original_reformatted_and_anonymised_series_still_load(tmp_path, extra):
    hu = _marked()
    write_good_dicom(tmp_path / "s", hu, extra=extra)
    np.testing.assert_array_equal(load_series(_only(discover(tmp_path)[0])).hu, hu)


def test_original_series_are_tried_before_larger_derived_ones(tmp_path):
    # one study: the 4 mm acquisition (ORIGINAL), a 2 mm DERIVED\PRIMARY reformat with more slices, a series
    # whose export dropped ImageType, and a thinner ORIGINAL one: ORIGINAL by size, then unknown, then DERIVED
    uid = "1.2.826.0.1.3680043.8.498.5"
    write_good_dicom(tmp_path / "study" / "orig", _marked(10), study_uid=uid)
    write_good_dicom(tmp_path / "study" / "orig_thin", _marked(11), study_uid=uid)
    write_good_dicom(tmp_path / "study" / "mpr", _marked(20), spacing=(2.0, 0.9, 0.9), study_uid=uid,
                     extra={"ImageType": ["DERIVED", "PRIMARY", "AXIAL", "MPR"]})  # fmt: skip
    write_good_dicom(tmp_path / "study" / "anon", _marked(15), study_uid=uid, extra={"ImageType": None})
    refs, rejects = discover(tmp_path)
    assert rejects == [] and len(refs) == 4
    order = [Path(r.source).name for r in largest_first(refs)]
    assert order == ["orig_thin", "orig", "anon", "mpr"]
    assert {Path(r.source).name: r.image_type for r in refs} == {
        "orig": "ORIGINAL", "orig_thin": "ORIGINAL", "mpr": "DERIVED", "anon": ""
    }  # fmt: skip
    # the reformat is a fallback, not refused
    assert load_series(next(r for r in refs if r.source.endswith("mpr"))).shape == (20, 32, 32)
    # ImageType in only some of a series' files: one DERIVED file makes the series DERIVED
    write_good_dicom(
        tmp_path / "mixed", _marked(), per_slice_hook=_on_slice(2, ImageType=["DERIVED", "PRIMARY"])
    )
    assert _only(discover(tmp_path / "mixed")[0]).image_type == "DERIVED"


# ---------------------------------------------------------------------------------------------------- rescale


def _drop_rescale(index: int, *keywords: str):
    def hook(ds, k):
        if k == index:
            for keyword in keywords:
                delattr(ds, keyword)

    return hook


@pytest.mark.parametrize(
    "keywords, reason",
    [
        (("RescaleSlope", "RescaleIntercept"), "IM-0006.dcm: no RescaleSlope / RescaleIntercept where other slices"),
        (("RescaleIntercept",), "IM-0006.dcm: no RescaleIntercept where other slices of the series have it"),
    ],
    ids=["both", "intercept only"],
)  # fmt: skip
def test_a_slice_without_the_rescale_of_the_others_is_refused(tmp_path, keywords, reason):
    # unsigned pixels, intercept -1024: read with the default 1 / 0, that slice alone would be 1024 HU too bright
    write_good_dicom(tmp_path / "s", _marked(), per_slice_hook=_drop_rescale(5, *keywords))
    with pytest.raises(DataError, match=re.escape(reason)):
        load_series(_only(discover(tmp_path)[0]))


def test_a_series_without_any_rescale_reads_stored_values_as_hu(tmp_path):
    # no slice has them: slope 1, intercept 0 (signed pixels storing HU as they are), as before
    hu = _marked()
    write_good_dicom(
        tmp_path / "s", hu, intercept=0.0, extra={"RescaleSlope": None, "RescaleIntercept": None}
    )
    assert "RescaleIntercept" not in pydicom.dcmread(tmp_path / "s" / "IM-0001.dcm")
    np.testing.assert_array_equal(load_series(_only(discover(tmp_path)[0])).hu, hu)


# ---------------------------------------------------------------------------------------------------- copies


def _resend(path: Path, folder: Path, edit=None) -> Path:
    """``path`` again under ``folder`` (same base name), as a PACS re-send or a second export writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    if edit is None:
        shutil.copyfile(path, target)
    else:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(target)
    return target


def test_a_second_copy_of_an_instance_is_dropped(tmp_path):
    hu = _marked()
    paths = write_good_dicom(tmp_path / "study" / "export1", hu)
    _resend(paths[5], tmp_path / "study" / "resend")  # one instance sent twice, byte for byte

    def new_transfer_meta(
        ds,
    ):  # a re-send with other file meta and an extra element, same instance and pixels
        ds.file_meta.ImplementationVersionName = "OTHER_PACS"
        ds.StationName = "RESEND"

    _resend(paths[6], tmp_path / "study" / "resend", new_transfer_meta)
    for path in paths:  # and the whole study exported a second time
        _resend(path, tmp_path / "study" / "export2")
    refs, rejects = discover(tmp_path)
    ref = _only(refs)
    assert rejects == [] and len(ref.files) == 10 and len(set(ref.sop_uids)) == 10
    assert all("export1" in f for f in ref.files)  # the first copy (by path) is kept
    np.testing.assert_array_equal(load_series(ref).hu, hu)


def test_slices_at_one_position_name_both_files_by_their_relative_paths(tmp_path):
    paths = write_good_dicom(tmp_path / "study" / "export1")

    def other_instance(ds):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.6.1"

    _resend(paths[5], tmp_path / "study" / "resend", other_instance)
    ref = _only(discover(tmp_path)[0])
    assert len(ref.files) == 11
    with pytest.raises(DataError) as info:
        load_series(ref)
    assert info.value.path == str(tmp_path / "study")
    assert info.value.reason == (
        f"duplicate slice positions: {os.path.join('export1', 'IM-0006.dcm')} and "
        f"{os.path.join('resend', 'IM-0006.dcm')} (and 0 more)"
    )


def test_one_instance_uid_with_other_pixels_is_kept_and_named(tmp_path):
    paths = write_good_dicom(tmp_path / "study" / "export1")

    def other_pixels(ds):  # the same SOPInstanceUID, different pixel data: not a copy, which one is right?
        pixels = ds.pixel_array.copy()
        pixels[0, 0] += 1
        ds.PixelData = pixels.tobytes()

    _resend(paths[5], tmp_path / "study" / "resend", other_pixels)
    ref = _only(discover(tmp_path)[0])
    assert len(ref.files) == 11
    with pytest.raises(DataError, match=re.escape(
        f"duplicate slice positions: {os.path.join('export1', 'IM-0006.dcm')} and "
        f"{os.path.join('resend', 'IM-0006.dcm')} (one SOPInstanceUID, different pixel data: keep one copy)"
    )):  # fmt: skip
        load_series(ref)


# ---------------------------------------------------------------------------------------------------- source digest


def _copied(src: Path, dst: Path) -> Path:
    """``src`` copied as a move to another disk does it: the same bytes, new modification times."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def _digest(root: Path) -> str:
    return source_digest(_only(discover(root)[0]))


def test_source_digest_sees_a_replaced_dicom_series_not_a_copy(tmp_path):
    write_good_dicom(tmp_path / "a" / "study", series_uid="1.2.826.0.1.3680043.8.498.77")
    first = _digest(tmp_path / "a")
    copy = _copied(tmp_path / "a", tmp_path / "b")
    (copy / "study" / "IM-0001.dcm").rename(copy / "study" / "renamed.dcm")  # file names do not count
    assert _digest(copy) == first
    write_good_dicom(tmp_path / "c" / "study")  # re-sent: new SOPInstanceUIDs (a new SeriesInstanceUID)
    assert _digest(tmp_path / "c") != first
    (copy / "study" / "IM-0010.dcm").unlink()  # a slice less
    assert _digest(copy) != first

    def station(ds):  # the same UIDs, one file rewritten with an element more: another size
        ds.StationName = "PACS2"

    reencoded = _copied(tmp_path / "a", tmp_path / "d")
    _resend(tmp_path / "a" / "study" / "IM-0005.dcm", reencoded / "study", station)
    assert _digest(reencoded) != first


@pytest.mark.parametrize("name", ["study.nii.gz", "study.nii"])
def test_source_digest_sees_an_overwritten_nifti_not_a_copy(tmp_path, name):
    path = write_nifti(phantom(), SPACING, tmp_path / "a" / name)
    first, size = _digest(tmp_path / "a"), path.stat().st_size
    assert _digest(_copied(tmp_path / "a", tmp_path / "b")) == first
    write_nifti(phantom(), SPACING, path)  # written again, the same volume
    assert _digest(tmp_path / "a") == first
    corrected = phantom()
    corrected[4, 16, 16] = 60.0  # one voxel corrected
    write_nifti(corrected, SPACING, path)
    assert name.endswith(".gz") or path.stat().st_size == size  # .nii: the same size, only its bytes differ
    assert _digest(tmp_path / "a") != first


# ---- content memo: a re-run reads an unchanged .nii no more

_OPENED: list[str] | None = None  # while a list: every path this process opens (Python's "open" audit event)


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_open)  # cannot be removed: inert while _OPENED is None


def _opened_during(fn) -> tuple[object, list[str]]:
    global _OPENED
    _OPENED = []
    try:
        return fn(), _OPENED
    finally:
        _OPENED = None


def _nii(tmp_path: Path) -> tuple[Path, ingest.SeriesRef]:
    path = write_nifti(phantom(), SPACING, tmp_path / "in" / "study.nii")
    return path, _only(discover(tmp_path / "in")[0])


def _digest_before_the_memo(path: Path) -> str:
    """What ``source_digest`` gave for a .nii before the memo (the value existing markers hold)."""
    content = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(f"nifti\nsha256 {content}".encode()).hexdigest()


def test_a_remembered_nii_digest_is_the_same_value_and_the_file_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "RACY_NS", 0)  # the file was just written: remember it all the same
    path, ref = _nii(tmp_path)
    first = ingest.ContentMemo()
    assert source_digest(ref, first) == source_digest(ref) == _digest_before_the_memo(path)
    assert (first.reads, first.hits, len(first.used)) == (1, 0, 1)
    again = ingest.ContentMemo(known=dict(first.used))
    digest, opened = _opened_during(lambda: source_digest(ref, again))
    assert digest == _digest_before_the_memo(path) and (again.reads, again.hits) == (0, 1)
    assert opened == [str(path)]  # the 2-byte gzip check only; without the memo, the whole file too:
    assert _opened_during(lambda: source_digest(ref))[1] == [str(path)] * 2
    assert again.used == first.used  # kept for the next run


def test_the_memo_notices_a_replacement_with_the_same_size_and_mtime(tmp_path, monkeypatch):
    """``cp -p`` / ``rsync -a`` give a replaced file the old size and mtime: its ctime (rewritten in place) or
    its inode (written beside and renamed over) still tells, and the file is read again."""
    monkeypatch.setattr(ingest, "RACY_NS", 0)  # the file was just written: remember it all the same
    path, ref = _nii(tmp_path)
    first = source_digest(ref)
    corrected = phantom()
    corrected[4, 16, 16] = 60.0  # one voxel corrected: the same size, other bytes
    spare = write_nifti(corrected, SPACING, tmp_path / "spare.nii")
    assert spare.stat().st_size == path.stat().st_size
    beside = tmp_path / "in" / ".study.nii.tmp"

    def in_place(old: os.stat_result) -> None:  # cp -p over the file: its inode kept, the mtime set back
        with open(path, "r+b") as f:
            f.write(spare.read_bytes())
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))

    def renamed_over(old: os.stat_result) -> None:  # rsync -a: written beside, the mtime set, renamed over
        shutil.copyfile(spare, beside)
        os.utime(beside, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(beside, path)

    for replace in (in_place, renamed_over):
        write_nifti(phantom(), SPACING, path)  # the original content (again)
        memo = ingest.ContentMemo()
        assert source_digest(ref, memo) == first and len(memo.used) == 1
        old = path.stat()
        time.sleep(0.05)  # past the filesystem clock's tick (RACY_NS, set to 0 here, covers it in real use)
        replace(old)
        now = path.stat()
        assert (now.st_size, now.st_mtime_ns) == (old.st_size, old.st_mtime_ns), replace.__name__
        assert (now.st_ino == old.st_ino) == (replace is in_place)
        again = ingest.ContentMemo(known=dict(memo.used))
        assert source_digest(ref, again) == _digest_before_the_memo(path) != first, replace.__name__
        assert (again.reads, again.hits) == (1, 0)


def test_a_file_changed_just_before_it_is_read_is_not_remembered(tmp_path):
    """Its ctime lies within ``RACY_NS`` of the read: a change right after it could keep every stat field."""
    path, ref = _nii(tmp_path)  # just written
    memo = ingest.ContentMemo()
    assert source_digest(ref, memo) == _digest_before_the_memo(path)
    assert memo.reads == 1 and memo.used == {}
