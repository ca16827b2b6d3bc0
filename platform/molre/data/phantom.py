"""Procedural non-contrast head CT anatomy: the normal head that every finding is planted into.

Coordinates. Voxel (k, j, i) of a ``[D,H,W]`` volume sits at grid position p = (x, y, z) mm with the field of view
centred on 0 (x along columns towards the patient's left, y along rows towards posterior, z along slices towards
superior: DICOM LPS, as ``dicom_write`` writes it). The head has its own frame h = R (p - c), a small random
rotation R and offset c per study: X towards the left, Y posterior, Z superior, origin near the centre of the
cranial cavity (level of the basal ganglia). Anatomical positions below are head-frame mm for an average head and
are multiplied by the patient's size factor.

Building a head is two passes: a ``uint8`` tissue label per voxel (``Tissue``), then HU from the labels plus a
smooth texture. Findings change the anatomy parameters before the labels are drawn (``Anatomy``: ventricle size,
midline shift, effaced sulci...) or edit the HU afterwards (``molre.data.lesions``). Every shape is evaluated only
inside its bounding box, so a 40x256x256 head costs well under a second of vectorised numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy import ndimage

FOV_MM = (160.0, 240.0, 240.0)  # cranio-caudal, antero-posterior, left-right field of view (z, y, x)
SIDES = (-1, 1)  # -1: patient right (-X), +1: patient left (+X)


class Tissue(IntEnum):
    AIR = 0
    SCALP = 1
    BONE = 2  # cortical bone: inner/outer tables, skull base
    DIPLOE = 3  # cancellous bone between the tables
    CSF = 4  # extra-axial CSF: convexity rim, interhemispheric fissure
    SULCUS = 5
    GREY = 6
    WHITE = 7
    DEEP_GREY = 8  # caudate, lentiform nucleus, thalamus
    INSULA = 9
    VENTRICLE = 10
    CISTERN = 11  # basal cisterns, Sylvian fissures, cisterna magna, spinal canal
    CEREBELLUM = 12
    FOLIA = 13  # CSF between cerebellar folia
    BRAINSTEM = 14
    DURA = 15  # falx, tentorium
    VENOUS = 16  # dural venous sinuses
    VESSEL = 17  # arteries (basilar, MCA, ICA)
    PITUITARY = 18
    CORD = 19
    SOFT = 20  # face and neck soft tissue, extraocular muscles
    FAT = 21  # orbital fat
    GLOBE = 22
    LENS = 23
    SINUS_AIR = 24  # paranasal sinuses
    NASAL_AIR = 25
    MASTOID_AIR = 26
    SEPTUM = 27  # nasal septum


# Nominal densities (HU); each patient gets a jittered copy (``sample_anatomy``).
NOMINAL_HU: dict[Tissue, float] = {
    Tissue.AIR: -1000,
    Tissue.SCALP: 25,  # skin, galea and a little fat
    Tissue.BONE: 1450,
    Tissue.DIPLOE: 650,
    Tissue.CSF: 5,
    Tissue.SULCUS: 5,
    Tissue.GREY: 40,
    Tissue.WHITE: 28,
    Tissue.DEEP_GREY: 37,
    Tissue.INSULA: 40,
    Tissue.VENTRICLE: 4,
    Tissue.CISTERN: 5,
    Tissue.CEREBELLUM: 37,
    Tissue.FOLIA: 6,
    Tissue.BRAINSTEM: 33,
    Tissue.DURA: 50,
    Tissue.VENOUS: 45,
    Tissue.VESSEL: 45,
    Tissue.PITUITARY: 45,
    Tissue.CORD: 33,
    Tissue.SOFT: 45,
    Tissue.FAT: -90,
    Tissue.GLOBE: 10,
    Tissue.LENS: 95,
    Tissue.SINUS_AIR: -1000,
    Tissue.NASAL_AIR: -1000,
    Tissue.MASTOID_AIR: -900,  # air cells with thin septa
    Tissue.SEPTUM: 350,  # bone and cartilage
}
# Amplitude (HU) of the smooth texture field per tissue: parenchyma is almost flat, diploe is trabecular.
TEXTURE_HU = {
    Tissue.GREY: 1.5,
    Tissue.WHITE: 1.2,
    Tissue.DEEP_GREY: 1.5,
    Tissue.CEREBELLUM: 1.5,
    Tissue.BRAINSTEM: 1.0,
    Tissue.SCALP: 6.0,
    Tissue.SOFT: 5.0,
    Tissue.FAT: 8.0,
    Tissue.BONE: 80.0,
    Tissue.DIPLOE: 180.0,
    Tissue.MASTOID_AIR: 120.0,
}

PARENCHYMA = (Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY, Tissue.INSULA, Tissue.CEREBELLUM, Tissue.BRAINSTEM)
CEREBRUM = (Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY, Tissue.INSULA)
CSF_SPACES = (Tissue.CSF, Tissue.SULCUS, Tissue.VENTRICLE, Tissue.CISTERN, Tissue.FOLIA)
INTRACRANIAL = (
    PARENCHYMA + CSF_SPACES + (Tissue.DURA, Tissue.VENOUS, Tissue.VESSEL, Tissue.PITUITARY, Tissue.CORD)
)
SKULL = (Tissue.BONE, Tissue.DIPLOE)


def tissue_lut(tissues) -> np.ndarray:
    """A boolean lookup table: ``tissue_lut(PARENCHYMA)[labels]`` is the parenchyma mask."""
    table = np.zeros(256, dtype=bool)
    table[[int(t) for t in tissues]] = True
    return table


def ramp(v, lo: float, hi: float):
    """0 below ``lo``, 1 above ``hi``, linear between (a cheap smooth step)."""
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class Displacement:
    """A smooth left-right displacement of brain structures, peaking at (y, z) with widths (sy, sz), in mm."""

    amp_mm: float
    y: float
    z: float
    sy: float
    sz: float

    def at(self, Y, Z):
        return self.amp_mm * np.exp(-0.5 * (((Y - self.y) / self.sy) ** 2 + ((Z - self.z) / self.sz) ** 2))


@dataclass
class Effacement:
    """Sulci narrowed by ``strength`` (0..1) within ``half_angle_deg`` of a direction from the head centre."""

    direction: tuple[float, float, float]
    half_angle_deg: float
    strength: float


@dataclass
class Anatomy:
    """Patient shape and the anatomy-level effects of findings; all lengths in mm for an average head."""

    size: float = 1.0  # head size factor, multiplies every position
    aspect: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-axis skull shape factor (X, Y, Z)
    skull_mm: float = 7.0
    table_mm: float = 2.0  # each of the inner and outer tables
    scalp_mm: float = 5.0
    base_mm: float = 8.0  # skull base thickness under the cranial fossae
    csf_rim_mm: float = 1.5  # convexity subarachnoid space
    cortex_mm: float = 3.0
    sulcal_width: float = 0.20  # |G| below this is sulcal CSF (G: unit-variance smooth field, ~1.5 mm sulci)
    sulcal_depth_mm: float = 14.0
    fissure_mm: float = 1.5  # half width of the interhemispheric fissure
    folia_width: float = 0.16
    cerebellar_rim_mm: float = 0.0  # extra CSF around the cerebellum (cerebellar atrophy)
    ventricles: float = 1.0  # global ventricular size
    lateral: list[float] = field(default_factory=lambda: [1.0, 1.0])  # per side (right, left)
    temporal_horns: float = 1.0
    third: float = 1.0
    fourth: float = 1.0
    sylvian: float = 1.0
    cisterns: float = 1.0  # basal cisterns; < 1 effaced
    uncal_side: int = 0  # a medial temporal lobe filling the ambient/suprasellar cistern on this side
    brainstem_shift_mm: float = 0.0
    brainstem_squeeze: float = 1.0
    cisterna_magna: float = 1.0
    tonsil_descent_mm: float = 0.0  # cerebellar tonsils below the foramen magnum
    tonsil_peg: bool = False  # narrow, pointed tonsils (Chiari I) instead of rounded ones
    shifts: list[Displacement] = field(default_factory=list)
    falx_bow: list[Displacement] = field(default_factory=list)
    effacements: list[Effacement] = field(default_factory=list)
    global_effacement: float = 0.0
    cavum_mm: float = 0.0  # width of a cavum septum pellucidum
    septal_deviation_mm: float = 0.0
    globe_forward_mm: list[float] = field(default_factory=lambda: [0.0, 0.0])
    hu: dict[Tissue, float] = field(default_factory=lambda: dict(NOMINAL_HU))

    def p(self, x: float, y: float, z: float) -> np.ndarray:
        """An average-head landmark scaled to this patient."""
        return np.array([x, y, z], dtype=np.float64) * self.size

    @property
    def inner_semi(self) -> tuple[float, float, float, float]:
        """Inner-table semi-axes: X, Y, Z above the centre, Z below (the lower half is longer: face and neck)."""
        ax, ay, az = self.aspect
        s = self.size
        return 68.0 * s * ax, 86.0 * s * ay, 70.0 * s * az, 110.0 * s * az


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random normal adult head: size, skull shape and thickness, ventricles, tissue densities."""
    grey = rng.uniform(37.0, 42.0)
    hu = dict(NOMINAL_HU)
    hu.update(
        {
            Tissue.GREY: grey,
            Tissue.INSULA: grey,
            Tissue.WHITE: grey - rng.uniform(10.0, 13.0),  # grey-white contrast ~ 10-13 HU
            Tissue.DEEP_GREY: grey - rng.uniform(2.0, 5.0),
            Tissue.CEREBELLUM: grey - rng.uniform(2.0, 4.0),
            Tissue.CSF: (csf := rng.uniform(2.0, 8.0)),
            Tissue.SULCUS: csf,
            Tissue.VENTRICLE: csf - 1.0,
            Tissue.CISTERN: csf,
            Tissue.FOLIA: csf + 1.0,
            Tissue.BONE: rng.uniform(1250.0, 1650.0),
            Tissue.DIPLOE: rng.uniform(450.0, 800.0),
            Tissue.SCALP: rng.uniform(15.0, 35.0),
            Tissue.VENOUS: rng.uniform(40.0, 48.0),
        }
    )
    ventricles = rng.uniform(0.85, 1.15)
    return Anatomy(
        size=rng.uniform(0.93, 1.05),
        aspect=tuple(rng.uniform(0.96, 1.04, size=3)),
        skull_mm=rng.uniform(5.5, 8.5),
        table_mm=rng.uniform(1.6, 2.3),
        scalp_mm=rng.uniform(4.0, 6.5),
        csf_rim_mm=rng.uniform(1.0, 1.8),
        cortex_mm=rng.uniform(2.6, 3.4),
        sulcal_width=rng.uniform(0.16, 0.22),
        sulcal_depth_mm=rng.uniform(12.0, 16.0),
        fissure_mm=rng.uniform(1.0, 1.8),
        ventricles=ventricles,
        lateral=[rng.uniform(0.95, 1.05), rng.uniform(0.95, 1.05)],
        hu=hu,
    )


@dataclass(frozen=True)
class Pose:
    rotation: np.ndarray  # 3x3, head frame = rotation @ (grid - centre)
    centre: np.ndarray  # head origin in grid mm (x, y, z)


def sample_pose(rng: np.random.Generator) -> Pose:
    """Positioning in the gantry: yaw +-5 deg, pitch (flexion) +-7 deg, roll +-4 deg, offsets of a few mm."""
    yaw, pitch, roll = np.deg2rad(rng.uniform([-5, -7, -4], [5, 7, 4]))
    rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]])
    ry = np.array([[math.cos(roll), 0, math.sin(roll)], [0, 1, 0], [-math.sin(roll), 0, math.cos(roll)]])
    # z: the cavity centre sits 76 mm above the bottom of a 160 mm FOV (vertex skin ~82 mm above it)
    centre = np.array([rng.uniform(-6, 6), rng.uniform(-6, 6), -FOV_MM[0] / 2 + 76 + rng.uniform(-3, 3)])
    return Pose(rotation=rz @ rx @ ry, centre=centre)


def smooth_field(rng: np.random.Generator, shape, spacing_zyx, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_mm``, made on a ~3 mm grid."""
    dz, dy, dx = spacing_zyx
    step = max(1, round(3.0 / dx))  # in-plane coarsening factor
    coarse_shape = (shape[0], -(-shape[1] // step), -(-shape[2] // step))
    noise = rng.standard_normal(coarse_shape, dtype=np.float32)
    sigma = (sigma_mm / dz, sigma_mm / (dy * step), sigma_mm / (dx * step))
    noise = ndimage.gaussian_filter(noise, sigma, mode="wrap")
    noise /= noise.std() + 1e-6
    return _upsample_linear(noise, shape)


def _upsample_linear(coarse: np.ndarray, shape) -> np.ndarray:
    """Separable linear interpolation of the last two axes to ``shape`` (10x faster than ndimage.zoom)."""
    out = coarse
    for axis in (1, 2):
        n_in, n_out = out.shape[axis], shape[axis]
        if n_in == n_out:
            continue
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = [1, 1, 1]
        w[axis] = n_out
        frac = (pos - i0).astype(np.float32).reshape(w)
        out = np.take(out, i0, axis=axis) * (1 - frac) + np.take(out, i1, axis=axis) * frac
    return out


Slices = tuple[slice, slice, slice]


class Head:
    """Head-frame coordinates of every voxel, the tissue labels and (after ``finish_hu``) the HU volume."""

    def __init__(
        self, shape, spacing_zyx, anatomy: Anatomy, pose: Pose, sulci: np.ndarray, texture: np.ndarray
    ):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing_zyx)
        self.anatomy, self.pose = anatomy, pose
        self.sulci, self.texture = sulci, texture  # smooth unit-variance fields (gyral pattern, texture)
        # the smallest lesion radius that survives the grid
        self.min_mm = 0.75 * max(self.spacing[1], self.spacing[2])
        grid = [(np.arange(n) + 0.5) * d - n * d / 2 for n, d in zip(self.shape, self.spacing, strict=True)]
        self._grid_z, self._grid_y, self._grid_x = grid
        c, r = pose.centre, pose.rotation
        px, py, pz = grid[2] - c[0], grid[1] - c[1], grid[0] - c[2]
        self.X, self.Y, self.Z = (self._rotated(r[i], px, py, pz) for i in range(3))
        self._xb: np.ndarray | None = None
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self.hu: np.ndarray | None = None
        self.findings: frozenset[str] = frozenset()  # set by the renderer; planters see their companions
        self.t: np.ndarray  # signed distance outwards from the inner table along the ray from the centre (mm)
        self.depth: np.ndarray  # distance into the cranial cavity from its wall (vault or base); < 0 outside
        self.cavity: np.ndarray  # the cranial cavity (and spinal canal)

    @staticmethod
    def _rotated(row, px, py, pz) -> np.ndarray:
        along_x = (row[0] * px).astype(np.float32)[None, None, :]
        along_y = (row[1] * py).astype(np.float32)[None, :, None]
        along_z = (row[2] * pz).astype(np.float32)[:, None, None]
        return along_x + along_y + along_z

    @property
    def Xb(self) -> np.ndarray:
        """Brain X: X minus the midline-shift displacement, used for deep structures (falx stays put)."""
        if self._xb is None:
            if self.anatomy.shifts:
                disp = sum(d.at(self.Y, self.Z) for d in self.anatomy.shifts)
                self._xb = (self.X - disp).astype(np.float32)
            else:
                self._xb = self.X
        return self._xb

    def shifted(self, point) -> np.ndarray:
        """Where a deep-brain landmark (``Xb`` coordinates) lies in the head frame after midline shift."""
        x, y, z = point
        return np.array([x + sum(float(d.at(y, z)) for d in self.anatomy.shifts), y, z])

    # ---- regions ----
    def box(self, lo, hi) -> Slices | None:
        """Grid slices covering the head-frame box [lo, hi] (mm); None when it misses the volume."""
        lo, hi = np.clip(lo, -400, 400), np.clip(hi, -400, 400)
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        grid_xyz = corners @ self.pose.rotation + self.pose.centre  # rotation.T @ h + c, row-wise
        out = []
        for axis, coord in ((0, 2), (1, 1), (2, 0)):
            n, d = self.shape[axis], self.spacing[axis]
            idx = (grid_xyz[:, coord] + n * d / 2) / d - 0.5
            start, stop = max(0, int(math.floor(idx.min()))), min(n, int(math.ceil(idx.max())) + 1)
            if start >= stop:
                return None
            out.append(slice(start, stop))
        return tuple(out)

    def around(self, centre, half) -> Slices | None:
        c, h = np.asarray(centre, float), np.broadcast_to(np.asarray(half, float), (3,))
        return self.box(c - h, c + h)

    def coords(self, s: Slices, brain: bool = False):
        return (self.Xb if brain else self.X)[s], self.Y[s], self.Z[s]

    def ellipsoid_norm(self, s: Slices, centre, semi, brain: bool = False, axes: np.ndarray | None = None):
        """Squared ellipsoid norm (< 1 inside) on the box ``s``; ``axes`` rows are the ellipsoid's axis directions."""
        X, Y, Z = self.coords(s, brain)
        dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
        if axes is not None:
            dx, dy, dz = (axes[i, 0] * dx + axes[i, 1] * dy + axes[i, 2] * dz for i in range(3))
        return (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2

    def ellipsoid(self, centre, semi, brain: bool = False, axes: np.ndarray | None = None):
        """(slices, mask) of an ellipsoid; (None, None) when it misses the volume."""
        s = self.around(centre, max(semi) if axes is not None else semi)
        if s is None:
            return None, None
        return s, self.ellipsoid_norm(s, centre, semi, brain, axes) < 1.0

    def capsule_distance(self, s: Slices, p0, p1, brain: bool = False):
        """Distance (mm) from each voxel of box ``s`` to the segment p0-p1."""
        X, Y, Z = self.coords(s, brain)
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        seg = p1 - p0
        f = np.clip(
            ((X - p0[0]) * seg[0] + (Y - p0[1]) * seg[1] + (Z - p0[2]) * seg[2]) / (seg @ seg + 1e-9), 0, 1
        )
        return np.sqrt(
            (X - p0[0] - f * seg[0]) ** 2 + (Y - p0[1] - f * seg[1]) ** 2 + (Z - p0[2] - f * seg[2]) ** 2
        )

    def capsule(self, p0, p1, radius: float, brain: bool = False):
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        s = self.box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        if s is None:
            return None, None
        return s, self.capsule_distance(s, p0, p1, brain) < radius

    def is_(self, s: Slices, tissues) -> np.ndarray:
        return tissue_lut(tissues)[self.labels[s]]

    def paint(self, s: Slices | None, mask, tissue: Tissue, only=None) -> None:
        """Label ``mask`` (within box ``s``) as ``tissue``; ``only`` restricts it to voxels now of those tissues."""
        if s is None:
            return
        if only is not None:
            mask = mask & self.is_(s, only)
        np.putmask(self.labels[s], mask, np.uint8(tissue))

    def table_radius(self, u) -> float:
        """Distance from the head centre to the inner table along unit direction ``u``."""
        bx, by, bzu, bzl = self.anatomy.inner_semi
        bz = bzu if u[2] > 0 else bzl
        return 1.0 / math.sqrt((u[0] / bx) ** 2 + (u[1] / by) ** 2 + (u[2] / bz) ** 2)

    # ---- HU ----
    def finish_hu(self) -> None:
        """HU from the labels plus the per-tissue texture (call once, after the labels are final)."""
        base = np.zeros(256, dtype=np.float32)
        amp = np.zeros(256, dtype=np.float32)
        for tissue, value in self.anatomy.hu.items():
            base[int(tissue)] = value
        for tissue, value in TEXTURE_HU.items():
            amp[int(tissue)] = value
        self.hu = np.take(base, self.labels) + np.take(amp, self.labels) * self.texture


# ---------------------------------------------------------------------------------------------------------------
# Rasterising the normal head (with the anatomy-level effects of findings already in ``Anatomy``)
# ---------------------------------------------------------------------------------------------------------------


def build_head(shape, spacing_zyx, anatomy: Anatomy, pose: Pose, rng: np.random.Generator) -> Head:
    """Draw the tissue labels of one head (the HU come from ``Head.finish_hu``)."""
    sulci = smooth_field(rng, shape, spacing_zyx, sigma_mm=5.0)  # zero-crossings every ~12 mm: gyri
    texture = smooth_field(rng, shape, spacing_zyx, sigma_mm=2.0)
    head = Head(shape, spacing_zyx, anatomy, pose, sulci, texture)
    _vault(head)
    _skull_base(head)
    _cerebrum(head)
    _midline(head)
    _posterior_fossa(head)
    _basal_cisterns(head)
    _deep_structures(head)
    _vessels_and_sinuses(head)
    _face(head)
    return head


def _vault(head: Head) -> None:
    """Scalp, skull tables and diploe as shells outside the inner-table ellipsoid; the cavity inside it."""
    a = head.anatomy
    X, Y, Z = head.X, head.Y, head.Z
    bx, by, bzu, bzl = a.inner_semi
    bz = np.where(Z > 0, np.float32(bzu), np.float32(bzl))
    rho = np.sqrt((X / bx) ** 2 + (Y / by) ** 2 + (Z / bz) ** 2)
    r = np.sqrt(X * X + Y * Y + Z * Z)
    head.t = r - r / np.maximum(rho, 1e-6)  # r - R_surface along the ray: < 0 inside the inner table
    t, labels = head.t, head.labels
    labels[t < a.skull_mm + a.scalp_mm] = Tissue.SCALP
    labels[t < a.skull_mm] = Tissue.BONE
    labels[(t >= a.table_mm) & (t < a.skull_mm - a.table_mm)] = Tissue.DIPLOE
    head.cavity = t < 0
    labels[head.cavity] = Tissue.WHITE
    head.depth = -t


def floor_height(a: Anatomy, X, Y):
    """Head-frame Z (mm) of the cranial floor: anterior fossa -20, sella -30 (pit -37), middle fossa -45,
    posterior fossa a bowl from -64 at the foramen magnum, which is open below."""
    s = a.size
    x, y = np.abs(X) / s, Y / s
    central = 1.0 - ramp(x, 16, 24)  # the sella / clivus strip between the middle fossae
    z_front = -20.0 - 6.0 * (1.0 - ramp(x, 6, 12))  # cribriform plate dips 6 mm at the midline
    z_mid = -45.0 + 15.0 * central
    toward_mid = ramp(y, -40, -30)
    toward_post = central * ramp(y, -8, 14) + (1 - central) * ramp(y, 6, 18)  # clivus, petrous ridges
    z_post = np.minimum(-64.0 + 0.008 * x * x + 0.008 * (y - 28) ** 2, -40.0)  # a bowl around the foramen
    z = (z_front * (1 - toward_mid) + z_mid * toward_mid) * (1 - toward_post) + z_post * toward_post
    z -= 7.0 * np.clip(1 - (X / (7 * s)) ** 2 - ((Y + 16 * s) / (6 * s)) ** 2, 0, 1)  # sella turcica
    foramen = (X / (14 * s)) ** 2 + ((Y - 28 * s) / (16 * s)) ** 2 < 1
    return np.where(foramen, -1000.0, z * s).astype(np.float32)


def _skull_base(head: Head) -> None:
    """Bone under the cranial floor; below it the face and neck (soft tissue, the skull shell turns soft)."""
    a = head.anatomy
    s = head.box((-200, -200, -300), (200, 200, -12 * a.size))
    if s is None:
        return
    X, Y, Z = head.coords(s)
    floor = floor_height(a, X, Y)
    labels, cavity = head.labels[s], head.cavity[s]
    below = floor > Z
    inside = head.t[s] < 0
    base_bone = below & (floor - a.base_mm <= Z) & inside
    deep = below & (floor - a.base_mm > Z)
    np.putmask(labels, deep & (inside | tissue_lut(SKULL)[labels]), np.uint8(Tissue.SOFT))
    np.putmask(labels, base_bone, np.uint8(Tissue.BONE))
    cavity &= ~below
    depth = head.depth[s]
    np.minimum(depth, Z - floor, out=depth)
    # spinal canal below the foramen magnum: CSF around the cord
    canal = cavity & (floor < -900) & (-60 * a.size > Z)
    np.putmask(labels, canal, np.uint8(Tissue.CISTERN))


def sulcal_width_field(head: Head, s: Slices):
    """|G| threshold for sulcal CSF on box ``s``: atrophy widens it, swelling and effacement narrow it."""
    a = head.anatomy
    width = a.sulcal_width * (1.0 - a.global_effacement)
    if not a.effacements:
        return width
    X, Y, Z = head.coords(s)
    r = np.sqrt(X * X + Y * Y + Z * Z) + 1e-3
    factor = np.ones_like(r)
    for e in a.effacements:
        u = np.asarray(e.direction, float) / np.linalg.norm(e.direction)
        cos_to = (X * u[0] + Y * u[1] + Z * u[2]) / r
        inside = ramp(
            cos_to, math.cos(math.radians(e.half_angle_deg)), math.cos(math.radians(0.7 * e.half_angle_deg))
        )
        factor *= 1.0 - e.strength * inside
    return width * factor


def _cerebrum(head: Head) -> None:
    """Cortical ribbon, sulci (level sets of the gyral field) and the convexity CSF rim."""
    a = head.anatomy
    full = (slice(None),) * 3
    depth, cavity, labels = head.depth, head.cavity, head.labels
    width = sulcal_width_field(head, full)
    rim = (
        a.csf_rim_mm * (1.0 - a.global_effacement)
        if not a.effacements
        else a.csf_rim_mm * (width / a.sulcal_width)
    )
    shallow = cavity & (depth < a.sulcal_depth_mm)
    g = np.abs(head.sulci)
    # |G| < width + 0.5: the ~2.5 mm of cortex lining each sulcus (|grad G| ~ 0.25 per mm)
    np.putmask(labels, shallow & ((depth < rim + a.cortex_mm) | (g < width + 0.5)), np.uint8(Tissue.GREY))
    np.putmask(labels, shallow & (g < width), np.uint8(Tissue.SULCUS))
    np.putmask(labels, cavity & (depth < rim), np.uint8(Tissue.CSF))


def falx_edge(a: Anatomy, Y):
    """Z (mm) of the falx's free lower edge: arching over the corpus callosum, descending to the tentorium."""
    y = Y / a.size
    return (np.where(y < 20, 28 - 0.004 * y * y, 26.4 - 1.17 * (y - 20)) * a.size).astype(np.float32)


def falx_x(a: Anatomy, Y, Z):
    """X of the falx: 0, except where subfalcine herniation bows its lower part."""
    if not a.falx_bow:
        return 0.0
    return sum(d.at(Y, Z) for d in a.falx_bow)


def _midline(head: Head) -> None:
    """Interhemispheric fissure: medial cortex, CSF and the falx (dura)."""
    a = head.anatomy
    s = head.box((-14, -120, -60), (14, 120, 120))
    if s is None:
        return
    X, Y, Z = head.coords(s)
    dist = np.abs(X - falx_x(a, Y, Z))
    edge = falx_edge(a, Y)
    above = head.cavity[s] & (edge - 2 < Z) & head.is_(s, CEREBRUM + (Tissue.SULCUS,))
    head.paint(s, above & (dist < a.fissure_mm + a.cortex_mm), Tissue.GREY)
    head.paint(s, above & (dist < a.fissure_mm), Tissue.CSF)
    half = max(0.6, 0.55 * head.spacing[2])  # a 1.2 mm membrane, kept at least a voxel thick
    head.paint(s, head.cavity[s] & (edge < Z) & (dist < half), Tissue.DURA)


def tentorium_height(a: Anatomy, X, Y):
    """Z (mm) of the tentorium: -14 at the incisura sloping to about -32 at the occipital inner table."""
    x, y = X / a.size, Y / a.size
    return ((-14.0 - 0.30 * (y - 10) - 0.004 * x * x) * a.size).astype(np.float32)


def _posterior_fossa(head: Head) -> None:
    """Cerebellum with folia, tentorium, brainstem, fourth ventricle, cisterna magna, tonsils."""
    a, sz = head.anatomy, head.anatomy.size
    s = head.box((-80, 5 * sz, -200), (80, 120, 10))
    if s is None:
        return
    X, Y, Z = head.coords(s)
    tent = tentorium_height(a, X, Y)
    cavity = head.cavity[s]
    fossa = cavity & (10 * sz < Y) & (tent > Z) & head.is_(s, CEREBRUM + (Tissue.SULCUS,))
    rim = max(a.csf_rim_mm, a.cerebellar_rim_mm)
    head.paint(s, fossa & (head.depth[s] < rim), Tissue.CSF)
    infra = fossa & (head.depth[s] >= rim)
    head.paint(s, infra, Tissue.CEREBELLUM)
    head.paint(s, infra & (np.abs(head.texture[s]) < a.folia_width), Tissue.FOLIA)
    notch = (np.abs(X) < 13 * sz) & (36 * sz > Y)
    head.paint(s, cavity & (8 * sz < Y) & (np.abs(Z - tent) < 0.7) & ~notch, Tissue.DURA)
    for side in SIDES:  # cerebellar white matter core
        head.paint(
            *head.ellipsoid(a.p(side * 18, 46, -44), a.p(7, 9, 6)), Tissue.WHITE, only=(Tissue.CEREBELLUM,)
        )
    # cisterna magna behind the vermis
    cm = a.cisterna_magna
    head.paint(
        *head.ellipsoid(a.p(0, 58 + 2 * (cm - 1), -58), a.p(12 * cm, 8 * cm, 7 * cm)),
        Tissue.CISTERN,
        only=INTRACRANIAL,
    )
    _brainstem(head)
    fourth = a.fourth * (0.5 if a.tonsil_descent_mm > 0 and not a.tonsil_peg else 1.0)
    head.paint(
        *head.ellipsoid(a.p(0, 28, -40), a.p(5 * fourth, 3.5 * fourth, 6)),
        Tissue.VENTRICLE,
        only=INTRACRANIAL,
    )
    _tonsils(head)


def brainstem_axis(a: Anatomy) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Centres and semi-axes of the midbrain and pons, and the medulla/cord capsule ends."""
    dx = a.brainstem_shift_mm
    sq = a.brainstem_squeeze
    return {
        "midbrain": (a.p(0, 13, -18) + [dx, 0, 0], a.p(10 * sq, 9, 8)),
        "pons": (a.p(0, 16, -40) + [dx * 0.6, 0, 0], a.p(12 * sq, 11, 12)),
        "medulla": (a.p(0, 20, -52) + [dx * 0.3, 0, 0], a.p(0, 28, -100)),
    }


def _brainstem(head: Head) -> None:
    a = head.anatomy
    parts = brainstem_axis(a)
    for name in ("midbrain", "pons"):
        centre, semi = parts[name]
        head.paint(*head.ellipsoid(centre, semi), Tissue.BRAINSTEM, only=INTRACRANIAL)
    top, bottom = parts["medulla"]
    s, mask = head.capsule(top, bottom, 7.5 * a.size)
    head.paint(s, mask, Tissue.BRAINSTEM, only=INTRACRANIAL)
    s, mask = head.capsule(a.p(0, 28, -62), a.p(0, 28, -100), 5.5 * a.size)
    head.paint(s, mask, Tissue.CORD, only=INTRACRANIAL)


def _tonsils(head: Head) -> None:
    """Cerebellar tonsils pushed through the foramen magnum (tonsillar herniation, Chiari I)."""
    a = head.anatomy
    if a.tonsil_descent_mm <= 0:
        return
    sz = a.size
    floor = -64 * sz
    half_x = (4.0 if a.tonsil_peg else 8.0) * sz
    s = head.box((-12 * sz, 20 * sz, floor - a.tonsil_descent_mm - 2), (12 * sz, 46 * sz, floor + 6))
    if s is None:
        return
    X, Y, Z = head.coords(s)
    frac = np.clip((floor + 4 - Z) / (a.tonsil_descent_mm + 4), 0, 1)  # 0 at the foramen, 1 at the tip
    taper = np.sqrt(1 - frac) if a.tonsil_peg else np.sqrt(1 - frac**2)
    tonsil = (np.abs(X) < half_x * taper + 0.5) & (31 * sz < Y) & (floor - a.tonsil_descent_mm < Z)
    head.paint(s, tonsil, Tissue.CEREBELLUM, only=(Tissue.CISTERN,))


def _basal_cisterns(head: Head) -> None:
    """Suprasellar, ambient, quadrigeminal and prepontine cisterns, Sylvian fissures, the pituitary."""
    a, c = head.anatomy, head.anatomy.cisterns
    parts = brainstem_axis(a)
    cisterns = [
        (a.p(0, -10, -20), a.p(14, 11, 5)),  # suprasellar
        (parts["midbrain"][0], a.p(14, 13, 7)),  # ambient: a ring, the midbrain is already drawn
        (a.p(0, 27, -12), a.p(7, 5, 5)),  # quadrigeminal
        (a.p(0, 2, -42), a.p(9, 4, 13)),  # prepontine
    ]
    for centre, semi in cisterns:
        head.paint(*head.ellipsoid(centre, semi * np.array([c, c, c])), Tissue.CISTERN, only=CEREBRUM)
    if a.uncal_side:  # the medial temporal lobe fills the ipsilateral half of the cisterns
        for centre, semi in cisterns[:2]:
            s, mask = head.ellipsoid(centre, semi)
            if s is not None:
                head.paint(s, mask & (head.X[s] * a.uncal_side > 1.5), Tissue.GREY, only=(Tissue.CISTERN,))
    head.paint(*head.ellipsoid(a.p(0, -16, -33.5), a.p(6, 5, 3.5)), Tissue.PITUITARY, only=INTRACRANIAL)
    for side in SIDES:
        syl = a.sylvian
        head.paint(
            *head.ellipsoid(a.p(side * 35, -6, -2), a.p(3, 16, 14), brain=True), Tissue.INSULA, only=CEREBRUM
        )
        head.paint(
            *head.ellipsoid(a.p(side * (38.5 + syl), -6, -4), a.p(1.8 * syl, 20, 9), brain=True),
            Tissue.CISTERN,
            only=CEREBRUM,
        )


def ventricle_parts(a: Anatomy) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """(name, side, centre, semi-axes) of every ventricle ellipsoid, in brain (``Xb``) coordinates."""
    s, v = a.size, a.ventricles
    septum = 1.2 + a.cavum_mm / 2  # half the septum pellucidum (or cavum) width
    parts = []
    for side in SIDES:
        lat = v * a.lateral[(side + 1) // 2]
        grow_z, grow_y = 1 + 0.6 * (lat - 1), 1 + 0.25 * (lat - 1)
        fh = np.array([6.0 * lat, 11 * grow_y, 8.0 * grow_z]) * s
        body = np.array([5.5 * lat, 26 * grow_y, 6.5 * grow_z]) * s
        atrium = np.array([7.5 * lat, 12 * grow_y, 8.0 * grow_z]) * s
        horn = np.array([2.5, 13.0, 3.0]) * s * a.temporal_horns * v
        parts += [
            ("frontal_horn", side, np.array([side * (septum * s + fh[0]), -26 * s, 14 * s]), fh),
            ("body", side, np.array([side * (septum * s + body[0]), -2 * s, 20 * s]), body),
            ("atrium", side, np.array([side * (10 * s + atrium[0]), 26 * s, 12 * s]), atrium),
            ("temporal_horn", side, np.array([side * 30.0, 0.0, -18.0]) * s, horn),
        ]
    third = np.array([2.5 * a.third * v, 12, 8]) * s
    parts.append(("third", 0, np.array([0.0, -2.0, -4.0]) * s, third))
    return parts


def deep_grey_parts(a: Anatomy) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """(name, side, centre, semi) of the caudate heads, lentiform nuclei and thalami (brain coordinates)."""
    s, v = a.size, a.ventricles
    septum = 1.2 + a.cavum_mm / 2
    parts = []
    for side in SIDES:
        fh_x = 6.0 * v * a.lateral[(side + 1) // 2]
        parts += [
            (
                "caudate",
                side,
                np.array([side * (septum + 2 * fh_x + 3), -20, 13]) * s,
                np.array([4, 7, 7]) * s,
            ),
            ("lentiform", side, np.array([side * 23, -4, 2]) * s, np.array([5.5, 12, 9]) * s),
            (
                "thalamus",
                side,
                np.array([side * (2.5 * a.third * v + 8), 10, 3]) * s,
                np.array([7, 11, 8]) * s,
            ),
        ]
    return parts


def _deep_structures(head: Head) -> None:
    """Deep grey nuclei, ventricles, cavum septi; all follow the midline shift (``Xb``)."""
    a = head.anatomy
    for _, _, centre, semi in deep_grey_parts(a):
        head.paint(*head.ellipsoid(centre, semi, brain=True), Tissue.DEEP_GREY, only=CEREBRUM)
    for _, _, centre, semi in ventricle_parts(a):
        head.paint(*head.ellipsoid(centre, semi, brain=True), Tissue.VENTRICLE, only=INTRACRANIAL)
    if a.cavum_mm > 0:
        semi = a.p(a.cavum_mm / 2, 15, 6)
        head.paint(*head.ellipsoid(a.p(0, -16, 15), semi, brain=True), Tissue.CSF, only=INTRACRANIAL)


def vessel_paths(a: Anatomy) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Normal arteries as capsules (start, end, radius mm): basilar, middle cerebral (M1), internal carotids."""
    paths = {"basilar": (a.p(0, 3.5, -60), a.p(0, 3.5, -22), 1.5 * a.size)}
    for side, name in ((-1, "right"), (1, "left")):
        paths[f"mca_{name}"] = (a.p(side * 4, -10, -16), a.p(side * 36, -7, -10), 1.4 * a.size)
        paths[f"ica_{name}"] = (a.p(side * 13, -17, -40), a.p(side * 12, -13, -22), 2.0 * a.size)
    return paths


def _vessels_and_sinuses(head: Head) -> None:
    a = head.anatomy
    for p0, p1, radius in vessel_paths(a).values():
        head.paint(*head.capsule(p0, p1, radius), Tissue.VESSEL, only=INTRACRANIAL)
    # superior sagittal sinus: a triangle under the vault along the falx attachment (base 9 mm, 7 mm deep)
    s = head.box((-8, -120, -10), (8, 120, 120))
    if s is not None:
        X, Y, Z = head.coords(s)
        d = head.depth[s]
        tri = head.cavity[s] & (Z > 0) & (d < 7) & (np.abs(X - falx_x(a, Y, Z)) < 4.5 * (1 - d / 7))
        head.paint(s, tri, Tissue.VENOUS)
    # transverse sinuses along the tentorium's attachment to the occipital inner table
    s = head.box((-90, 20, -70), (90, 120, 0))
    if s is not None:
        X, Y, Z = head.coords(s)
        along = np.abs(Z - tentorium_height(a, X, Y)) < 3.5 * a.size
        head.paint(s, head.cavity[s] & along & (head.depth[s] < 5.5) & (25 * a.size < Y), Tissue.VENOUS)
    head.paint(
        *head.capsule(a.p(0, 30, -12), a.p(0, 68, -30), 2.5 * a.size), Tissue.VENOUS, only=INTRACRANIAL
    )


def sinus_parts(a: Anatomy) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Air cavities outside the cranium: (centre, semi) of each paranasal sinus and mastoid."""
    bx_base = a.inner_semi[0] * math.sqrt(1 - (48 / 110) ** 2)  # inner table half-width at the mastoid level
    parts = {
        "frontal_right": (a.p(-9, -89, 4), a.p(7.5, 3.2, 9)),
        "frontal_left": (a.p(9, -89, 4), a.p(7.5, 3.2, 9)),
        "sphenoid": (a.p(0, -20, -47), a.p(11, 9, 7.5)),
        "ethmoid": (a.p(0, -64, -33), a.p(8, 14, 8)),
    }
    for side, name in ((-1, "right"), (1, "left")):
        parts[f"maxillary_{name}"] = (a.p(side * 27, -62, -60), a.p(12, 15, 13))
        parts[f"mastoid_{name}"] = (
            np.array([side * (bx_base + 4), 22 * a.size, -50 * a.size]),
            a.p(8, 11, 10),
        )
    return parts


def globe_centre(a: Anatomy, side: int) -> np.ndarray:
    return a.p(side * 31, -80, -30) - [0, a.globe_forward_mm[(side + 1) // 2], 0]


def _face(head: Head) -> None:
    """Orbits (fat, globes, lenses, muscles, optic nerves), sinuses with bony walls, nasal cavity, mastoids."""
    a, s = head.anatomy, head.anatomy.size
    outside = tuple(t for t in Tissue if t not in INTRACRANIAL and t != Tissue.AIR)
    soft = (Tissue.SOFT, Tissue.SCALP, Tissue.BONE, Tissue.DIPLOE)
    for side in SIDES:
        head.paint(*head.ellipsoid(a.p(side * 30, -64, -30), a.p(16, 22, 14)), Tissue.BONE, only=outside)
        head.paint(*head.ellipsoid(a.p(side * 30, -64, -30), a.p(14, 20, 12)), Tissue.FAT, only=outside)
        globe = globe_centre(a, side)
        head.paint(*head.capsule(globe, a.p(side * 14, -44, -32), 2.0 * s), Tissue.SOFT, only=(Tissue.FAT,))
        for dx in (-11, 11):
            p0, p1 = a.p(side * 31 + dx, -76, -30), a.p(side * 16 + dx / 3, -46, -31)
            head.paint(*head.capsule(p0, p1, 2.2 * s), Tissue.SOFT, only=(Tissue.FAT,))
        eye = outside + (Tissue.AIR,)  # a proptotic globe bulges out of the face
        head.paint(*head.ellipsoid(globe, a.p(11.5, 11.5, 11.5)), Tissue.GLOBE, only=eye)
        head.paint(*head.ellipsoid(globe - a.p(0, 9.5, 0), a.p(4.5, 1.8, 4.5)), Tissue.LENS, only=eye)
    sinuses = sinus_parts(a)
    for centre, semi in sinuses.values():
        head.paint(*head.ellipsoid(centre, semi + 2.0 * s), Tissue.BONE, only=soft)  # ~2 mm bony wall
    head.paint(*head.ellipsoid(a.p(0, -88, 4), a.p(22, 6, 14)), Tissue.BONE, only=soft)  # thick frontal bone
    _nasal_cavity(head)
    for name, (centre, semi) in sinuses.items():
        tissue = Tissue.MASTOID_AIR if name.startswith("mastoid") else Tissue.SINUS_AIR
        s_box, mask = head.ellipsoid(centre, semi)
        if s_box is None:
            continue
        if name.startswith(("mastoid", "ethmoid")):  # honeycomb of air cells with bony septa
            mask = mask & (head.texture[s_box] > -0.9)
        head.paint(s_box, mask, tissue, only=(Tissue.BONE, Tissue.DIPLOE, Tissue.SOFT, Tissue.FAT))
    # C1 ring around the spinal canal at the bottom of the field of view
    sb = head.box(a.p(-24, 4, -200), a.p(24, 54, -68))
    if sb is not None:
        X, Y, _ = head.coords(sb)
        ring = ((X / (22 * s)) ** 2 + ((Y - 28 * s) / (24 * s)) ** 2 < 1) & ~head.cavity[sb]
        head.paint(sb, ring, Tissue.BONE)
        head.paint(*head.capsule(a.p(0, 8, -68), a.p(0, 8, -200), 5 * s), Tissue.BONE, only=(Tissue.SOFT,))


def _nasal_cavity(head: Head) -> None:
    """Nasal airway with the septum (deviated by ``septal_deviation_mm``) and inferior turbinates."""
    a, s = head.anatomy, head.anatomy.size
    centre, semi = a.p(0, -70, -62), a.p(10, 22, 13)
    sb, mask = head.ellipsoid(centre, semi)
    if sb is None:
        return
    head.paint(sb, mask, Tissue.NASAL_AIR, only=(Tissue.SOFT, Tissue.BONE, Tissue.DIPLOE))
    X, Y, Z = head.coords(sb)
    # C-shaped deviation: largest at the middle of the septum, zero at its ends
    bend = a.septal_deviation_mm * np.clip(
        1 - ((Y - centre[1]) / semi[1]) ** 2 - ((Z - centre[2]) / semi[2]) ** 2, 0, 1
    )
    head.paint(sb, mask & (np.abs(X - bend) < 1.0 * s), Tissue.SEPTUM)
    for side in SIDES:
        head.paint(
            *head.capsule(a.p(side * 8, -84, -67), a.p(side * 8, -54, -66), 3.5 * s),
            Tissue.SOFT,
            only=(Tissue.NASAL_AIR,),
        )
