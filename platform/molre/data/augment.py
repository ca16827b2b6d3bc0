"""HU windowing and the paper's augmentations, batched on the training device (torch only).

Volumes are ``[B, C, D, H, W]`` with axes (z, y, x); ``spacing_zyx`` is the voxel size in mm, default
``(4, 1, 1)`` (4 mm slices, 1 mm in-plane). Pipeline for a training batch (``augment_batch``):

    int16 HU [B,D,H,W] --window_hu--> [B,3,D,H,W] in 0..1 --VolumeAugmenter--> [B,3,D',H',W'] (augmented, resized)

The spatial part of ``VolumeAugmenter`` is ONE sampling grid per batch and ONE ``grid_sample`` call:

- resize folded in: the output grid ``[D',H',W']`` spans the input's physical box (``align_corners=False``). Along an
  axis where the output is larger than the input, the identity grid is first clamped to the input's outermost voxel
  centres, ``+-(1 - 1/n_in)`` normalised (what ``F.interpolate``'s source-index clamp amounts to), so the outermost
  output voxels repeat the edge voxel instead of mixing in the zero padding; ``theta`` then maps the clamped grid
  and the elastic displacement is added. Identity parameters thus give ``resize_volume`` (trilinear
  ``F.interpolate``) up to float error, upsampling or downsampling; a downsampled axis needs no clamp, and with no
  upsampled axis the grid is ``F.affine_grid``'s as before. Content moved out of the field of view still reads 0.
- affine, in physical space (mm, origin at the volume centre): the content moves ``p -> T p`` with ``T = R S F``:
  F flips each axis with ``flip_prob``, S scales each axis by ``U(scale)`` (anisotropic, > 1 enlarges content),
  R = Rz Ry Rx rotates by ``U(-rotate, rotate)`` about each axis (right-handed). Spacing enters through
  ``theta = E^-1 T^-1 E`` with ``E = diag(half extent in mm)``, so a rotation out of the axial plane is a true
  rotation of the anatomy, not of the anisotropic voxel grid.
- elastic (MONAI ``Rand3DElastic`` / batchgenerators convention): a noise field ``U(-1, 1)`` per axis, smoothed by
  a Gaussian of ``sigma ~ U(elastic_sigma)`` and scaled by ``alpha ~ U(elastic_alpha)``. Both sigma and alpha are in
  *voxels of the input grid* (as in MONAI and batchgenerators), so along z they are 4x longer in mm. The field is a
  pull displacement added in the source frame: output voxel ``n`` samples the input at ``theta n + u(n)``.
  Cost: the smoothing runs on a grid ``f``x coarser per axis (``f = floor(min sigma / 3)``, 3 for sigma 10..13) with
  ``sigma / f`` and noise amplitude ``f^-3/2`` (same covariance as full-resolution smoothing), then is upsampled
  trilinearly; that is ~f^4 = 81x less work than smoothing at full resolution. ``elastic_coarse=1`` gives the
  exact full-resolution field. The separable Gaussian is three grouped ``conv3d`` calls (one kernel per volume).
- intensity after the warp: multiply by ``U(brightness)``, add Gaussian noise of variance ``U(noise_variance)``
  (drawn per volume). Values are not clipped back into 0..1. Outside the field of view is 0 (air in every window).

Random draws: small per-volume parameters come from the caller's ``generator``; the large tensors (elastic noise,
intensity noise) from a generator on the data's device, seeded from ``generator`` when the two devices differ, so
the same seed gives the same output on a given device and nothing large crosses the bus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molre.config import AugmentConfig, DataConfig

__all__ = [
    "AugmentParams",
    "VolumeAugmenter",
    "augment_batch",
    "elastic_displacement",
    "resize_volume",
    "sampling_theta",
    "window_hu",
]

Size3 = tuple[int, int, int]


def host_to_device(t: Tensor, device) -> Tensor:
    """A small host tensor on ``device``. On CUDA it goes through page-locked memory: a copy from pageable
    memory may wait for the stream to drain (CUDA's API sync rules), which would stall the host every step."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def window_hu(hu: Tensor, windows, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B,D,H,W]`` HU (int16 or float) -> ``[B,len(windows),D,H,W]``, channel k = clamp((hu-lo_k)/(hi_k-lo_k), 0, 1)."""
    if hu.ndim != 4:
        raise ValueError(f"window_hu expects HU volumes [B,D,H,W], got shape {tuple(hu.shape)}")
    bounds = torch.as_tensor(windows, dtype=torch.float32)  # [C, 2] on the host: validation never syncs a GPU
    if bounds.ndim != 2 or bounds.shape[1] != 2 or bool((bounds[:, 1] <= bounds[:, 0]).any()):
        raise ValueError(f"windows must be (lo, hi) pairs with hi > lo, got {windows!r}")
    lo = host_to_device(bounds[:, 0].view(1, -1, 1, 1, 1), hu.device)
    width = host_to_device((bounds[:, 1] - bounds[:, 0]).view(1, -1, 1, 1, 1), hu.device)
    out = ((hu.unsqueeze(1).float() - lo) / width).clamp_(0.0, 1.0)  # float32 keeps HU exact
    return out.to(dtype)


def resize_volume(x: Tensor, size_dhw) -> Tensor:
    """Trilinear resample of ``[B,C,D,H,W]`` to ``size_dhw`` over the same physical box; no-op when equal."""
    size = tuple(int(s) for s in size_dhw)
    if tuple(x.shape[-3:]) == size:
        return x
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


@dataclass
class AugmentParams:
    """Per-volume random parameters, all ``[B, ...]`` on the data's device (axis order z, y, x)."""

    angles_zyx: Tensor  # [B,3] radians about the z, y, x axes
    scales_zyx: Tensor  # [B,3] content scale per axis
    flips_zyx: Tensor  # [B,3] +1 keep / -1 mirror
    elastic_alpha: Tensor  # [B] voxels
    elastic_sigma: Tensor  # [B] voxels
    brightness: Tensor  # [B] multiplicative
    noise_std: Tensor  # [B] sqrt of the drawn variance


# ---- affine -------------------------------------------------------------------------------------------------


def _rotation_xyz(angles_zyx: Tensor) -> Tensor:
    """``[B,3]`` angles about (z, y, x) -> ``[B,3,3]`` R = Rz Ry Rx acting on (x, y, z) column vectors."""
    az, ay, ax = angles_zyx.unbind(-1)
    one, zero = torch.ones_like(az), torch.zeros_like(az)

    def mat(rows):  # 3x3 nested lists of [B] -> [B,3,3]
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    cz, sz, cy, sy, cx, sx = az.cos(), az.sin(), ay.cos(), ay.sin(), ax.cos(), ax.sin()
    rz = mat([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rx = mat([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    return rz @ ry @ rx


def sampling_theta(params: AugmentParams, in_size_dhw: Size3, spacing_zyx) -> Tensor:
    """``[B,3,4]`` for ``F.affine_grid``: normalised output (x,y,z) -> normalised input, inverse of T = R S F in mm."""
    rot = _rotation_xyz(params.angles_zyx.float())  # [B,3,3]
    inv_scale = torch.diag_embed(1.0 / params.scales_zyx.float().flip(-1))  # S^-1, xyz order
    flip = torch.diag_embed(params.flips_zyx.float().flip(-1))  # F^-1 = F
    t_inv = flip @ inv_scale @ rot.transpose(-1, -2)  # T^-1 = F S^-1 R^T   [B,3,3]
    extent = [n * s / 2.0 for n, s in zip(in_size_dhw, spacing_zyx, strict=True)][::-1]  # half box mm, xyz
    ratio = torch.tensor([[extent[j] / extent[i] for j in range(3)] for i in range(3)])  # (E^-1 . E)[i, j]
    theta3 = t_inv * host_to_device(ratio, t_inv.device)  # E^-1 T^-1 E   [B,3,3]
    return torch.cat([theta3, theta3.new_zeros(theta3.shape[0], 3, 1)], dim=-1)


# ---- elastic ------------------------------------------------------------------------------------------------


def _gaussian_taps(sigma: Tensor, radius: int) -> Tensor:
    """``[N]`` sigmas -> ``[N, 2*radius+1]`` normalised Gaussian taps on a common support."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    taps = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return taps / taps.sum(dim=1, keepdim=True)


def _smooth_separable(field: Tensor, sigma_axes: Tensor, radius_axes: Size3) -> Tensor:
    """Gaussian-smooth ``[B,3,d,h,w]`` with per-volume sigmas ``[B,3]`` (one per spatial axis, z y x), zero padded.

    Three grouped ``conv3d`` calls (kernel 2r+1 along one axis), one group per (volume, component). The radii are
    host integers (3 x the largest sigma allowed), so nothing syncs with the device and kernel shapes are static.
    """
    b, c = field.shape[:2]
    flat = field.reshape(1, b * c, *field.shape[2:])
    for axis, radius in enumerate(radius_axes):
        taps = _gaussian_taps(sigma_axes[:, axis].repeat_interleave(c), radius).to(field.dtype)  # [B*3, 2r+1]
        shape, pad = [1, 1, 1], [0, 0, 0]
        shape[axis], pad[axis] = 2 * radius + 1, radius
        flat = F.conv3d(flat, taps.view(b * c, 1, *shape), padding=tuple(pad), groups=b * c)
    return flat.view_as(field)


def _coarse_size(in_size: Size3, factor: int) -> Size3:
    return tuple(max(1, round(n / factor)) for n in in_size)


def elastic_displacement(
    params: AugmentParams,
    in_size_dhw: Size3,
    out_size_dhw: Size3,
    factor: int,
    generator: torch.Generator,
    sigma_max: float | None = None,
) -> Tensor:
    """``[B,Do,Ho,Wo,3]`` displacement in normalised (x,y,z) units: alpha * Gaussian_sigma(U(-1,1)), in voxels.

    Smoothed on a grid ``factor``x coarser per axis (sigma / f, amplitude f^-3/2), then trilinearly upsampled.
    ``sigma_max`` (voxels) sets the kernel support, 3 sigma; None reads it from ``params`` (a device sync).
    """
    b, device = params.elastic_sigma.shape[0], params.elastic_sigma.device
    coarse = _coarse_size(in_size_dhw, factor)
    f_eff = [n / m for n, m in zip(in_size_dhw, coarse, strict=True)]  # input voxels per coarse voxel, zyx
    # channels ordered (x, y, z) like the grid's last dim
    noise = torch.rand((b, 3, *coarse), generator=generator, device=device, dtype=torch.float32) * 2 - 1
    noise = noise / math.sqrt(math.prod(f_eff))  # white-noise variance scales with 1 / (coarse voxel volume)
    sigma = params.elastic_sigma.float()
    sigma_axes = torch.stack([sigma / f for f in f_eff], dim=1)  # [B,3] coarse voxels, zyx
    sigma_max = float(params.elastic_sigma.max()) if sigma_max is None else float(sigma_max)
    radii = tuple(
        max(1, math.ceil(3.0 * sigma_max * m / n)) for n, m in zip(in_size_dhw, coarse, strict=True)
    )
    field = _smooth_separable(noise, sigma_axes, radii)  # [B,3,d,h,w], voxels (per unit alpha)
    field = resize_volume(field, out_size_dhw)  # [B,3,Do,Ho,Wo]
    alpha = params.elastic_alpha.float()  # voxels -> normalised units: x 2/N per axis, (x, y, z) order
    scale = torch.stack([alpha * (2.0 / n) for n in in_size_dhw[::-1]], dim=1)  # [B,3]
    return field.mul_(scale.view(b, 3, 1, 1, 1)).permute(0, 2, 3, 4, 1)


# ---- the augmenter ------------------------------------------------------------------------------------------


def _affine_grid_edge_clamped(theta: Tensor, in_size: Size3, out_size: Size3) -> Tensor:
    """``F.affine_grid(theta, out_size)`` with the identity grid clamped, along each axis where the output is
    larger than the input, to the input's outermost voxel centres ``+-(1 - 1/n_in)`` before ``theta`` acts.

    ``F.interpolate`` (trilinear, ``align_corners=False``) clamps its source index to ``[0, n_in - 1]``; without the
    clamp an upsampled grid's outermost points fall in the outer half voxel, where ``grid_sample``'s zero padding
    pulls them towards 0 (a uniform 0.5 volume, 40 -> 64 slices: edge slices 0.406). With no upsampled axis this
    is ``F.affine_grid`` itself, bit for bit. ``theta`` has no translation (``sampling_theta``).
    """
    b = theta.shape[0]
    up = [
        (axis, n_in) for axis, (n_in, n_out) in enumerate(zip(in_size, out_size, strict=True)) if n_out > n_in
    ]
    if not up:
        return F.affine_grid(theta, [b, 1, *out_size], align_corners=False)
    eye = torch.eye(3, 4, device=theta.device, dtype=theta.dtype).unsqueeze(0)
    base = F.affine_grid(eye, [1, 1, *out_size], align_corners=False)  # [1,Do,Ho,Wo,3], (x, y, z)
    for axis, n_in in up:  # axis in (z, y, x) order -> grid component 2 - axis
        edge = 1.0 - 1.0 / n_in
        base[..., 2 - axis].clamp_(-edge, edge)
    grid = base.view(1, -1, 3) @ theta[:, :, :3].transpose(1, 2)  # [B,Do*Ho*Wo,3]
    return grid.view(b, *out_size, 3)


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The caller's generator if it lives on ``device``, else a fresh one there seeded from it."""
    gdev = torch.device(generator.device)
    if gdev.type == device.type and (gdev.index or 0) == (device.index or 0):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _warp_dtype(x: Tensor) -> torch.dtype:
    """float32 on CPU; the data's dtype on GPU, except bf16 (an 8-bit mantissa is too coarse for grid coordinates)."""
    if x.dtype == torch.float64 or (x.is_cuda and x.dtype == torch.float16):
        return x.dtype
    return torch.float32


def _uniform(lo_hi, shape, generator: torch.Generator) -> Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return torch.rand(shape, generator=generator, device=generator.device) * (hi - lo) + lo


class VolumeAugmenter(nn.Module):
    """The paper's augmentations for windowed ``[B,C,D,H,W]`` batches, one ``grid_sample`` per call.

    ``augmenter(x, generator)`` -> augmented ``x``; ``out_size`` folds a resize into the same warp. ``eval()`` or
    ``cfg.enabled=False`` makes it the identity (plus the resize when ``out_size`` is given). Parameter-free.
    """

    def __init__(
        self, cfg: AugmentConfig | None = None, spacing_zyx=(4.0, 1.0, 1.0), elastic_coarse: int | None = None
    ):
        super().__init__()
        self.cfg = cfg if cfg is not None else AugmentConfig()
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        auto = max(1, int(self.cfg.elastic_sigma[0] // 3))  # coarse sigma stays >= 3 coarse voxels
        self.elastic_coarse = auto if elastic_coarse is None else int(elastic_coarse)
        if self.elastic_coarse < 1:
            raise ValueError(f"elastic_coarse must be >= 1, got {elastic_coarse}")

    @property
    def active(self) -> bool:
        return self.training and self.cfg.enabled

    def sample_params(self, batch: int, generator: torch.Generator, device=None) -> AugmentParams:
        """Independent parameters for each of ``batch`` volumes, drawn from ``generator``."""
        c = self.cfg
        b3 = (batch, 3)
        flips = torch.rand(b3, generator=generator, device=generator.device) < c.flip_prob
        params = AugmentParams(
            angles_zyx=_uniform((-c.rotate, c.rotate), b3, generator),
            scales_zyx=_uniform(c.scale, b3, generator),
            flips_zyx=1.0 - 2.0 * flips.float(),
            elastic_alpha=_uniform(c.elastic_alpha, (batch,), generator),
            elastic_sigma=_uniform(c.elastic_sigma, (batch,), generator),
            brightness=_uniform(c.brightness, (batch,), generator),
            noise_std=_uniform(c.noise_variance, (batch,), generator).clamp_(min=0).sqrt_(),
        )
        if device is not None:
            params = AugmentParams(**{k: host_to_device(v, device) for k, v in vars(params).items()})
        return params

    def forward(self, x: Tensor, generator: torch.Generator, out_size=None) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"VolumeAugmenter expects [B,C,D,H,W], got shape {tuple(x.shape)}")
        if not self.active:
            return x if out_size is None else resize_volume(x, out_size)
        params = self.sample_params(x.shape[0], generator, device=x.device)
        return self.augment(x, params, _device_generator(generator, x.device), out_size=out_size)

    def augment(self, x: Tensor, params: AugmentParams, generator: torch.Generator, out_size=None) -> Tensor:
        """Warp ``x`` with ``params`` (one grid, one ``grid_sample``), then brightness and noise.

        ``generator`` must live on ``x.device``; it draws the elastic and intensity noise.
        """
        in_size = tuple(x.shape[-3:])
        out_size = in_size if out_size is None else tuple(int(s) for s in out_size)
        grid = self.sampling_grid(params, in_size, out_size, generator)  # [B,Do,Ho,Wo,3] float32
        work = _warp_dtype(x)
        out = F.grid_sample(
            x.to(work), grid.to(work), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return self._intensity(out, params, generator).to(x.dtype)

    def sampling_grid(self, params: AugmentParams, in_size: Size3, out_size: Size3, generator) -> Tensor:
        """Affine grid + elastic displacement: ``[B,Do,Ho,Wo,3]`` normalised (x,y,z) input coordinates."""
        theta = sampling_theta(params, in_size, self.spacing_zyx)  # [B,3,4]
        grid = _affine_grid_edge_clamped(theta, in_size, out_size)
        if self.cfg.elastic_alpha[1] > 0:
            field = elastic_displacement(
                params, in_size, out_size, self.elastic_coarse, generator, sigma_max=self.cfg.elastic_sigma[1]
            )
            grid.add_(field)  # in place: one [B,Do,Ho,Wo,3] buffer fewer
        return grid

    def _intensity(self, x: Tensor, params: AugmentParams, generator: torch.Generator) -> Tensor:
        """``x * brightness + N(0, std^2)`` per volume, in place on the warped batch."""
        view = (-1,) + (1,) * (x.ndim - 1)
        x.mul_(params.brightness.to(x.dtype).view(view))
        if self.cfg.noise_variance[1] > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x.add_(noise.mul_(params.noise_std.to(x.dtype).view(view)))
        return x


def augment_batch(
    hu_int16: Tensor,
    cfg_data: DataConfig,
    generator: torch.Generator,
    train: bool,
    out_size=None,
    spacing_zyx=(4.0, 1.0, 1.0),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Training-loop entry: ``[B,D,H,W]`` HU -> window -> augment (if ``train``) -> resize -> ``[B,C,D',H',W']``.

    ``out_size`` (D', H', W') defaults to ``(cfg_data.num_slices, H, W)`` when ``num_slices`` is set, else the
    input grid. When augmenting, the resize is folded into the augmentation's single ``grid_sample``.
    """
    x = window_hu(hu_int16, cfg_data.windows, dtype=dtype)  # [B,C,D,H,W]
    if out_size is None and cfg_data.num_slices is not None:
        out_size = (cfg_data.num_slices, *x.shape[-2:])
    if not (train and cfg_data.augment.enabled):
        return x if out_size is None else resize_volume(x, out_size)
    augmenter = VolumeAugmenter(cfg_data.augment, spacing_zyx=spacing_zyx)
    return augmenter(x, generator, out_size=out_size)
