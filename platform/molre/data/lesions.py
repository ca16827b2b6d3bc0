"""Finding generators: how each of the 75 findings is planted into a synthetic head.

Two kinds of generator, both keyed by finding id:

- ``MODIFIERS[fid](anatomy, rng, knobs)`` change the anatomy before it is drawn (ventricle size, midline shift,
  effaced sulci and cisterns, tonsils, a cavum septi...): structural and anatomical-variant findings.
- ``PLANTERS[fid](head, rng, knobs)`` edit the HU of a drawn head (blood, infarcts, fractures, masses, metal...).

A finding with both gets two identically seeded generators, so their first draws (side, site) agree.

Every finding has its own site, size, density and shape so that a model can in principle tell them apart, and they
need different windows: acute blood 55-85 HU (blood window), chronic subdural 8-22 HU and infarcts a few HU below
white matter (stroke/subdural windows), fractures, calcifications, osteoma and metal (bone window), air
(pneumocephalus, sinuses). Densities that depend on contrast (blood, oedema, infarcts) are blended towards their
target by ``knobs.contrast``; physical materials (air, fat, bone, metal, fluid filling an air space) are set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from molre.data.phantom import (
    CEREBRUM,
    CSF_SPACES,
    INTRACRANIAL,
    PARENCHYMA,
    SIDES,
    SKULL,
    Anatomy,
    Displacement,
    Effacement,
    Head,
    Slices,
    Tissue,
    brainstem_axis,
    deep_grey_parts,
    falx_edge,
    falx_x,
    floor_height,
    globe_centre,
    sinus_parts,
    ventricle_parts,
    vessel_paths,
)
from molre.findings import FINDING_IDS


@dataclass(frozen=True)
class Knobs:
    """Difficulty as numbers: lesion size factor, fraction of nominal lesion contrast, image noise sigma (HU)."""

    size: float = 1.0
    contrast: float = 1.0
    noise_hu: float = 5.0
    side: int = 1  # the study's dominant side; lesions follow it 80% of the time so co-occurring ones agree


def knobs_for(difficulty: float, side: int = 1) -> Knobs:
    """difficulty 0: large, full-contrast lesions, 1.5 HU noise; 1: nominal, 5 HU; 2: 70% size, 75% contrast,
    8.5 HU; 3: 55% size, 50% contrast, 12 HU."""
    d = float(difficulty)
    return Knobs(
        size=float(np.clip(1.3 - 0.3 * d, 0.55, 1.6)),
        contrast=float(np.clip(1.25 - 0.25 * d, 0.4, 1.5)),
        noise_hu=max(0.0, 1.5 + 3.5 * d),
        side=side,
    )


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

BLOOD_HU = (58.0, 80.0)  # acute clotted blood


def pick_side(rng: np.random.Generator, k: Knobs) -> int:
    return k.side if rng.random() < 0.8 else -k.side


def size_mm(
    head: Head, rng: np.random.Generator, lo: float, hi: float, k: Knobs, floor: float = 1.0
) -> float:
    """A lesion dimension: uniform lo..hi mm times the size knob and head size, never below the grid's reach."""
    return max(rng.uniform(lo, hi) * k.size * head.anatomy.size, floor * head.min_mm)


def dot(head: Head, radius: float) -> np.ndarray:
    """Semi-axes of a small round lesion, kept at least half a slice tall so a thick slice cannot miss it
    (standing in for the partial-volume blur of a real 4-5 mm slice)."""
    return np.array([radius, radius, max(radius, 0.55 * head.spacing[0])])


def direction(side: int, azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Unit vector from the head centre: azimuth 0 lateral (on ``side``), +90 anterior, -90 posterior."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([side * math.cos(el) * math.cos(az), -math.cos(el) * math.sin(az), math.sin(el)])


def random_axes(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation (rows are the axes)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def blend(head: Head, s: Slices | None, mask, target, k: Knobs, texture_hu: float = 2.0) -> None:
    """Move the HU of ``mask`` towards ``target`` by the contrast knob (plus a little texture)."""
    if s is None or mask is None or not mask.any():
        return
    hu = head.hu[s]
    tgt = np.broadcast_to(np.asarray(target, dtype=np.float32), hu.shape)[mask] if np.ndim(target) else target
    hu[mask] += k.contrast * (tgt + texture_hu * head.texture[s][mask] - hu[mask])


def set_hu(head: Head, s: Slices | None, mask, value: float, texture_hu: float = 0.0) -> None:
    """Set a physical material (air, fat, fluid, bone, metal) regardless of the contrast knob."""
    if s is None or mask is None or not mask.any():
        return
    head.hu[s][mask] = value + texture_hu * head.texture[s][mask]


def cap(head: Head, u: np.ndarray, half_angle_deg: float, reach_mm: float):
    """Box around the inner-table cap on direction ``u``, with each voxel's angle (deg) from ``u``."""
    radius = head.table_radius(u)
    half = radius * math.sin(math.radians(min(half_angle_deg, 80))) + reach_mm + 4
    s = head.around(u * radius, half)
    if s is None:
        return None, None
    X, Y, Z = head.coords(s)
    r = np.sqrt(X * X + Y * Y + Z * Z) + 1e-3
    angle = np.degrees(np.arccos(np.clip((X * u[0] + Y * u[1] + Z * u[2]) / r, -1, 1)))
    return s, angle


def blob(head: Head, rng, centre, radius: float, irregular: float = 0.0, elongation: float = 0.25):
    """An ellipsoid of mean radius ``radius`` with random axes; ``irregular`` ruffles its edge. Returns (s, q)
    with q < 1 inside (q is the squared, perturbed ellipsoid norm)."""
    semi = radius * rng.uniform(1 - elongation, 1 + elongation, size=3)
    axes = random_axes(rng)
    s = head.around(centre, semi.max() * (1 + irregular) + 1)
    if s is None:
        return None, None
    q = head.ellipsoid_norm(s, centre, semi, axes=axes)
    if irregular:
        q = q * (1 + irregular * head.texture[s])
    return s, q


def table_point(head: Head, u: np.ndarray, depth_mm: float = 0.0) -> np.ndarray:
    """The point ``depth_mm`` inside the inner table along ``u`` (negative: outside, in the skull or scalp)."""
    return u * (head.table_radius(u) - depth_mm)


def part(parts, name: str, side: int = 0):
    for entry in parts:
        if entry[0] == name and entry[1] == side:
            return entry[2], entry[3]
    raise KeyError((name, side))


def edema(head: Head, s, inside, around, k: Knobs, drop_hu: float = 8.0) -> None:
    """Vasogenic oedema: white matter in ``around`` but not ``inside`` loses ``drop_hu`` (finger-like, spares cortex)."""
    if s is None:
        return
    ring = around & ~inside & head.is_(s, (Tissue.WHITE, Tissue.DEEP_GREY))
    blend(head, s, ring, head.anatomy.hu[Tissue.WHITE] - drop_hu, k, texture_hu=1.0)


def hematoma(head: Head, rng, k: Knobs, centre, radius: float, edema_mm: float = 3.0, irregular: float = 0.2):
    """Intra-axial blood: a lumpy ovoid of 58-80 HU with an oedema rim, confined to the brain."""
    s, q = blob(head, rng, centre, radius + edema_mm, irregular)
    if s is None:
        return
    scale = (radius / (radius + edema_mm)) ** 2
    brain = head.is_(s, PARENCHYMA + (Tissue.SULCUS, Tissue.FOLIA))
    blood = (q < scale) & brain
    edema(head, s, blood, (q < 1) & brain, k)
    blend(head, s, blood, rng.uniform(*BLOOD_HU), k)


def ventricle_zone(head: Head, margin_mm: float, names=("frontal_horn", "body", "atrium")):
    """(s, mask) of the lateral ventricles grown by ``margin_mm`` (brain coordinates), in one box."""
    sz = head.anatomy.size
    s = head.box((-60 * sz, -60 * sz, -10 * sz), (60 * sz, 60 * sz, 45 * sz))
    mask = np.zeros(head.labels[s].shape, dtype=bool)
    for name, _, centre, semi in ventricle_parts(head.anatomy):
        if name in names:
            mask |= head.ellipsoid_norm(s, centre, semi + margin_mm, brain=True) < 1
    return s, mask


def territory(head: Head, rng, side: int, which: str, k: Knobs, shrink: float = 1.0):
    """(s, mask) of an arterial territory wedge (cerebrum only): a cone from the vessel's origin."""
    a = head.anatomy
    apex, axis, half = {
        "mca": (a.p(side * 12, -4, 4), (side * 1.0, -0.1, 0.35), rng.uniform(28, 38)),
        "aca": (a.p(side * 4, -20, 20), (side * 0.15, -0.55, 0.82), rng.uniform(20, 28)),
        "pca": (a.p(side * 8, 18, -2), (side * 0.35, 0.93, 0.05), rng.uniform(20, 28)),
    }[which]
    axis = np.asarray(axis) / np.linalg.norm(axis)
    half *= shrink * math.sqrt(k.size)
    reach = 110 * a.size
    s = head.box(np.minimum(apex, apex + axis * reach) - 60, np.maximum(apex, apex + axis * reach) + 60)
    X, Y, Z = head.coords(s)
    dx, dy, dz = X - apex[0], Y - apex[1], Z - apex[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
    cone = (dx * axis[0] + dy * axis[1] + dz * axis[2]) / dist > math.cos(math.radians(half))
    mask = cone & (dist > 8 * a.size) & (X * side > 1.0) & head.is_(s, CEREBRUM + (Tissue.SULCUS,))
    return s, mask


def lobar_site(head: Head, rng, side: int, depth_lo: float, depth_hi: float) -> np.ndarray:
    """A point in a cerebral lobe ``depth`` mm under the convexity (frontal, parietal, temporal or occipital)."""
    u = direction(side, rng.uniform(-70, 80), rng.uniform(5, 45))
    return table_point(head, u, rng.uniform(depth_lo, depth_hi) * head.anatomy.size)


def skull_crack(head: Head, rng, centre, u, length_mm: float, restrict=SKULL, fill_hu: float = 40.0):
    """A linear fracture: a thin slab through bone containing the radial direction ``u``."""
    tangent = np.cross(u, rng.standard_normal(3))
    tangent /= np.linalg.norm(tangent)
    normal = np.cross(u, tangent)
    s = head.around(centre, length_mm / 2 + 12)
    if s is None:
        return
    X, Y, Z = head.coords(s)
    dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
    across = np.abs(dx * normal[0] + dy * normal[1] + dz * normal[2])
    along = np.abs(dx * tangent[0] + dy * tangent[1] + dz * tangent[2])
    width = max(1.5, 0.6 * head.spacing[2])  # a 1.5 mm gap, at least ~half a voxel wide
    crack = (across < width / 2) & (along < length_mm / 2) & (np.abs(dx * u[0] + dy * u[1] + dz * u[2]) < 14)
    set_hu(head, s, crack & head.is_(s, restrict), fill_hu)


def fluid_level(head: Head, s, mask, centre_y: float, level: float, value: float) -> None:
    """Fill the dependent (posterior, the patient lies supine) part of an air space with fluid."""
    if s is None:
        return
    set_hu(head, s, mask & (head.Y[s] > centre_y + level), value, texture_hu=2.0)


# ---------------------------------------------------------------------------------------------------------------
# Hemorrhage
# ---------------------------------------------------------------------------------------------------------------

IPH_SUBTYPES = (
    "basal_ganglia_hemorrhage",
    "thalamic_hemorrhage",
    "lobar_hemorrhage",
    "cerebellar_hemorrhage",
    "brainstem_hemorrhage",
)


def plant_intraparenchymal_hemorrhage(head: Head, rng, k: Knobs) -> None:
    """Without a located subtype: a deep white-matter (centrum semiovale) haematoma, 6-11 mm radius."""
    if any(f in head.findings for f in IPH_SUBTYPES):
        return  # the subtype's own haematoma is this finding
    side = pick_side(rng, k)
    centre = head.anatomy.p(side * rng.uniform(20, 28), rng.uniform(-15, 15), rng.uniform(28, 36))
    hematoma(head, rng, k, centre, size_mm(head, rng, 6, 11, k, 1.5), edema_mm=3)


def plant_basal_ganglia_hemorrhage(head: Head, rng, k: Knobs) -> None:
    """Putaminal haematoma, 7-14 mm radius, with oedema."""
    side = pick_side(rng, k)
    centre, _ = part(deep_grey_parts(head.anatomy), "lentiform", side)
    hematoma(head, rng, k, head.shifted(centre), size_mm(head, rng, 7, 14, k, 1.5), edema_mm=3)


def plant_thalamic_hemorrhage(head: Head, rng, k: Knobs) -> None:
    side = pick_side(rng, k)
    centre, _ = part(deep_grey_parts(head.anatomy), "thalamus", side)
    hematoma(head, rng, k, head.shifted(centre), size_mm(head, rng, 5, 9, k, 1.5), edema_mm=2)


def plant_lobar_hemorrhage(head: Head, rng, k: Knobs) -> None:
    """Large irregular cortico-subcortical haematoma, 9-18 mm radius."""
    centre = lobar_site(head, rng, pick_side(rng, k), 14, 22)
    hematoma(head, rng, k, centre, size_mm(head, rng, 9, 18, k, 1.5), edema_mm=4, irregular=0.35)


def plant_cerebellar_hemorrhage(head: Head, rng, k: Knobs) -> None:
    side = pick_side(rng, k)
    centre = head.anatomy.p(side * rng.uniform(16, 26), rng.uniform(44, 54), rng.uniform(-48, -40))
    hematoma(head, rng, k, centre, size_mm(head, rng, 7, 12, k, 1.5), edema_mm=2)


def plant_brainstem_hemorrhage(head: Head, rng, k: Knobs) -> None:
    """Central pontine haematoma, 3.5-6 mm radius."""
    centre, _ = brainstem_axis(head.anatomy)["pons"]
    centre = centre + [rng.uniform(-2, 2), 0, rng.uniform(-4, 4)]
    hematoma(head, rng, k, centre, size_mm(head, rng, 3.5, 6, k, 1.5), edema_mm=1)


def extra_axial(
    head: Head, rng, k: Knobs, u, half_angle: float, thickness: float, shape: float, hu: float, side=None
):
    """A collection hugging the inner table: thickness(angle) = T (1 - (angle/half)^2)^shape.
    shape ~1: biconvex lens (epidural); ~0.3: long crescent (subdural)."""
    s, angle = cap(head, u, half_angle, thickness)
    if s is None:
        return
    profile = thickness * np.clip(1 - (angle / half_angle) ** 2, 0, 1) ** shape
    mask = (head.depth[s] < profile) & head.cavity[s] & head.is_(s, INTRACRANIAL)
    if side is not None:
        mask &= head.X[s] * side > 0
    blend(head, s, mask, hu, k)


def plant_acute_subdural_hematoma(head: Head, rng, k: Knobs) -> None:
    """Crescent along the convexity inner table: 45-65 deg wide, 5-12 mm thick, 55-75 HU, concave inner edge."""
    side = pick_side(rng, k)
    u = direction(side, rng.uniform(-30, 60), rng.uniform(10, 40))
    thick = size_mm(head, rng, 5, 12, k, 2)
    extra_axial(head, rng, k, u, rng.uniform(45, 65), thick, 0.35, rng.uniform(55, 75), side)


def plant_chronic_subdural_hematoma(head: Head, rng, k: Knobs) -> None:
    """Hypodense (8-22 HU) frontoparietal crescent, 8-18 mm thick; bilateral in 40%."""
    side = pick_side(rng, k)
    sides = (side, -side) if rng.random() < 0.4 else (side,)
    for sd in sides:
        u = direction(sd, rng.uniform(20, 70), rng.uniform(15, 45))
        thick = size_mm(head, rng, 8, 18, k, 2)
        extra_axial(head, rng, k, u, rng.uniform(40, 55), thick, 0.4, rng.uniform(8, 22), sd)


def plant_epidural_hematoma(head: Head, rng, k: Knobs) -> None:
    """Biconvex lens, 14-22 deg wide (within sutures), 10-22 mm thick, 60-85 HU, temporoparietal."""
    side = pick_side(rng, k)
    u = direction(side, rng.uniform(-40, 40), rng.uniform(-5, 30))
    thick = size_mm(head, rng, 10, 22, k, 3)
    extra_axial(head, rng, k, u, rng.uniform(14, 22), thick, 1.0, rng.uniform(60, 85))


def plant_subarachnoid_hemorrhage(head: Head, rng, k: Knobs) -> None:
    """Blood (50-70 HU) in CSF spaces: basal cisterns, Sylvian and anterior interhemispheric fissures
    (aneurysmal pattern) or convexity sulci of one region (traumatic pattern)."""
    a = head.anatomy
    hu = rng.uniform(50, 70)
    if rng.random() < 0.5:
        s = head.box(a.p(-55, -45, -50), a.p(55, 35, 5))
        mask = head.is_(s, (Tissue.CISTERN,)) & (head.Z[s] > -58 * a.size)
        blend(head, s, mask, hu, k)
        s = head.box(a.p(-4, -90, -20), a.p(4, -15, 45))
        blend(head, s, head.is_(s, (Tissue.CSF, Tissue.SULCUS)), hu, k)
    else:
        u = direction(pick_side(rng, k), rng.uniform(-50, 80), rng.uniform(10, 50))
        s, angle = cap(head, u, 35, a.sulcal_depth_mm)
        if s is not None:
            mask = (angle < rng.uniform(25, 40)) & head.is_(s, (Tissue.SULCUS, Tissue.CSF))
            blend(head, s, mask, hu, k)


def plant_intraventricular_hemorrhage(head: Head, rng, k: Knobs) -> None:
    """Blood layering in the dependent (posterior) occipital horns, 55-75 HU; sometimes a fourth-ventricle cast."""
    hu = rng.uniform(55, 75)
    side = pick_side(rng, k)
    for sd in (side, -side) if rng.random() < 0.6 else (side,):
        centre, semi = part(ventricle_parts(head.anatomy), "atrium", sd)
        s, mask = head.ellipsoid(centre, semi * 1.1, brain=True)
        if s is None:
            continue
        level = rng.uniform(-0.3, 0.3) * semi[1]
        blend(head, s, mask & head.is_(s, (Tissue.VENTRICLE,)) & (head.Y[s] > centre[1] + level), hu, k)
    if rng.random() < 0.3:
        s, mask = head.ellipsoid(head.anatomy.p(0, 28, -40), head.anatomy.p(6, 4, 7))
        blend(head, s, mask & head.is_(s, (Tissue.VENTRICLE,)), hu, k)


def plant_hemorrhagic_transformation(head: Head, rng, k: Knobs) -> None:
    """An MCA-territory infarct (22-26 HU) with patchy gyral petechial blood (50-65 HU) in its cortex."""
    side = pick_side(rng, k)
    s, mask = territory(head, rng, side, "mca", k, shrink=0.8)
    blend(head, s, mask, head.anatomy.hu[Tissue.WHITE] - rng.uniform(2, 5), k, texture_hu=1.0)
    cortex = mask & head.is_(s, (Tissue.GREY, Tissue.INSULA)) & (head.texture[s] > 0.5)
    blend(head, s, cortex, rng.uniform(50, 65), k)


# ---------------------------------------------------------------------------------------------------------------
# Vascular
# ---------------------------------------------------------------------------------------------------------------


def plant_acute_infarct(head: Head, rng, k: Knobs) -> None:
    """Territorial hypodensity (MCA 60%, ACA 20%, PCA 20%): grey and white both ~3-6 HU under normal white
    matter (lost grey-white differentiation), with the sulci inside swollen shut."""
    side = pick_side(rng, k)
    which = rng.choice(["mca", "aca", "pca"], p=[0.6, 0.2, 0.2])
    s, mask = territory(head, rng, side, str(which), k)
    blend(head, s, mask, head.anatomy.hu[Tissue.WHITE] - rng.uniform(3, 6), k, texture_hu=1.0)


def plant_chronic_infarct(head: Head, rng, k: Knobs) -> None:
    """A smaller, sharply marginated wedge of near-CSF density (8-14 HU), cortex included."""
    side = pick_side(rng, k)
    which = rng.choice(["mca", "aca", "pca"], p=[0.6, 0.2, 0.2])
    s, mask = territory(head, rng, side, str(which), k, shrink=0.6)
    if s is not None:
        mask &= head.depth[s] < 35 * head.anatomy.size  # cortical-subcortical part of the wedge
    blend(head, s, mask, rng.uniform(8, 14), k, texture_hu=1.0)


def modify_chronic_infarct(anatomy: Anatomy, rng, k: Knobs) -> None:
    side = pick_side(rng, k)
    anatomy.lateral[(side + 1) // 2] *= 1.2  # ex vacuo dilatation of the ipsilateral ventricle


def plant_lacunar_infarct(head: Head, rng, k: Knobs) -> None:
    """A 5-12 mm round CSF-like (8-14 HU) hole in the internal capsule, lentiform nucleus, thalamus or corona."""
    a = head.anatomy
    side = pick_side(rng, k)
    site = [(16, 2, 4), (23, -4, 2), (10, 10, 3), (20, -5, 22)][rng.integers(4)]
    centre = head.shifted(a.p(side * site[0], site[1], site[2]) + rng.uniform(-2, 2, 3))
    radius = size_mm(head, rng, 2.5, 6, k, 1.2)
    s, mask = head.ellipsoid(centre, dot(head, radius))
    blend(head, s, mask & head.is_(s, CEREBRUM), rng.uniform(8, 14), k, texture_hu=0.5)


def plant_loss_of_insular_ribbon(head: Head, rng, k: Knobs) -> None:
    """The insular cortex of one side fades to white-matter density (~ -12 HU): subtle, stroke window."""
    side = pick_side(rng, k)
    s, mask = head.ellipsoid(head.anatomy.p(side * 35, -6, -2), head.anatomy.p(6, 18, 16), brain=True)
    if s is not None:
        mask &= head.is_(s, (Tissue.INSULA, Tissue.GREY)) & (head.X[s] * side > 0)
    blend(head, s, mask, head.anatomy.hu[Tissue.WHITE] - 1, k, texture_hu=0.5)


def plant_hyperdense_vessel_sign(head: Head, rng, k: Knobs) -> None:
    """A dense (75-90 HU) middle cerebral artery M1 segment: clot in a 3 mm tube along the Sylvian cistern."""
    side = pick_side(rng, k)
    p0, p1, radius = vessel_paths(head.anatomy)["mca_left" if side > 0 else "mca_right"]
    s, mask = head.capsule(p0, p1, max(radius * 1.2, head.min_mm))
    blend(head, s, mask & head.is_(s, INTRACRANIAL), rng.uniform(75, 90), k, texture_hu=0.5)


def plant_venous_sinus_thrombosis(head: Head, rng, k: Knobs) -> None:
    """Dense (68-85 HU) superior sagittal sinus (55%) or one transverse sinus (45%)."""
    a = head.anatomy
    if rng.random() < 0.55:
        y0 = rng.uniform(-40, 20)
        s = head.box(a.p(-8, y0, -10), a.p(8, 120, 120))
    else:
        side = pick_side(rng, k)
        s = head.box(a.p(min(0, side * 90), 15, -80), a.p(max(0, side * 90), 120, 0))
    if s is not None:
        blend(head, s, head.is_(s, (Tissue.VENOUS,)), rng.uniform(68, 85), k, texture_hu=1.0)


def plant_vascular_malformation(head: Head, rng, k: Knobs) -> None:
    """AVM: a 9-16 mm nidus of serpiginous vessels (55-65 HU) with calcified dots and a draining vein."""
    side = pick_side(rng, k)
    centre = lobar_site(head, rng, side, 12, 25)
    radius = size_mm(head, rng, 9, 16, k, 3)
    s, mask = head.ellipsoid(centre, dot(head, radius))
    if s is None:
        return
    mask &= head.is_(s, PARENCHYMA + CSF_SPACES)
    t = head.texture[s]
    blend(head, s, mask & (np.abs(t) < 0.45), rng.uniform(55, 65), k, texture_hu=1.0)
    set_hu(head, s, mask & (t > 1.9), rng.uniform(160, 260))
    u = centre / np.linalg.norm(centre)
    s2, vein = head.capsule(centre, table_point(head, u, 1.0), max(1.5, head.min_mm))
    blend(head, s2, vein & head.is_(s2, INTRACRANIAL), rng.uniform(55, 65), k)


ANEURYSM_SITES = {  # circle of Willis (mm, average head): ACom, MCA bifurcation, PCom, basilar tip
    "acom": (0, -22, -16),
    "mca": (28, -8, -12),
    "pcom": (11, -13, -20),
    "basilar": (0, 4, -19),
}


def willis_site(head: Head, rng, k: Knobs) -> np.ndarray:
    name = list(ANEURYSM_SITES)[rng.integers(len(ANEURYSM_SITES))]
    x, y, z = ANEURYSM_SITES[name]
    return head.anatomy.p(pick_side(rng, k) * x, y, z)


def plant_aneurysm(head: Head, rng, k: Knobs) -> None:
    """A round 5-12 mm sac (55-68 HU) at the circle of Willis; a calcified rim in 30%."""
    centre = willis_site(head, rng, k)
    radius = size_mm(head, rng, 2.5, 6, k, 1.5)
    s = head.around(centre, radius + 2)
    q = head.ellipsoid_norm(s, centre, dot(head, radius))
    blend(head, s, q < 1, rng.uniform(55, 68), k, texture_hu=0.5)
    if rng.random() < 0.3:
        shell = (q < 1) & (q > (1 - head.min_mm / radius) ** 2)
        set_hu(head, s, shell & (head.texture[s] > 0), rng.uniform(150, 300))


# ---------------------------------------------------------------------------------------------------------------
# Trauma
# ---------------------------------------------------------------------------------------------------------------


def plant_skull_fracture(head: Head, rng, k: Knobs) -> None:
    """Linear vault fracture 30-70 mm long (a ~1.5 mm gap through both tables); depressed in 35%."""
    a = head.anatomy
    side = pick_side(rng, k)
    u = direction(side, rng.uniform(-60, 60), rng.uniform(0, 50))
    centre = table_point(head, u, -a.skull_mm / 2)
    skull_crack(head, rng, centre, u, size_mm(head, rng, 30, 70, k))
    if rng.random() < 0.35:  # depressed fragment pushed 3-6 mm inwards
        half = rng.uniform(7, 11) * math.sqrt(k.size)
        s, angle = cap(head, u, half, a.skull_mm + 8)
        if s is None:
            return
        t = head.t[s]
        depress = rng.uniform(3, 6)
        within = angle < half
        set_hu(head, s, within & (t >= 0) & (t < a.skull_mm), 40.0)
        set_hu(
            head, s, within & (t >= -depress) & (t < a.skull_mm - depress), a.hu[Tissue.BONE], texture_hu=60
        )


def plant_skull_base_fracture(head: Head, rng, k: Knobs) -> None:
    """A crack through the petrous/sphenoid skull base with blood in the sphenoid sinus (fluid level, 40-55 HU)
    or in the mastoid air cells of that side."""
    a = head.anatomy
    side = pick_side(rng, k)
    x, y = side * rng.uniform(18, 40) * a.size, rng.uniform(-20, 12) * a.size
    z = float(floor_height(a, np.float32(x), np.float32(y))) - a.base_mm / 2
    u = np.array([0.0, 0.0, 1.0])
    skull_crack(head, rng, np.array([x, y, z]), u, size_mm(head, rng, 25, 45, k))
    parts = sinus_parts(a)
    if rng.random() < 0.6:
        centre, semi = parts["sphenoid"]
        s, mask = head.ellipsoid(centre, semi)
        if s is not None:
            fluid_level(
                head,
                s,
                mask & head.is_(s, (Tissue.SINUS_AIR,)),
                centre[1],
                rng.uniform(-0.4, 0.3) * semi[1],
                rng.uniform(40, 55),
            )
    else:
        centre, semi = parts["mastoid_left" if side > 0 else "mastoid_right"]
        s, mask = head.ellipsoid(centre, semi)
        if s is not None:
            set_hu(head, s, mask & head.is_(s, (Tissue.MASTOID_AIR,)), rng.uniform(40, 55), texture_hu=3)


def plant_facial_fracture(head: Head, rng, k: Knobs) -> None:
    """A crack through the anterior or lateral maxillary sinus wall with blood in the sinus (fluid level)."""
    a = head.anatomy
    side = pick_side(rng, k)
    centre, semi = sinus_parts(a)["maxillary_left" if side > 0 else "maxillary_right"]
    wall = np.array([0.0, -1.0, 0.0]) if rng.random() < 0.5 else np.array([float(side), 0.0, 0.0])
    point = centre + wall * (semi + 1.0)
    skull_crack(head, rng, point, wall, size_mm(head, rng, 15, 30, k), restrict=(Tissue.BONE,))
    s, mask = head.ellipsoid(centre, semi)
    if s is not None:
        fluid_level(
            head,
            s,
            mask & head.is_(s, (Tissue.SINUS_AIR,)),
            centre[1],
            rng.uniform(-0.3, 0.5) * semi[1],
            rng.uniform(45, 60),
        )


def plant_cerebral_contusion(head: Head, rng, k: Knobs) -> None:
    """Inferior frontal or anterior temporal cortex: an oedematous zone (~22 HU) with punctate blood (55-70 HU)."""
    a = head.anatomy
    side = pick_side(rng, k)
    site = a.p(side * 18, -52, -12) if rng.random() < 0.5 else a.p(side * 44, -25, -32)
    radius = size_mm(head, rng, 8, 13, k, 3)
    s, q = blob(head, rng, site, radius, irregular=0.3)
    if s is None:
        return
    zone = (q < 1) & head.is_(s, CEREBRUM + (Tissue.SULCUS,))
    blend(head, s, zone, a.hu[Tissue.WHITE] - 6, k, texture_hu=1.0)
    blend(head, s, zone & (head.texture[s] > 0.7) & (q < 0.7), rng.uniform(55, 70), k)


def plant_pneumocephalus(head: Head, rng, k: Knobs) -> None:
    """3-8 intracranial air bubbles (-1000 HU) under the frontal inner table; a frontal air crescent in 40%."""
    for _ in range(rng.integers(3, 9)):
        u = direction(1 if rng.random() < 0.5 else -1, rng.uniform(40, 90), rng.uniform(-5, 45))
        centre = table_point(head, u, rng.uniform(1.5, 5))
        radius = size_mm(head, rng, 1.5, 3.5, k, 1.4)
        s, mask = head.ellipsoid(centre, dot(head, radius))
        set_hu(head, s, mask & head.is_(s, INTRACRANIAL) if s is not None else None, -1000.0)
    if rng.random() < 0.4:
        u = np.array([0.0, -0.95, 0.3]) / np.linalg.norm([0.0, -0.95, 0.3])
        s, angle = cap(head, u, 22, 8)
        if s is not None:
            profile = size_mm(head, rng, 3, 6, k, 1.5) * np.clip(1 - (angle / 22) ** 2, 0, 1)
            set_hu(head, s, (head.depth[s] < profile) & head.cavity[s], -1000.0)


def plant_scalp_hematoma(head: Head, rng, k: Knobs) -> None:
    """Subgaleal swelling over the convexity: 18-30 deg wide, 8-20 mm thick, 50-65 HU under a skin layer."""
    a = head.anatomy
    u = direction(pick_side(rng, k), rng.uniform(-60, 80), rng.uniform(10, 60))
    half = rng.uniform(18, 30)
    extra = size_mm(head, rng, 8, 20, k, 3)
    s, angle = cap(head, u, half, a.skull_mm + a.scalp_mm + extra)
    if s is None:
        return
    t = head.t[s]
    bulge = extra * np.clip(1 - (angle / half) ** 2, 0, 1)
    outer = a.skull_mm + a.scalp_mm + bulge
    region = (t >= a.skull_mm) & (t < outer) & ~head.is_(s, SKULL)
    set_hu(head, s, region, a.hu[Tissue.SCALP], texture_hu=4)
    blend(head, s, region & (t < outer - 2.0) & (bulge > 1.0), rng.uniform(50, 65), k)


# ---------------------------------------------------------------------------------------------------------------
# Mass / lesion
# ---------------------------------------------------------------------------------------------------------------


def plant_meningioma(head: Head, rng, k: Knobs) -> None:
    """Dural-based, broad-based dome (48-60 HU) on the convexity, parasagittal falx or sphenoid wing;
    calcified in 40%, oedema in 30%."""
    a = head.anatomy
    side = pick_side(rng, k)
    where = rng.random()
    if where < 0.5:
        u = direction(side, rng.uniform(-60, 80), rng.uniform(10, 50))
    elif where < 0.75:
        u = direction(side, rng.uniform(-30, 60), rng.uniform(60, 75))
    else:
        u = a.p(side * 35, -40, -16)
        u = u / np.linalg.norm(u)
    radius = size_mm(head, rng, 9, 20, k, 3)
    centre = table_point(head, u, -0.3 * radius)  # centred just outside the table: a dome with a broad base
    s = head.around(centre, radius + 10)
    if s is None:
        return
    q = head.ellipsoid_norm(s, centre, dot(head, radius))
    tumour = (q < 1) & head.cavity[s]
    if rng.random() < 0.3:
        grown = head.ellipsoid_norm(s, centre, (radius + 9, radius + 9, radius + 9)) < 1
        edema(head, s, tumour, grown, k)
    blend(head, s, tumour, rng.uniform(48, 60), k, texture_hu=1.5)
    if rng.random() < 0.4:
        set_hu(head, s, tumour & (head.texture[s] > 1.5), rng.uniform(200, 400))


def plant_intra_axial_mass(head: Head, rng, k: Knobs) -> None:
    """Glioma-like: a deep irregular white-matter mass (30-36 HU rim, 14-20 HU necrotic core), 11-20 mm,
    with finger-like oedema in the surrounding white matter."""
    a = head.anatomy
    side = pick_side(rng, k)
    centre = a.p(side * rng.uniform(18, 30), rng.uniform(-30, 25), rng.uniform(5, 30))
    radius = size_mm(head, rng, 11, 20, k, 3)
    s, q = blob(head, rng, centre, radius + 10, irregular=0.3)
    if s is None:
        return
    scale = (radius / (radius + 10)) ** 2
    brain = head.is_(s, CEREBRUM + (Tissue.SULCUS,))
    mass = (q < scale) & brain
    edema(head, s, mass, (q < 1) & brain, k, drop_hu=9)
    blend(head, s, mass, rng.uniform(30, 36), k, texture_hu=3)
    blend(head, s, (q < scale * 0.3) & brain, rng.uniform(14, 20), k)


def plant_metastases(head: Head, rng, k: Knobs) -> None:
    """2-6 round slightly dense (42-55 HU) nodules, 2.5-7 mm, at grey-white junctions, each with an oedema halo."""
    a = head.anatomy
    for _ in range(rng.integers(2, 7)):
        if rng.random() < 0.2:
            centre = a.p(
                rng.choice([-1, 1]) * rng.uniform(14, 30), rng.uniform(40, 56), rng.uniform(-50, -38)
            )
        else:
            centre = lobar_site(head, rng, 1 if rng.random() < 0.5 else -1, 10, 16)
        radius = size_mm(head, rng, 2.5, 7, k, 1.3)
        halo = radius + rng.uniform(4, 8)
        s = head.around(centre, halo + 1)
        if s is None:
            continue
        q = head.ellipsoid_norm(s, centre, (halo, halo, halo))
        nodule = (q < (radius / halo) ** 2) & head.is_(s, PARENCHYMA + (Tissue.SULCUS, Tissue.FOLIA))
        edema(head, s, nodule, q < 1, k)
        blend(head, s, nodule, rng.uniform(42, 55), k, texture_hu=1.0)


def plant_pituitary_mass(head: Head, rng, k: Knobs) -> None:
    """Macroadenoma: a 40-50 HU mass filling and expanding the sella, rising into the suprasellar cistern."""
    a = head.anatomy
    semi = np.array(
        [size_mm(head, rng, 8, 12, k, 2), size_mm(head, rng, 7, 10, k, 2), size_mm(head, rng, 8, 14, k, 2)]
    )
    centre = a.p(0, -16, -37) + [0, 0, semi[2] * 0.8]
    s, mask = head.ellipsoid(centre, semi)
    if s is not None:
        mask &= head.is_(s, INTRACRANIAL + (Tissue.BONE, Tissue.DIPLOE, Tissue.SOFT))
        blend(head, s, mask, rng.uniform(40, 50), k, texture_hu=1.5)


def plant_arachnoid_cyst(head: Head, rng, k: Knobs) -> None:
    """Extra-axial CSF-density (2-8 HU) smooth cyst: middle cranial fossa (70%), retrocerebellar or convexity."""
    a = head.anatomy
    side = pick_side(rng, k)
    where = rng.random()
    if where < 0.7:
        centre = a.p(side * 44, -30, -30)
    elif where < 0.85:
        centre = a.p(side * 6, 64, -50)
    else:
        centre = table_point(head, direction(side, rng.uniform(-40, 60), rng.uniform(10, 40)), 8)
    semi = np.array(
        [size_mm(head, rng, 8, 15, k, 2), size_mm(head, rng, 12, 22, k, 2), size_mm(head, rng, 8, 15, k, 2)]
    )
    s, mask = head.ellipsoid(centre, semi)
    if s is not None:
        mask &= head.cavity[s] & head.is_(s, INTRACRANIAL)
        blend(head, s, mask, rng.uniform(2, 8), k, texture_hu=0.5)


def plant_colloid_cyst(head: Head, rng, k: Knobs) -> None:
    """A round 50-68 HU cyst, 3-7 mm radius, at the foramen of Monro (roof of the third ventricle)."""
    centre = head.shifted(head.anatomy.p(0, -14, 10))
    radius = size_mm(head, rng, 3, 7, k, 1.5)
    s, mask = head.ellipsoid(centre, dot(head, radius))
    blend(
        head,
        s,
        mask & head.is_(s, INTRACRANIAL) if s is not None else None,
        rng.uniform(50, 68),
        k,
        texture_hu=0.5,
    )


def plant_lipoma(head: Head, rng, k: Knobs) -> None:
    """Fat (-90..-110 HU): curvilinear pericallosal (70%) or quadrigeminal cistern; rim calcification in 30%."""
    a = head.anatomy
    if rng.random() < 0.7:
        centre = a.p(0, rng.uniform(-15, 10), 29)
        semi = np.array(
            [
                size_mm(head, rng, 3, 5, k, 1.3),
                size_mm(head, rng, 8, 15, k, 2),
                size_mm(head, rng, 3, 5, k, 1.3),
            ]
        )
    else:
        centre = a.p(0, 27, -12)
        r = size_mm(head, rng, 4, 7, k, 1.5)
        semi = np.array([r, r, r])
    s = head.around(head.shifted(centre), semi.max() + 1)
    q = head.ellipsoid_norm(s, head.shifted(centre), semi)
    set_hu(head, s, q < 1, rng.uniform(-110, -90), texture_hu=4)
    if rng.random() < 0.3:
        set_hu(head, s, (q < 1) & (q > 0.55) & (head.texture[s] > 0.3), rng.uniform(150, 300))


def plant_bone_lesion(head: Head, rng, k: Knobs) -> None:
    """Lytic punched-out vault lesion, 10-24 mm (soft tissue 40-55 HU replacing bone); sclerotic in 25%."""
    a = head.anatomy
    u = direction(pick_side(rng, k), rng.uniform(-80, 80), rng.uniform(0, 60))
    centre = table_point(head, u, -a.skull_mm / 2)
    radius = size_mm(head, rng, 5, 12, k, 2)
    s, mask = head.ellipsoid(centre, dot(head, radius))
    if s is None:
        return
    mask &= head.is_(s, SKULL)
    if rng.random() < 0.25:
        set_hu(head, s, mask & head.is_(s, (Tissue.DIPLOE,)), rng.uniform(1700, 2000), texture_hu=50)
    else:
        set_hu(head, s, mask, rng.uniform(40, 55), texture_hu=3)


def plant_focal_lesion_nonspecific(head: Head, rng, k: Knobs) -> None:
    """One small round subcortical white-matter hypodensity (~10 HU under white), 3-6 mm, no oedema."""
    centre = lobar_site(head, rng, pick_side(rng, k), 10, 22)
    radius = size_mm(head, rng, 3, 6, k, 1.3)
    s, mask = head.ellipsoid(centre, dot(head, radius))
    if s is not None:
        blend(head, s, mask & head.is_(s, CEREBRUM), head.anatomy.hu[Tissue.WHITE] - 10, k, texture_hu=0.5)


# ---------------------------------------------------------------------------------------------------------------
# Structural (mostly anatomy modifiers)
# ---------------------------------------------------------------------------------------------------------------


def modify_hydrocephalus(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Lateral ventricles x1.7-2.3, temporal horns x2.5-3, third ventricle x2.5-3, sulci squeezed."""
    grow = rng.uniform(1.7, 2.3)
    anatomy.lateral = [v * grow for v in anatomy.lateral]
    anatomy.temporal_horns *= rng.uniform(2.5, 3.0)
    anatomy.third *= rng.uniform(2.5, 3.0)
    anatomy.sulcal_width *= 0.5
    anatomy.csf_rim_mm *= 0.6


def plant_hydrocephalus(head: Head, rng, k: Knobs) -> None:
    """Transependymal flow: a smooth 3-5 mm hypodense (-6 HU) rim around the frontal horns and atria."""
    s, near = ventricle_zone(head, rng.uniform(3, 5), names=("frontal_horn", "atrium"))
    blend(head, s, near & head.is_(s, (Tissue.WHITE,)), head.anatomy.hu[Tissue.WHITE] - 6, k, texture_hu=0.5)


def modify_ventricular_enlargement(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Lateral ventricles x1.35-1.6 only (third ventricle, temporal horns and sulci unchanged)."""
    grow = rng.uniform(1.35, 1.6)
    anatomy.lateral = [v * grow for v in anatomy.lateral]


def modify_midline_shift(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Septum, ventricles and deep nuclei pushed 4-12 mm away from the lesion side; the falx stays."""
    side = pick_side(rng, k)
    amp = rng.uniform(4, 12) * max(k.size, 0.6) * anatomy.size
    anatomy.shifts.append(Displacement(-side * amp, -5 * anatomy.size, 12 * anatomy.size, 45, 25))
    anatomy.lateral[(side + 1) // 2] *= 0.8
    anatomy.lateral[(-side + 1) // 2] *= 1.12  # trapped contralateral ventricle


def modify_subfalcine_herniation(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Cingulate gyrus under the falx: a local 6-11 mm shift of the frontal horns, the falx bowed 2-4 mm."""
    side = pick_side(rng, k)
    s = anatomy.size
    amp = rng.uniform(6, 11) * max(k.size, 0.6) * s
    anatomy.shifts.append(Displacement(-side * amp, -22 * s, 20 * s, 14, 9))
    anatomy.falx_bow.append(Displacement(-side * rng.uniform(2, 4), -22 * s, 18 * s, 18, 7))
    anatomy.lateral[(side + 1) // 2] *= 0.7


def modify_transtentorial_herniation(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Uncus filling the ipsilateral suprasellar/ambient cistern; brainstem pushed 3-6 mm across, squeezed."""
    side = pick_side(rng, k)
    anatomy.uncal_side = side
    anatomy.brainstem_shift_mm = -side * rng.uniform(3, 6)
    anatomy.brainstem_squeeze = 0.8


def modify_tonsillar_herniation(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Rounded tonsils 4-8 mm through the foramen magnum, cisterna magna and fourth ventricle effaced."""
    anatomy.tonsil_descent_mm = rng.uniform(4, 8) * anatomy.size
    anatomy.tonsil_peg = False
    anatomy.cisterna_magna *= 0.25


def modify_mass_effect(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Ipsilateral lateral ventricle compressed to ~55% and the overlying sulci effaced."""
    side = pick_side(rng, k)
    anatomy.lateral[(side + 1) // 2] *= rng.uniform(0.45, 0.65)
    u = direction(side, rng.uniform(-30, 60), rng.uniform(10, 40))
    anatomy.effacements.append(Effacement(tuple(u), rng.uniform(35, 50), 0.9))


def modify_cerebral_edema(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Diffuse swelling: sulci and convexity CSF 75% effaced, ventricles x0.75, basal cisterns x0.7."""
    anatomy.global_effacement = max(anatomy.global_effacement, 0.75)
    anatomy.ventricles *= 0.75
    anatomy.cisterns *= 0.7


def plant_cerebral_edema(head: Head, rng, k: Knobs) -> None:
    """Lost grey-white differentiation: cortex and deep grey fall to white-matter density, all 2 HU lower."""
    s = (slice(None),) * 3
    white = head.anatomy.hu[Tissue.WHITE]
    blend(head, s, head.is_(s, CEREBRUM), white - 2, k, texture_hu=1.0)


def modify_basal_cistern_effacement(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Suprasellar, ambient, quadrigeminal and prepontine cisterns shrunk to 20-30%, symmetrically."""
    anatomy.cisterns *= rng.uniform(0.2, 0.3)


def modify_sulcal_effacement(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Sulci and convexity CSF gone over one 35-50 deg region; no density change."""
    u = direction(pick_side(rng, k), rng.uniform(-50, 70), rng.uniform(15, 50))
    anatomy.effacements.append(Effacement(tuple(u), rng.uniform(35, 50), 1.0))


def modify_chiari_malformation(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Peg-like tonsils 8-15 mm below the foramen magnum, no cisterna magna, fourth ventricle normal."""
    anatomy.tonsil_descent_mm = rng.uniform(8, 15) * anatomy.size
    anatomy.tonsil_peg = True
    anatomy.cisterna_magna *= 0.15


# ---------------------------------------------------------------------------------------------------------------
# Chronic / other
# ---------------------------------------------------------------------------------------------------------------


def modify_cerebral_atrophy(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Sulci x1.5-2.2 wider, convexity CSF +2-4 mm, fissures and ventricles (x1.2-1.45) proportionally larger."""
    anatomy.sulcal_width *= rng.uniform(1.5, 2.2)
    anatomy.csf_rim_mm += rng.uniform(2, 4)
    anatomy.fissure_mm += rng.uniform(1.5, 3)
    anatomy.ventricles *= rng.uniform(1.2, 1.45)
    anatomy.sylvian *= 1.8
    anatomy.third *= 1.4


def modify_cerebellar_atrophy(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Wide cerebellar folia CSF (x2.5), fourth ventricle x1.6, 2-4 mm CSF around the cerebellum."""
    anatomy.folia_width *= 2.5
    anatomy.fourth *= 1.6
    anatomy.cerebellar_rim_mm = anatomy.csf_rim_mm + rng.uniform(2, 4)


def plant_small_vessel_ischemic_disease(head: Head, rng, k: Knobs) -> None:
    """Patchy symmetric periventricular and deep white-matter hypodensity, 7-11 HU under white matter."""
    a = head.anatomy
    drop = rng.uniform(7, 11)
    s, near = ventricle_zone(head, rng.uniform(7, 11))
    X, _, Z = head.coords(s, brain=True)
    deep = (np.abs(X) > 10 * a.size) & (np.abs(X) < 35 * a.size) & (20 * a.size < Z) & (42 * a.size > Z)
    patchy = (near | (deep & (np.abs(head.Y[s]) < 35 * a.size))) & (head.texture[s] > -0.3)
    blend(head, s, patchy & head.is_(s, (Tissue.WHITE,)), a.hu[Tissue.WHITE] - drop, k, texture_hu=1.0)


def plant_encephalomalacia(head: Head, rng, k: Knobs) -> None:
    """Post-traumatic tissue loss at a frontal or temporal pole: CSF-like (6-12 HU) with a gliotic rim."""
    a = head.anatomy
    side = pick_side(rng, k)
    site = [a.p(side * 20, -66, 2), a.p(side * 18, -52, -12), a.p(side * 44, -28, -30)][rng.integers(3)]
    radius = size_mm(head, rng, 9, 16, k, 3)
    s, q = blob(head, rng, site, radius + 3, irregular=0.3)
    if s is None:
        return
    brain = head.is_(s, CEREBRUM + (Tissue.SULCUS,))
    core = (q < (radius / (radius + 3)) ** 2) & brain
    blend(head, s, (q < 1) & brain & ~core, a.hu[Tissue.WHITE] - 8, k, texture_hu=1.0)
    blend(head, s, core, rng.uniform(6, 12), k, texture_hu=0.5)


def plant_porencephalic_cyst(head: Head, rng, k: Knobs) -> None:
    """A smooth CSF (2-6 HU) cyst, 8-15 mm, opening into the body of a lateral ventricle."""
    side = pick_side(rng, k)
    centre, semi = part(ventricle_parts(head.anatomy), "body", side)
    radius = size_mm(head, rng, 8, 15, k, 2)
    centre = centre + [side * (semi[0] + 0.7 * radius), rng.uniform(-10, 10), rng.uniform(0, 8)]
    s, mask = head.ellipsoid(centre, (radius, radius * 1.2, radius), brain=True)
    if s is not None:
        blend(head, s, mask & head.is_(s, CEREBRUM + CSF_SPACES), rng.uniform(2, 6), k, texture_hu=0.3)


def plant_basal_ganglia_calcification(head: Head, rng, k: Knobs) -> None:
    """Bilateral symmetric globus pallidus calcification, 120-350 HU."""
    a = head.anatomy
    hu = rng.uniform(120, 350)
    semi = np.array(
        [max(2.5 * k.size * a.size, head.min_mm), 6 * k.size * a.size, max(4.5 * k.size * a.size, 2)]
    )
    for side in SIDES:
        s, mask = head.ellipsoid(head.shifted(a.p(side * 18.5, -4, 1)), semi)
        set_hu(head, s, mask & head.is_(s, PARENCHYMA) if s is not None else None, hu, texture_hu=15)


def plant_parenchymal_calcification(head: Head, rng, k: Knobs) -> None:
    """1-4 punctate calcified granulomas (150-400 HU), 1.5-3 mm, at grey-white junctions."""
    for _ in range(rng.integers(1, 5)):
        centre = lobar_site(head, rng, 1 if rng.random() < 0.5 else -1, 4, 12)
        radius = size_mm(head, rng, 1.5, 3, k, 1.0)
        s, mask = head.ellipsoid(centre, dot(head, radius))
        set_hu(
            head,
            s,
            mask & head.is_(s, PARENCHYMA + (Tissue.SULCUS,)) if s is not None else None,
            rng.uniform(150, 400),
        )


def plant_vascular_calcification(head: Head, rng, k: Knobs) -> None:
    """Patchy mural calcification (200-500 HU) of the cavernous/supraclinoid internal carotids."""
    paths = vessel_paths(head.anatomy)
    names = ["ica_left", "ica_right"] if rng.random() < 0.7 else [rng.choice(["ica_left", "ica_right"])]
    for name in names:
        p0, p1, radius = paths[str(name)]
        s, mask = head.capsule(p0, p1, max(radius * 1.3, head.min_mm))
        if s is not None:
            plaque = mask & (head.texture[s] > -0.3) & ~head.is_(s, SKULL)
            set_hu(head, s, plaque, rng.uniform(200, 500), texture_hu=30)


def plant_dural_calcification(head: Head, rng, k: Knobs) -> None:
    """A falx plaque (300-800 HU): 1-2 mm thick, 10-28 mm long, 8-18 mm high, above the falx's free edge."""
    a = head.anatomy
    y = rng.uniform(-40, 40) * a.size
    z = max(float(falx_edge(a, np.float32(y))) + 8, rng.uniform(30, 50) * a.size)
    semi_y, semi_z = size_mm(head, rng, 5, 14, k, 2), size_mm(head, rng, 4, 9, k, 2)
    s = head.box((-6, y - semi_y, z - semi_z), (6, y + semi_y, z + semi_z))
    if s is None:
        return
    X, Y, Z = head.coords(s)
    half = max(0.8, 0.6 * head.spacing[2])
    plaque = (np.abs(X - falx_x(a, Y, Z)) < half) & (((Y - y) / semi_y) ** 2 + ((Z - z) / semi_z) ** 2 < 1)
    set_hu(head, s, plaque & head.cavity[s], rng.uniform(300, 800), texture_hu=40)


def plant_choroid_plexus_calcification(head: Head, rng, k: Knobs) -> None:
    """Bilateral glomus calcification in the atria, 2-4 mm, 120-300 HU."""
    hu = rng.uniform(120, 300)
    for side in SIDES:
        centre, _ = part(ventricle_parts(head.anatomy), "atrium", side)
        radius = size_mm(head, rng, 2, 4, k, 1.2)
        s, mask = head.ellipsoid(centre, dot(head, radius), brain=True)
        set_hu(head, s, mask, hu, texture_hu=10)


def sinus_mask(head: Head, name: str, tissue=Tissue.SINUS_AIR):
    centre, semi = sinus_parts(head.anatomy)[name]
    s = head.around(centre, semi + 1)
    if s is None:
        return None, None, centre, semi
    q = head.ellipsoid_norm(s, centre, semi)
    return s, q, centre, semi


def plant_paranasal_sinusitis(head: Head, rng, k: Knobs) -> None:
    """Mucosal thickening (3-7 mm, 18-30 HU) in 1-3 sinuses; one sinus fully opacified (30%) or an air-fluid
    level in a maxillary sinus (25%)."""
    names = ["maxillary_left", "maxillary_right", "ethmoid", "sphenoid"]
    chosen = rng.choice(names, size=rng.integers(1, 4), replace=False)
    for name in chosen:
        s, q, centre, semi = sinus_mask(head, str(name))
        if s is None:
            continue
        air = (q < 1) & head.is_(s, (Tissue.SINUS_AIR,))
        thick = size_mm(head, rng, 3, 7, k, 1.2)
        lining = air & (q > (1 - thick / semi.min()) ** 2)
        set_hu(head, s, lining, rng.uniform(18, 30), texture_hu=3)
    roll = rng.random()
    s, q, centre, semi = sinus_mask(head, str(chosen[0]))
    if s is not None and roll < 0.3:
        set_hu(head, s, (q < 1) & head.is_(s, (Tissue.SINUS_AIR,)), rng.uniform(15, 30), texture_hu=3)
    elif s is not None and roll < 0.55 and str(chosen[0]).startswith("maxillary"):
        fluid_level(
            head,
            s,
            (q < 1) & head.is_(s, (Tissue.SINUS_AIR,)),
            centre[1],
            rng.uniform(0, 0.5) * semi[1],
            rng.uniform(10, 25),
        )


def plant_mucous_retention_cyst(head: Head, rng, k: Knobs) -> None:
    """A dome (12-25 HU), 5-10 mm radius, on the floor of an otherwise aerated maxillary sinus."""
    side = pick_side(rng, k)
    centre, semi = sinus_parts(head.anatomy)["maxillary_left" if side > 0 else "maxillary_right"]
    radius = size_mm(head, rng, 5, 10, k, 2)
    base = centre + [rng.uniform(-4, 4), rng.uniform(-5, 5), -semi[2]]
    s, mask = head.ellipsoid(base, dot(head, radius))
    set_hu(
        head,
        s,
        mask & head.is_(s, (Tissue.SINUS_AIR,)) if s is not None else None,
        rng.uniform(12, 25),
        texture_hu=2,
    )


def plant_mastoid_opacification(head: Head, rng, k: Knobs) -> None:
    """Fluid (10-30 HU) filling 70-100% of the air cells of one (60%) or both mastoids."""
    side = pick_side(rng, k)
    for sd in (side,) if rng.random() < 0.6 else SIDES:
        s, q, _, _ = sinus_mask(head, "mastoid_left" if sd > 0 else "mastoid_right")
        if s is not None:
            filled = (
                (q < 1) & head.is_(s, (Tissue.MASTOID_AIR,)) & (head.texture[s] > rng.uniform(-1.5, -0.3))
            )
            set_hu(head, s, filled, rng.uniform(10, 30), texture_hu=3)


def plant_sinus_related_complication(head: Head, rng, k: Knobs) -> None:
    """Frontal sinusitis with a frontal empyema: opacified frontal sinuses (20-30 HU) and a lentiform
    15-25 HU collection, 4-9 mm thick, under the frontal inner table."""
    for name in ("frontal_left", "frontal_right"):
        s, q, _, _ = sinus_mask(head, name)
        if s is not None:
            set_hu(head, s, (q < 1) & head.is_(s, (Tissue.SINUS_AIR,)), rng.uniform(20, 30), texture_hu=3)
    side = pick_side(rng, k)
    u = np.array([side * 0.25, -0.9, 0.25])
    u /= np.linalg.norm(u)
    thick = size_mm(head, rng, 4, 9, k, 2)
    extra_axial(head, rng, k, u, rng.uniform(18, 25), thick, 0.8, rng.uniform(15, 25))


def burr_hole(head: Head, u: np.ndarray, radius: float) -> None:
    a = head.anatomy
    s, mask = head.capsule(table_point(head, u, 1.0), table_point(head, u, -a.skull_mm - 1), radius)
    set_hu(head, s, mask & head.is_(s, SKULL) if s is not None else None, 30.0, texture_hu=3)


def plant_postoperative_changes(head: Head, rng, k: Knobs) -> None:
    """1-2 burr holes (10-14 mm) with a gliotic needle track (12-18 HU) beneath and thickened scalp."""
    a = head.anatomy
    side = pick_side(rng, k)
    for _ in range(rng.integers(1, 3)):
        u = direction(side, rng.uniform(30, 80), rng.uniform(35, 60))
        burr_hole(head, u, max(rng.uniform(5, 7) * a.size, 1.5 * head.min_mm))
        track = size_mm(head, rng, 10, 25, k, 3)
        s, mask = head.capsule(table_point(head, u, 0), table_point(head, u, track), max(2.5, head.min_mm))
        if s is not None:
            blend(head, s, mask & head.is_(s, CEREBRUM + (Tissue.SULCUS, Tissue.CSF)), rng.uniform(12, 18), k)
        s, angle = cap(head, u, 14, a.skull_mm + a.scalp_mm + 5)
        if s is not None:
            t = head.t[s]
            swelling = (
                (angle < 12) & (t >= a.skull_mm) & (t < a.skull_mm + a.scalp_mm + 4) & ~head.is_(s, SKULL)
            )
            set_hu(head, s, swelling, 35.0, texture_hu=4)


def plant_craniotomy_defect(head: Head, rng, k: Knobs) -> None:
    """Craniectomy (55%): a 50-90 mm bone defect replaced by 20-35 HU tissue; else a craniotomy flap outlined
    by a 2 mm saw kerf with burr holes at its rim."""
    a = head.anatomy
    side = pick_side(rng, k)
    u = direction(side, rng.uniform(-30, 70), rng.uniform(20, 50))
    half = rng.uniform(20, 32) * math.sqrt(k.size)
    s, angle = cap(head, u, half + 3, a.skull_mm + 2)
    if s is None:
        return
    bone = head.is_(s, SKULL)
    if rng.random() < 0.55:
        set_hu(head, s, bone & (angle < half), rng.uniform(20, 35), texture_hu=3)
        return
    kerf = max(2.0, 1.1 * head.spacing[2]) / head.table_radius(u) * 180 / math.pi  # 2 mm arc, in degrees
    set_hu(head, s, bone & (np.abs(angle - half) < kerf / 2), 30.0)
    normal = np.cross(u, [0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.cross(u, [1.0, 0.0, 0.0])
    normal /= np.linalg.norm(normal)
    for turn in rng.uniform(0, 2 * math.pi, size=rng.integers(2, 4)):
        axis = math.cos(turn) * normal + math.sin(turn) * np.cross(u, normal)
        tilt = math.radians(half)
        burr_hole(head, math.cos(tilt) * u + math.sin(tilt) * axis, max(5.0 * a.size, 1.5 * head.min_mm))


def plant_ventricular_shunt(head: Head, rng, k: Knobs) -> None:
    """Radio-opaque catheter (1500-2500 HU, ~2.5 mm) from a frontal burr hole (Kocher's point) to the frontal
    horn tip, a valve reservoir (600 HU) under the scalp and distal tubing running back under the scalp."""
    a = head.anatomy
    side = pick_side(rng, k)
    u = direction(side, 65, 45)
    tip, _ = part(ventricle_parts(a), "frontal_horn", side)
    tip = head.shifted(tip)
    burr_hole(head, u, max(5.0 * a.size, 1.5 * head.min_mm))
    radius = max(1.25, 0.65 * head.min_mm / 0.75)
    hu = rng.uniform(1500, 2500)
    entry_out = table_point(head, u, -a.skull_mm - 2)
    s, mask = head.capsule(entry_out, tip, radius)
    set_hu(head, s, mask, hu)
    valve = table_point(head, u, -a.skull_mm - a.scalp_mm * 0.6)
    s, mask = head.ellipsoid(valve, (5.0, 5.0, 5.0))
    set_hu(head, s, mask & ~head.is_(s, SKULL) if s is not None else None, 600.0)
    path = [
        direction(side, az, el)
        for az, el in zip(np.linspace(65, -40, 7), np.linspace(45, -15, 7), strict=True)
    ]
    points = [table_point(head, p, -a.skull_mm - a.scalp_mm * 0.5) for p in path]
    for p0, p1 in zip(points[:-1], points[1:], strict=True):
        s, mask = head.capsule(p0, p1, radius)
        set_hu(head, s, mask & ~head.is_(s, SKULL) if s is not None else None, hu)


def plant_clip_or_coil(head: Head, rng, k: Knobs) -> None:
    """Metal (3071 HU) 5-9 mm at the circle of Willis with radial streak artefacts (+-60-150 HU) in its slices."""
    centre = willis_site(head, rng, k)
    radius = max(rng.uniform(2.5, 4.5) * head.anatomy.size, 1.2 * head.min_mm)
    s, mask = head.ellipsoid(centre, dot(head, radius))
    set_hu(head, s, mask, 3071.0)
    if s is None:
        return
    grid = centre @ head.pose.rotation + head.pose.centre  # head frame -> grid mm (x, y, z)
    ks = s[0]
    region = (ks, slice(None), slice(None))
    gx = head._grid_x[None, None, :] - grid[0]
    gy = head._grid_y[None, :, None] - grid[1]
    theta = np.arctan2(gy, gx)
    rho = np.sqrt(gx * gx + gy * gy)
    streaks = (
        rng.uniform(60, 150)
        * np.cos(rng.integers(6, 11) * theta + rng.uniform(0, np.pi))
        * np.exp(-rho / 40.0)
    )
    inside = head.t[region] < head.anatomy.skull_mm + head.anatomy.scalp_mm  # streaks only within the head
    head.hu[region] += np.where(inside, streaks, 0).astype(np.float32)


def plant_hyperostosis_frontalis(head: Head, rng, k: Knobs) -> None:
    """Nodular 2-10 mm thickening of the frontal inner table, bilateral, sparing the midline (1100-1400 HU)."""
    a = head.anatomy
    s = head.box(a.p(-80, -120, -10), a.p(80, -20, 80))
    if s is None:
        return
    X, Y, Z = head.coords(s)
    thick = size_mm(head, rng, 2.5, 6, k, 1.5) * np.clip(1 + 0.6 * head.texture[s], 0.2, 1.8)  # nodular
    frontal = (-30 * a.size > Y) & (Z > 0) & (np.abs(X) > 6 * a.size)
    under_vault = head.cavity[s] & (-head.t[s] < thick)  # measured from the vault, not the fossa floor
    set_hu(head, s, frontal & under_vault, rng.uniform(1100, 1400), texture_hu=60)


def plant_empty_sella(head: Head, rng, k: Knobs) -> None:
    """The sella filled with CSF; only a 1.5 mm rim of flattened pituitary remains on its floor."""
    a = head.anatomy
    s = head.around(a.p(0, -16, -33.5), a.p(8, 7, 6))
    if s is None:
        return
    floor = -37 * a.size + 1.5
    set_hu(head, s, head.is_(s, (Tissue.PITUITARY,)) & (head.Z[s] > floor), a.hu[Tissue.CSF], texture_hu=0.5)


def plant_enlarged_perivascular_spaces(head: Head, rng, k: Knobs) -> None:
    """8-20 dots of CSF, 1-2 mm radius, in the inferior basal ganglia and centrum semiovale, both sides."""
    a = head.anatomy
    for _ in range(rng.integers(8, 21)):
        side = 1 if rng.random() < 0.5 else -1
        if rng.random() < 0.6:
            centre = a.p(side * rng.uniform(18, 28), rng.uniform(-12, 6), rng.uniform(-4, 2))
        else:
            centre = a.p(side * rng.uniform(15, 30), rng.uniform(-25, 25), rng.uniform(22, 38))
        radius = size_mm(head, rng, 1.0, 2.0, k, 1.0)
        s, mask = head.ellipsoid(head.shifted(centre), dot(head, radius))
        set_hu(
            head, s, mask & head.is_(s, CEREBRUM) if s is not None else None, a.hu[Tissue.CSF], texture_hu=0.5
        )


def modify_cavum_septum_pellucidum(anatomy: Anatomy, rng, k: Knobs) -> None:
    """A CSF slit 3-7 mm wide between the frontal horns."""
    anatomy.cavum_mm = rng.uniform(3, 7) * anatomy.size


def modify_mega_cisterna_magna(anatomy: Anatomy, rng, k: Knobs) -> None:
    """Cisterna magna x2-2.8 (20-35 mm of CSF behind an intact vermis)."""
    anatomy.cisterna_magna *= rng.uniform(2.0, 2.8)


def modify_orbital_abnormality(anatomy: Anatomy, rng, k: Knobs) -> None:
    side = pick_side(rng, k)
    anatomy.globe_forward_mm[(side + 1) // 2] = rng.uniform(3, 7)  # proptosis


def plant_orbital_abnormality(head: Head, rng, k: Knobs) -> None:
    """A retrobulbar intraconal mass (40-50 HU), 6-10 mm, replacing orbital fat, with proptosis."""
    side = pick_side(rng, k)
    radius = size_mm(head, rng, 6, 10, k, 2)
    centre = head.anatomy.p(side * 28, -60, -30)
    s, mask = head.ellipsoid(centre, (radius, radius * 1.2, radius))
    set_hu(
        head,
        s,
        mask & head.is_(s, (Tissue.FAT, Tissue.SOFT)) if s is not None else None,
        rng.uniform(40, 50),
        texture_hu=2,
    )


def plant_lens_implant(head: Head, rng, k: Knobs) -> None:
    """Pseudophakia: the natural lens replaced by a thin dense disc (250-400 HU, ~1 mm) in one or both eyes."""
    a = head.anatomy
    side = pick_side(rng, k)
    for sd in (side,) if rng.random() < 0.5 else SIDES:
        lens = globe_centre(a, sd) - a.p(0, 9.5, 0)
        s, mask = head.ellipsoid(lens, a.p(6, 3, 6))
        if s is None:
            continue
        set_hu(head, s, mask & head.is_(s, (Tissue.LENS,)), a.hu[Tissue.GLOBE])
        s, disc = head.ellipsoid(lens, (4.5 * a.size, max(0.6, 0.45 * head.spacing[1]), 4.5 * a.size))
        set_hu(head, s, disc, rng.uniform(250, 400))


def plant_scalp_soft_tissue_lesion(head: Head, rng, k: Knobs) -> None:
    """A well-defined round subcutaneous nodule (sebaceous cyst, 15-30 HU), 6-12 mm, bulging from the scalp."""
    a = head.anatomy
    u = direction(1 if rng.random() < 0.5 else -1, rng.uniform(-90, 90), rng.uniform(0, 70))
    radius = size_mm(head, rng, 6, 12, k, 2)
    centre = table_point(head, u, -(a.skull_mm + a.scalp_mm * 0.6))
    s, mask = head.ellipsoid(centre, dot(head, radius))
    if s is not None:
        set_hu(
            head, s, mask & (head.t[s] > a.skull_mm) & ~head.is_(s, SKULL), rng.uniform(15, 30), texture_hu=2
        )


def modify_nasal_septal_deviation(anatomy: Anatomy, rng, k: Knobs) -> None:
    anatomy.septal_deviation_mm = pick_side(rng, k) * rng.uniform(4, 8)  # C-shaped bow


def plant_osteoma(head: Head, rng, k: Knobs) -> None:
    """Ivory (1700-2000 HU) round bony outgrowth, 4-9 mm, on the outer table (70%) or in a frontal sinus."""
    a = head.anatomy
    radius = size_mm(head, rng, 4, 9, k, 1.5)
    hu = rng.uniform(1700, 2000)
    if rng.random() < 0.7:
        u = direction(1 if rng.random() < 0.5 else -1, rng.uniform(-60, 90), rng.uniform(10, 60))
        centre = table_point(head, u, -(a.skull_mm + 0.2 * radius))
        s, mask = head.ellipsoid(centre, dot(head, radius))
        set_hu(head, s, mask & (head.t[s] > a.skull_mm - 1) if s is not None else None, hu, texture_hu=20)
    else:
        name = "frontal_left" if rng.random() < 0.5 else "frontal_right"
        centre, _ = sinus_parts(a)[name]
        r = min(radius, 4.0 * a.size)
        s, mask = head.ellipsoid(centre, dot(head, r))
        set_hu(head, s, mask, hu, texture_hu=20)


def plant_dolichoectasia(head: Head, rng, k: Knobs) -> None:
    """An elongated, 6-9 mm wide basilar artery (50-60 HU) bowing 6-10 mm sideways and rising to the third
    ventricle floor; mural calcification in 30%."""
    a = head.anatomy
    side = pick_side(rng, k)
    bow = side * rng.uniform(6, 10) * a.size
    radius = size_mm(head, rng, 3, 4.5, k, 1.5)
    zs = np.linspace(-60, -8, 7) * a.size
    xs = bow * np.sin(np.linspace(0, np.pi, 7))
    points = [np.array([x, 3.5 * a.size, z]) for x, z in zip(xs, zs, strict=True)]
    hu, calcified = rng.uniform(50, 60), rng.random() < 0.3
    for p0, p1 in zip(points[:-1], points[1:], strict=True):
        s, mask = head.capsule(p0, p1, radius)
        if s is None:
            continue
        mask &= head.is_(s, INTRACRANIAL)
        blend(head, s, mask, hu, k, texture_hu=1.0)
        if calcified:
            wall = mask & (head.capsule_distance(s, p0, p1) > radius - head.min_mm) & (head.texture[s] > 0.5)
            set_hu(head, s, wall, 200.0)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

Modifier = Callable[[Anatomy, np.random.Generator, Knobs], None]
Planter = Callable[[Head, np.random.Generator, Knobs], None]


def _collect(prefix: str) -> dict[str, Callable]:
    found = {
        name[len(prefix) :]: fn for name, fn in globals().items() if name.startswith(prefix) and callable(fn)
    }
    return {fid: found[fid] for fid in FINDING_IDS if fid in found}


MODIFIERS: dict[str, Modifier] = _collect("modify_")
PLANTERS: dict[str, Planter] = _collect("plant_")

_missing = [fid for fid in FINDING_IDS if fid not in MODIFIERS and fid not in PLANTERS]
if _missing:
    raise ImportError(f"no synthetic generator for findings {_missing}")
