"""Orientation, skull-based centring and trilinear resampling onto the fixed int16 grid (numpy phantoms)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from molre.data import resample
from molre.data.resample import (
    HU_MIN,
    align_volume,
    antialias_sigma,
    canonical_orientation,
    locate_head,
    resample_to_grid,
)


def skull_phantom(shape=(16, 64, 64), centre=None, radius_vox=(6.0, 24.0, 24.0), seed=0) -> np.ndarray:
    """Ellipsoidal head [D,H,W] in HU: 2-voxel bone shell (1200), textured brain (~30), air outside."""
    rng = np.random.default_rng(seed)
    centre = np.array(centre if centre is not None else [(n - 1) / 2 for n in shape], dtype=float)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(sum(((g - c) / rv) ** 2 for g, c, rv in zip((zz, yy, xx), centre, radius_vox, strict=True)))
    hu = np.full(shape, -1024.0, dtype=np.float32)
    hu[r < 1.0] = 1200.0
    brain = r < 1.0 - 2.0 / max(radius_vox)
    hu[brain] = 30.0 + rng.normal(0, 5, size=brain.sum())
    return hu


def bone_centre(vol: np.ndarray) -> np.ndarray:
    return np.array(ndimage.center_of_mass(vol > 300))


def test_identity_when_already_on_grid():
    hu = skull_phantom()
    out = align_volume(hu, (8.0, 4.0, 4.0), out_spacing=(8.0, 4.0, 4.0), grid=hu.shape)
    assert out.dtype == np.int16 and out.shape == hu.shape
    np.testing.assert_array_equal(out, np.rint(hu).astype(np.int16))


@pytest.mark.parametrize(
    "perm, flips",
    [((0, 1, 2), (0,)), ((0, 1, 2), (1, 2)), ((2, 1, 0), ()), ((1, 0, 2), (0, 2)), ((2, 0, 1), (1,))],
)
def test_any_axis_aligned_orientation_gives_the_same_volume(perm, flips):
    hu = skull_phantom(shape=(16, 48, 40), radius_vox=(5.0, 18.0, 15.0))
    spacing = (8.0, 4.0, 5.0)
    want = align_volume(hu, spacing, resample.STANDARD_AXIAL, out_spacing=(8.0, 4.0, 4.0), grid=(16, 48, 48))
    # store the same voxels with array axes permuted/flipped, and say so in the direction matrix
    stored = np.transpose(hu, perm)
    direction = np.eye(3)[list(perm)]  # row i: unit vector of stored axis i (in canonical z,y,x terms)
    direction = direction[:, [2, 1, 0]]  # ... expressed as LPS (x, y, z) components
    for axis in flips:
        stored = np.flip(stored, axis)
        direction[axis] *= -1
    stored_spacing = tuple(spacing[p] for p in perm)
    canon, canon_spacing = canonical_orientation(stored, stored_spacing, direction)
    np.testing.assert_array_equal(canon, hu)
    assert canon_spacing == spacing
    got = align_volume(stored, stored_spacing, direction, out_spacing=(8.0, 4.0, 4.0), grid=(16, 48, 48))
    np.testing.assert_array_equal(got, want)


def test_degenerate_direction_is_an_error():
    with pytest.raises(ValueError, match="distinct patient axes"):
        canonical_orientation(np.zeros((2, 2, 2)), (1, 1, 1), [[0, 0, 1], [0, 0, 1], [1, 0, 0]])


def test_off_centre_head_is_centred():
    hu = skull_phantom(shape=(20, 96, 96), centre=(9.5, 30.0, 62.0), radius_vox=(6.0, 20.0, 20.0))
    out = align_volume(hu, (4.0, 2.0, 2.0), out_spacing=(8.0, 4.0, 4.0), grid=(16, 32, 32))
    np.testing.assert_allclose(bone_centre(out), [(16 - 1) / 2, (32 - 1) / 2, (32 - 1) / 2], atol=0.6)


def test_tall_scan_keeps_the_top_of_the_skull():
    # a skull of 40 mm z-extent over a "spine" of bone going down 100 mm: taller than the 64 mm field of view
    hu = skull_phantom(shape=(40, 64, 64), centre=(30.0, 31.5, 31.5), radius_vox=(8.0, 20.0, 20.0))
    hu[:24, 28:36, 28:36] = 800.0
    out = align_volume(hu, (4.0, 2.0, 2.0), out_spacing=(8.0, 4.0, 4.0), grid=(8, 32, 32))
    bone_per_slice = (out > 300).sum(axis=(1, 2))
    assert bone_per_slice[-1] == 0  # one slice of air above the vertex
    assert bone_per_slice[-2] > 0  # the vertex itself is kept
    assert bone_per_slice[0] > 0  # the inferior part is cropped, not padded


def test_small_scan_is_padded_with_air():
    hu = skull_phantom(shape=(6, 20, 20), radius_vox=(2.5, 8.0, 8.0))
    out = align_volume(hu, (8.0, 4.0, 4.0), out_spacing=(8.0, 4.0, 4.0), grid=(16, 64, 64))
    assert (out[:4] == HU_MIN).all() and (out[:, :10] == HU_MIN).all() and (out[:, :, -10:] == HU_MIN).all()
    assert (out > 300).sum() == (np.rint(hu) > 300).sum()  # same spacing: every bone voxel copied once


def test_trilinear_matches_scipy_map_coordinates():
    rng = np.random.default_rng(1)
    vol = rng.uniform(-1024, 2000, size=(12, 30, 26)).astype(np.float32)
    spacing, out_spacing, grid = (5.0, 0.7, 0.9), (4.0, 1.3, 1.1), (14, 20, 24)
    centre = (30.0, 10.0, 11.0)
    got = resample_to_grid(vol, spacing, centre, out_spacing, grid, antialias=False)
    coords = []
    for axis in range(3):
        first, step = resample._positions(centre[axis], grid[axis], out_spacing[axis], spacing[axis])
        coords.append(first + step * np.arange(grid[axis]))
    mesh = np.meshgrid(*coords, indexing="ij")
    want = ndimage.map_coordinates(vol.astype(np.float64), mesh, order=1, mode="grid-constant", cval=HU_MIN)
    # grid-constant: outside the array is cval (air) and blends with the edge voxels, as ours
    np.testing.assert_allclose(got, np.clip(np.rint(want), -1024, 3071), atol=1)
    assert got.shape == grid and got.dtype == np.int16


def test_linear_ramp_is_reproduced_exactly():
    x = np.arange(64, dtype=np.float32) * 0.5  # 0.5 mm columns, value = position in mm
    vol = np.broadcast_to(x * 10.0, (4, 8, 64)).copy()
    out = resample_to_grid(vol, (1.0, 1.0, 0.5), (1.5, 3.5, 15.75), (1.0, 1.0, 1.5), (4, 8, 20))
    # the first output column lands on input column round((15.75 - 9.5 * 1.5) / 0.5) = 3, i.e. 1.5 mm
    np.testing.assert_array_equal(out[0, 0], np.rint((1.5 + 1.5 * np.arange(20)) * 10.0).astype(np.int16))


def test_hu_clip_and_scanner_padding():
    hu = skull_phantom()
    hu[:, :4] = -3024.0  # outside the reconstruction circle
    hu[8, 30, 30] = 5000.0  # metal
    out = align_volume(hu, (8.0, 4.0, 4.0), out_spacing=(8.0, 4.0, 4.0), grid=hu.shape)
    assert out.min() == HU_MIN and out.max() == 3071


def test_locate_head_falls_back_without_bone():
    soft = np.full((10, 40, 40), -1024.0, dtype=np.float32)
    soft[2:8, 5:25, 10:30] = 40.0  # head mask only, no bone
    frame = locate_head(soft, (4.0, 1.0, 1.0), (4.0, 1.0, 1.0), (10, 40, 40))
    assert frame.source == "head"
    np.testing.assert_allclose(frame.centre_mm, (18.0, 14.5, 19.5), atol=1.0)
    empty = np.full((10, 40, 40), -1024.0, dtype=np.float32)
    assert locate_head(empty, (4.0, 1.0, 1.0)).source == "centre"


def test_bad_arguments():
    with pytest.raises(ValueError, match="spacing"):
        align_volume(np.zeros((4, 4, 4)), (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="grid"):
        align_volume(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), grid=(0, 4, 4))
    with pytest.raises(ValueError, match="3D"):
        align_volume(np.zeros((4, 4)), (1.0, 1.0, 1.0))


def test_antialias_sigma_follows_the_skimage_convention():
    assert antialias_sigma(0.625, 4.0) == pytest.approx(2.7)  # factor 6.4: (6.4 - 1) / 2 input voxels
    assert antialias_sigma(2.0, 4.0) == pytest.approx(0.5)
    assert antialias_sigma(4.0, 4.0) == 0.0 and antialias_sigma(5.0, 4.0) == 0.0  # not downsampled: no filter


def test_antialias_is_a_gaussian_prefilter_then_trilinear():
    # scipy's gaussian_filter1d (mode "nearest") along the downsampled axes y and z, then map_coordinates
    rng = np.random.default_rng(2)
    vol = rng.uniform(-1024, 2000, size=(30, 21, 26)).astype(np.float32)
    spacing, out_spacing, grid = (0.7, 0.6, 0.9), (4.0, 1.3, 0.9), (8, 14, 30)  # x kept at 0.9 mm: no filter
    centre = (10.0, 6.0, 11.0)
    smooth, coords = vol.astype(np.float64), []
    for axis in range(3):
        sigma = antialias_sigma(spacing[axis], out_spacing[axis])
        if sigma > 0:
            smooth = ndimage.gaussian_filter1d(smooth, sigma, axis=axis, mode="nearest")
        first, step = resample._positions(centre[axis], grid[axis], out_spacing[axis], spacing[axis])
        coords.append(first + step * np.arange(grid[axis]))
    mesh = np.meshgrid(*coords, indexing="ij")
    want = ndimage.map_coordinates(smooth, mesh, order=1, mode="grid-constant", cval=HU_MIN)
    got = resample_to_grid(vol, spacing, centre, out_spacing, grid)
    np.testing.assert_allclose(got, np.clip(np.rint(want), -1024, 3071), atol=1)
    assert coords[0][0] < 0  # samples outside the scan blend with air as without the filter


def test_antialias_only_along_downsampled_axes():
    # z at the target spacing, y and x downsampled: a one-slice lesion stays in its slice, at full contrast
    vol = np.full((12, 40, 40), 30.0, dtype=np.float32)
    vol[6, 10:30, 10:30] = 75.0
    out = resample_to_grid(vol, (4.0, 0.5, 0.5), (22.0, 9.75, 9.75), (4.0, 1.0, 1.0), (12, 20, 20))
    np.testing.assert_array_equal(out[[5, 7]], 30)
    # output voxel j samples input voxel 2j: the lesion (input 10..29) covers output 5..14, its edges blurred
    assert out[6, 10, 10] == 75 and out[6, 2, 2] == 30
    assert 30 < out[6, 5, 10] < 75 and 30 < out[6, 10, 15] < 75


def _thin_lesion_contrast(z_first: int, antialias: bool) -> tuple[float, float]:
    """A 2.5 mm (4 x 0.625 mm slices) 75 HU disc in 30 HU brain, starting at input slice ``z_first``, resampled
    to 4 mm slices: (peak, integral) of its mean contrast over the output slices (HU, HU x mm)."""
    yy, xx = np.mgrid[:24, :24]
    disc = (yy - 11.5) ** 2 + (xx - 11.5) ** 2 < 8**2
    vol = np.full((128, 24, 24), 30.0, dtype=np.float32)
    vol[z_first : z_first + 4, disc] = 75.0
    centre = (127 / 2 * 0.625, 11.5, 11.5)
    out = resample_to_grid(vol, (0.625, 1.0, 1.0), centre, (4.0, 1.0, 1.0), (16, 24, 24), antialias=antialias)
    contrast = out[:, disc].astype(np.float64).mean(axis=1) - 30.0
    return float(contrast.max()), float(contrast.sum() * 4.0)


def test_thin_lesion_contrast_hardly_depends_on_its_z_position():
    # 7 positions one input slice apart span one output slice (4 / 0.625 = 6.4 input slices)
    plain = np.array([_thin_lesion_contrast(60 + k, antialias=False) for k in range(7)])
    smooth = np.array([_thin_lesion_contrast(60 + k, antialias=True) for k in range(7)])
    # without the prefilter linear interpolation reads ~2 of the 6.4 slices: the lesion vanishes at 2 positions
    assert plain[:, 0].min() == 0 and plain[:, 0].max() == 45
    # with it the lesion always shows; its integral stays the true 45 HU x 2.5 mm = 112.5 within 5 %
    assert smooth[:, 0].min() >= 15
    np.testing.assert_allclose(smooth[:, 1], 112.5, rtol=0.05)
    spread = np.ptp(smooth, axis=0) / np.ptp(plain, axis=0)
    assert spread[0] < 0.25 and spread[1] < 0.1, spread
