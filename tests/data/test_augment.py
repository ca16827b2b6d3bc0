"""HU windowing and the batched on-device augmenter: exactness, geometry in physical space, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from molre.config import AugmentConfig, DataConfig
from molre.data.augment import (
    AugmentParams,
    VolumeAugmenter,
    augment_batch,
    elastic_displacement,
    resize_volume,
    sampling_theta,
    window_hu,
)

WINDOWS = [(0.0, 80.0), (-20.0, 180.0), (-800.0, 2000.0)]
IDENTITY = dict(
    rotate=0.0,
    scale=(1.0, 1.0),
    elastic_alpha=(0.0, 0.0),
    noise_variance=(0.0, 0.0),
    brightness=(1.0, 1.0),
    flip_prob=0.0,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_volume(shape, seed=0, sigma=2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape).astype(np.float32), sigma)


def _params(angles=(0, 0, 0), scales=(1, 1, 1), flips=(1, 1, 1)) -> AugmentParams:
    """One volume's parameters with elastic and intensity off."""
    return AugmentParams(
        angles_zyx=torch.tensor([angles], dtype=torch.float32),
        scales_zyx=torch.tensor([scales], dtype=torch.float32),
        flips_zyx=torch.tensor([flips], dtype=torch.float32),
        elastic_alpha=torch.zeros(1),
        elastic_sigma=torch.full((1,), 10.0),
        brightness=torch.ones(1),
        noise_std=torch.zeros(1),
    )


def _affine_only(spacing=(4.0, 1.0, 1.0)) -> VolumeAugmenter:
    return VolumeAugmenter(AugmentConfig(**IDENTITY), spacing_zyx=spacing)


def _centroid(v: np.ndarray) -> np.ndarray:
    idx = np.indices(v.shape).reshape(3, -1)
    return (idx * v.reshape(1, -1)).sum(1) / v.sum()


# ---- windowing and resizing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int16, torch.float32])
def test_window_hu_matches_numpy(dtype):
    hu = torch.randint(-1200, 2500, (2, 4, 8, 8), generator=_gen(), dtype=torch.int16).to(dtype)
    out = window_hu(hu, WINDOWS)
    assert out.shape == (2, 3, 4, 8, 8) and out.dtype == torch.float32
    h = hu.numpy().astype(np.float32)
    for k, (lo, hi) in enumerate(WINDOWS):
        ref = np.clip((h - np.float32(lo)) / np.float32(hi - lo), 0, 1)
        np.testing.assert_array_equal(out[:, k].numpy(), ref)


def test_window_hu_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B,D,H,W\]"):
        window_hu(torch.zeros(4, 8, 8, dtype=torch.int16), WINDOWS)
    with pytest.raises(ValueError, match="hi > lo"):
        window_hu(torch.zeros(1, 4, 8, 8), [(80.0, 0.0)])


def test_resize_volume_noop_and_shape():
    x = torch.rand(2, 3, 8, 16, 16)
    assert resize_volume(x, (8, 16, 16)) is x
    y = resize_volume(x, (4, 32, 24))
    assert y.shape == (2, 3, 4, 32, 24)
    const = torch.full((1, 1, 8, 16, 16), 0.25)
    torch.testing.assert_close(resize_volume(const, (5, 7, 9)), torch.full((1, 1, 5, 7, 9), 0.25))


# ---- switches and identities --------------------------------------------------------------------------------


def test_disabled_and_eval_return_input():
    x = torch.rand(2, 3, 8, 32, 32)
    assert VolumeAugmenter(AugmentConfig(enabled=False))(x, _gen()) is x
    assert VolumeAugmenter().eval()(x, _gen()) is x
    with pytest.raises(ValueError, match=r"\[B,C,D,H,W\]"):
        VolumeAugmenter()(x[0], _gen())
    hu = torch.randint(-1000, 2000, (2, 8, 32, 32), generator=_gen(), dtype=torch.int16)
    torch.testing.assert_close(augment_batch(hu, DataConfig(), _gen(), train=False), window_hu(hu, WINDOWS))


def test_identity_ranges_give_input():
    x = torch.rand(2, 3, 8, 32, 32, generator=_gen())
    out = VolumeAugmenter(AugmentConfig(**IDENTITY))(x, _gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_prob_one_flips_all_axes():
    x = torch.rand(2, 3, 8, 32, 32, generator=_gen())
    out = VolumeAugmenter(AugmentConfig(**{**IDENTITY, "flip_prob": 1.0}))(x, _gen())
    torch.testing.assert_close(out, torch.flip(x, dims=(2, 3, 4)), atol=1e-5, rtol=0)


def test_brightness_and_noise_per_volume():
    x = torch.full((2, 3, 8, 32, 32), 0.5)
    cfg = AugmentConfig(**{**IDENTITY, "brightness": (1.01, 1.01)})
    torch.testing.assert_close(VolumeAugmenter(cfg)(x, _gen()), x * 1.01, atol=1e-6, rtol=0)
    cfg = AugmentConfig(**{**IDENTITY, "noise_variance": (0.02, 0.02)})
    residual = VolumeAugmenter(cfg)(x, _gen()) - x
    assert abs(residual.var().item() - 0.02) < 0.002 and abs(residual.mean().item()) < 0.005


# ---- geometry -----------------------------------------------------------------------------------------------


def test_inplane_rotation_matches_scipy():
    vol = _smooth_volume((8, 48, 48))
    out = _affine_only().augment(torch.from_numpy(vol)[None, None], _params(angles=(0.3, 0, 0)), _gen())
    # scipy's positive angle on axes (1, 2) turns content the other way round from the right-handed z rotation
    ref = ndi.rotate(vol, -np.degrees(0.3), axes=(1, 2), reshape=False, order=1)
    np.testing.assert_allclose(out[0, 0, :, 12:36, 12:36].numpy(), ref[:, 12:36, 12:36], atol=1e-4)


def test_affine_in_physical_space_matches_scipy_affine_transform():
    """Rotation about all three axes + anisotropic scale + a flip, on 4 mm x 1 mm x 1 mm voxels."""
    spacing = np.array([4.0, 1.0, 1.0])
    angles, scales, flips = (0.08, -0.06, 0.1), (1.1, 0.9, 1.05), (1.0, -1.0, 1.0)
    vol = _smooth_volume((10, 48, 40), seed=1)  # a 40 x 48 x 40 mm box: not a cube in mm or voxels
    out = _affine_only().augment(torch.from_numpy(vol)[None, None], _params(angles, scales, flips), _gen())
    # independent reference: content map T = R S F in (x, y, z) mm; pull with T^-1 in voxel indices (z, y, x)
    rot = Rotation.from_euler("ZYX", angles).as_matrix()  # intrinsic Z-Y-X = Rz @ Ry @ Rx
    t_xyz = rot @ np.diag(scales[::-1]) @ np.diag(flips[::-1])
    rev = np.eye(3)[::-1]  # xyz <-> zyx
    t_inv_zyx = rev @ np.linalg.inv(t_xyz) @ rev
    matrix = np.diag(1 / spacing) @ t_inv_zyx @ np.diag(spacing)
    centre = (np.array(vol.shape) - 1) / 2
    ref = ndi.affine_transform(vol, matrix, offset=centre - matrix @ centre, order=1, mode="constant")
    inner = (slice(3, 7), slice(12, 36), slice(10, 30))
    np.testing.assert_allclose(out[0, 0].numpy()[inner], ref[inner], atol=1e-4)


def test_out_of_plane_rotation_moves_landmark_in_mm():
    """Rotating 0.25 rad about x moves a blob 16 mm anterior by 16 sin(0.25) mm = ~1 slice of 4 mm along z."""
    spacing = np.array([4.0, 1.0, 1.0])
    shape = np.array([12, 64, 56])  # 48 x 64 x 56 mm
    centre = (shape - 1) / 2
    blob_mm = np.array([0.0, 16.0, 0.0])  # (z, y, x) from the centre
    mm = (np.indices(shape).transpose(1, 2, 3, 0) - centre) * spacing
    vol = np.exp(-0.5 * (((mm - blob_mm) / 4.0) ** 2).sum(-1)).astype(np.float32)  # isotropic 4 mm blob
    out = _affine_only().augment(torch.from_numpy(vol)[None, None], _params(angles=(0, 0, 0.25)), _gen())
    a = 0.25  # right-handed about x: y -> cos y - sin z, z -> sin y + cos z
    want_mm = np.array([np.sin(a) * 16.0, np.cos(a) * 16.0, 0.0])
    got_mm = (_centroid(out[0, 0].numpy()) - centre) * spacing
    np.testing.assert_allclose(got_mm, want_mm, atol=0.3)


def test_folded_resize_equals_resize_volume():
    x = torch.rand(2, 3, 8, 32, 32, generator=_gen())
    out = VolumeAugmenter(AugmentConfig(**IDENTITY))(x, _gen(), out_size=(6, 24, 20))
    torch.testing.assert_close(out, resize_volume(x, (6, 24, 20)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "out_size",
    [(16, 16, 16), (10, 28, 36), (16, 24, 12), (6, 40, 16)],
    ids=["depth-up", "in-plane-up", "depth-up-in-plane-down", "mixed"],
)
def test_folded_upsample_equals_resize_volume(out_size):
    """Upsampling: the outermost output voxels clamp to the edge voxel like F.interpolate, no zero padding."""
    x = torch.rand(2, 3, 10, 16, 16, generator=_gen())
    out = VolumeAugmenter(AugmentConfig(**IDENTITY))(x, _gen(), out_size=out_size)
    torch.testing.assert_close(out, resize_volume(x, out_size), atol=1e-5, rtol=0)


def test_augment_batch_upsampled_edges_match_validation():
    """The audit's case: uniform brain tissue (window 0 -> 0.5), 40 -> 64 slices and 32 -> 48 in-plane."""
    cfg = DataConfig(num_slices=64, augment=AugmentConfig(**IDENTITY))
    hu = torch.full((1, 40, 32, 32), 40, dtype=torch.int16)
    train = augment_batch(hu, cfg, _gen(), train=True, out_size=(64, 48, 48))
    val = augment_batch(hu, cfg, _gen(), train=False, out_size=(64, 48, 48))
    torch.testing.assert_close(train, val, atol=1e-5, rtol=0)
    torch.testing.assert_close(train[:, 0], torch.full_like(train[:, 0], 0.5), atol=1e-6, rtol=0)


def test_downsampling_grid_is_plain_affine_grid():
    aug = _affine_only()
    params = _params(angles=(0.2, -0.1, 0.05), scales=(1.1, 0.9, 1.0), flips=(1, -1, 1))
    theta = sampling_theta(params, (8, 32, 32), aug.spacing_zyx)
    for out_size in [(8, 32, 32), (6, 24, 20)]:
        grid = aug.sampling_grid(params, (8, 32, 32), out_size, _gen())
        assert torch.equal(grid, F.affine_grid(theta, [1, 1, *out_size], align_corners=False))


def test_upsampling_keeps_air_outside_the_field_of_view():
    """Edge clamping only affects the identity grid: rotated or shrunk content still brings zeros in."""
    x = torch.ones(1, 1, 8, 32, 32)
    aug = _affine_only()
    ident = aug.augment(x, _params(), _gen(), out_size=(12, 48, 48))
    torch.testing.assert_close(ident, torch.ones_like(ident), atol=1e-6, rtol=0)  # no zeros at the border
    rot = aug.augment(x, _params(angles=(0.3, 0, 0)), _gen(), out_size=(12, 48, 48))[0, 0]
    corners = rot[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.abs().max() < 1e-6  # rotated in-plane: the corners sample outside the input
    assert rot[:, 24, 24].min() > 0.999 and rot[:, 0, 24].min() > 0.999  # mid-edge stays inside
    shrunk = aug.augment(x, _params(scales=(0.6, 0.6, 0.6)), _gen(), out_size=(12, 48, 48))[0, 0]
    # shrunk content: the border slices and columns are air
    assert shrunk[0].abs().max() < 1e-6 and shrunk[:, :, 0].abs().max() < 1e-6
    assert shrunk[6, 24, 24] > 0.999


def test_elastic_keeps_constant_interior_and_coarse_field_matches_full_resolution():
    cfg = AugmentConfig(**{**IDENTITY, "elastic_alpha": (200.0, 200.0)})
    x = torch.full((2, 1, 16, 48, 48), 0.5)
    out = VolumeAugmenter(cfg, elastic_coarse=1)(x, _gen())
    torch.testing.assert_close(out[..., 4:12, 12:36, 12:36], x[..., 4:12, 12:36, 12:36], atol=1e-5, rtol=0)
    params = VolumeAugmenter(cfg).sample_params(4, _gen())
    params.elastic_alpha.fill_(1.0)
    size = (16, 96, 96)
    std = {f: elastic_displacement(params, size, size, f, _gen()).std().item() for f in (1, 3)}
    assert std[1] > 0 and abs(std[3] / std[1] - 1) < 0.15, std


def test_elastic_moves_structure():
    vol = torch.from_numpy(_smooth_volume((16, 48, 48), sigma=1.0))[None, None].repeat(2, 1, 1, 1, 1)
    cfg = AugmentConfig(**{**IDENTITY, "elastic_alpha": (200.0, 200.0)})
    out = VolumeAugmenter(cfg)(vol, _gen())
    assert (out - vol).abs().mean() > 1e-3


# ---- randomness ---------------------------------------------------------------------------------------------


def test_same_seed_same_output_other_seed_differs():
    x = torch.rand(2, 3, 8, 32, 32, generator=_gen())
    aug = VolumeAugmenter()
    a, b, c = aug(x, _gen(7)), aug(x, _gen(7)), aug(x, _gen(8))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_volumes_get_different_params():
    aug = VolumeAugmenter()
    p = aug.sample_params(4, _gen())
    for name, v in vars(p).items():
        assert v.shape[0] == 4 and len({tuple(np.atleast_1d(r.numpy()).tolist()) for r in v}) > 1, name
    x = torch.rand(1, 3, 8, 32, 32, generator=_gen()).repeat(3, 1, 1, 1, 1)
    out = aug(x, _gen())
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_param_ranges_and_output_plausible():
    cfg = AugmentConfig()
    p = VolumeAugmenter(cfg).sample_params(256, _gen())
    assert p.angles_zyx.abs().max() <= cfg.rotate
    assert p.scales_zyx.min() >= cfg.scale[0] and p.scales_zyx.max() <= cfg.scale[1]
    assert set(p.flips_zyx.unique().tolist()) == {-1.0, 1.0}
    assert p.noise_std.max() ** 2 <= cfg.noise_variance[1] + 1e-7
    hu = torch.randint(-1000, 1500, (2, 8, 32, 32), generator=_gen(), dtype=torch.int16)
    out = augment_batch(hu, DataConfig(), _gen(), train=True)
    assert out.shape == (2, 3, 8, 32, 32) and torch.isfinite(out).all()
    assert out.min() > -1.5 and out.max() < 2.5 and 0.0 < out.mean() < 1.0


def test_augment_batch_num_slices_and_dtypes():
    hu = torch.randint(-1000, 2000, (2, 8, 32, 32), generator=_gen(), dtype=torch.int16)
    cfg = DataConfig(num_slices=6)
    assert augment_batch(hu, cfg, _gen(), train=True).shape == (2, 3, 6, 32, 32)
    assert augment_batch(hu, cfg, _gen(), train=False).shape == (2, 3, 6, 32, 32)
    assert augment_batch(hu, cfg, _gen(), train=True, out_size=(4, 16, 16)).shape == (2, 3, 4, 16, 16)
    x64 = torch.rand(1, 3, 8, 16, 16, dtype=torch.float64)
    assert VolumeAugmenter()(x64, _gen()).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_seed_and_cpu_generator_is_accepted():
    x = torch.rand(2, 3, 8, 32, 32, device="cuda")
    aug = VolumeAugmenter()
    a, b = aug(x, _gen(3)), aug(x, _gen(3))  # CPU generator seeds a CUDA one
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    half = aug(x.half(), torch.Generator(device="cuda").manual_seed(3))
    assert half.dtype == torch.float16 and half.is_cuda
    same = VolumeAugmenter(AugmentConfig(**IDENTITY))(x.bfloat16(), _gen())
    torch.testing.assert_close(same, x.bfloat16())
