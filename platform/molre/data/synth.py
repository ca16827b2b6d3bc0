"""Synthetic head CT benchmark: `molre synth --out DIR --count N --seed S [--format dicom|nifti]`.

Each study is a procedural non-contrast head CT (``molre.data.phantom``) with findings planted by
``molre.data.lesions``. Labels are sampled with a long-tailed prevalence (``PREVALENCE``: common findings ~20%, rare
ones well under 1%) and co-occurrence rules (``COOCCURRENCE``: a large haematoma brings mass effect and midline
shift, a hydrocephalus has enlarged ventricles, fractures bring scalp haematomas...). Patients have 1-3 studies
that share their anatomy and keep most chronic findings from one visit to the next.

Everything is deterministic by seed: study ``i`` depends only on (seed, i), so a larger ``--count`` adds studies
without changing earlier ones, and re-running skips studies already written. The physical field of view is fixed
(160 mm cranio-caudal x 240 x 240 mm), so the voxel spacing is FOV / shape (40x256x256 -> 4 x 0.94 x 0.94 mm).
DICOM headers carry fake, clearly synthetic PHI (``SYNTH^PATIENT00001``, ``SYNTH GENERAL``...) so that downstream
tests can check it never leaks.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from molre.data.dicom_write import write_dicom_series, write_nifti
from molre.data.lesions import MODIFIERS, PLANTERS, knobs_for
from molre.data.phantom import FOV_MM, Head, build_head, sample_anatomy, sample_pose
from molre.errors import MolreError
from molre.findings import CATEGORY_SIZES, FINDING_IDS, category_of

DEFAULT_SHAPE = (40, 256, 256)
HU_RANGE = (-1024, 3071)  # 12-bit CT range

# Probability of each finding in a study at difficulty 1, before co-occurrence adds its companions.
PREVALENCE: dict[str, float] = {
    # hemorrhage
    "intraparenchymal_hemorrhage": 0.006,  # mostly implied by a located subtype (see COOCCURRENCE)
    "basal_ganglia_hemorrhage": 0.008,
    "thalamic_hemorrhage": 0.004,
    "lobar_hemorrhage": 0.008,
    "cerebellar_hemorrhage": 0.003,
    "brainstem_hemorrhage": 0.002,
    "acute_subdural_hematoma": 0.04,
    "chronic_subdural_hematoma": 0.02,
    "epidural_hematoma": 0.006,
    "subarachnoid_hemorrhage": 0.035,
    "intraventricular_hemorrhage": 0.008,
    "hemorrhagic_transformation": 0.004,
    # vascular
    "acute_infarct": 0.025,
    "chronic_infarct": 0.07,
    "lacunar_infarct": 0.08,
    "loss_of_insular_ribbon": 0.004,
    "hyperdense_vessel_sign": 0.006,
    "venous_sinus_thrombosis": 0.003,
    "vascular_malformation": 0.003,
    "aneurysm": 0.004,
    # trauma
    "skull_fracture": 0.03,
    "skull_base_fracture": 0.008,
    "facial_fracture": 0.01,
    "cerebral_contusion": 0.012,
    "pneumocephalus": 0.005,
    "scalp_hematoma": 0.05,
    # mass / lesion
    "meningioma": 0.012,
    "intra_axial_mass": 0.007,
    "metastases": 0.008,
    "pituitary_mass": 0.004,
    "arachnoid_cyst": 0.008,
    "colloid_cyst": 0.002,
    "lipoma": 0.002,
    "bone_lesion": 0.005,
    "focal_lesion_nonspecific": 0.02,
    # structural
    "hydrocephalus": 0.01,
    "ventricular_enlargement": 0.05,
    "midline_shift": 0.01,
    "subfalcine_herniation": 0.002,
    "transtentorial_herniation": 0.002,
    "tonsillar_herniation": 0.002,
    "mass_effect": 0.015,
    "cerebral_edema": 0.008,
    "basal_cistern_effacement": 0.004,
    "sulcal_effacement": 0.02,
    "chiari_malformation": 0.003,
    # chronic / other
    "cerebral_atrophy": 0.22,
    "cerebellar_atrophy": 0.02,
    "small_vessel_ischemic_disease": 0.20,
    "encephalomalacia": 0.02,
    "porencephalic_cyst": 0.003,
    "basal_ganglia_calcification": 0.06,
    "parenchymal_calcification": 0.025,
    "vascular_calcification": 0.12,
    "dural_calcification": 0.08,
    "choroid_plexus_calcification": 0.10,
    "paranasal_sinusitis": 0.18,
    "mucous_retention_cyst": 0.07,
    "mastoid_opacification": 0.05,
    "sinus_related_complication": 0.002,
    "postoperative_changes": 0.03,
    "craniotomy_defect": 0.01,
    "ventricular_shunt": 0.008,
    "clip_or_coil": 0.005,
    "hyperostosis_frontalis": 0.015,
    "empty_sella": 0.01,
    "enlarged_perivascular_spaces": 0.06,
    "cavum_septum_pellucidum": 0.04,
    "mega_cisterna_magna": 0.008,
    "orbital_abnormality": 0.006,
    "lens_implant": 0.02,
    "scalp_soft_tissue_lesion": 0.01,
    "nasal_septal_deviation": 0.10,
    "osteoma": 0.006,
    "dolichoectasia": 0.006,
}

# (if any of these is present, add this finding, with this probability); applied once, in order, so a rule can
# build on the ones above it.
COOCCURRENCE: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("hemorrhagic_transformation",), "acute_infarct", 0.9),
    (("hyperdense_vessel_sign",), "acute_infarct", 0.6),
    (("acute_infarct",), "loss_of_insular_ribbon", 0.3),
    (("acute_infarct",), "hyperdense_vessel_sign", 0.15),
    (("acute_infarct",), "sulcal_effacement", 0.2),
    (("epidural_hematoma",), "skull_fracture", 0.75),
    (("skull_fracture",), "scalp_hematoma", 0.6),
    (("skull_fracture",), "cerebral_contusion", 0.3),
    (("skull_fracture", "skull_base_fracture"), "pneumocephalus", 0.2),
    (("skull_base_fracture",), "mastoid_opacification", 0.4),
    (("facial_fracture",), "scalp_hematoma", 0.3),
    (("cerebral_contusion",), "subarachnoid_hemorrhage", 0.5),
    (("cerebral_contusion",), "acute_subdural_hematoma", 0.3),
    (("aneurysm",), "subarachnoid_hemorrhage", 0.2),
    (("subarachnoid_hemorrhage",), "aneurysm", 0.12),
    (("subarachnoid_hemorrhage",), "intraventricular_hemorrhage", 0.2),
    (("thalamic_hemorrhage", "basal_ganglia_hemorrhage"), "intraventricular_hemorrhage", 0.3),
    (("colloid_cyst", "intraventricular_hemorrhage", "subarachnoid_hemorrhage"), "hydrocephalus", 0.3),
    (("ventricular_shunt",), "hydrocephalus", 0.4),
    (("hydrocephalus",), "ventricular_shunt", 0.1),
    (("ventricular_shunt", "craniotomy_defect", "clip_or_coil"), "postoperative_changes", 0.9),
    (("postoperative_changes",), "craniotomy_defect", 0.3),
    (("intra_axial_mass", "metastases"), "cerebral_edema", 0.25),
    (
        ("basal_ganglia_hemorrhage", "lobar_hemorrhage", "acute_subdural_hematoma", "epidural_hematoma")
        + ("intra_axial_mass", "cerebellar_hemorrhage", "meningioma", "chronic_subdural_hematoma"),
        "mass_effect",
        0.6,
    ),
    (
        ("acute_subdural_hematoma", "epidural_hematoma", "lobar_hemorrhage", "intra_axial_mass"),
        "midline_shift",
        0.4,
    ),
    (("mass_effect",), "sulcal_effacement", 0.4),
    (("mass_effect",), "midline_shift", 0.3),
    (("midline_shift",), "mass_effect", 0.9),
    (("midline_shift",), "subfalcine_herniation", 0.25),
    (("subfalcine_herniation",), "midline_shift", 1.0),
    (("transtentorial_herniation",), "basal_cistern_effacement", 0.8),
    (("transtentorial_herniation", "tonsillar_herniation"), "mass_effect", 1.0),
    (("cerebral_edema",), "sulcal_effacement", 0.7),
    (("cerebral_edema",), "basal_cistern_effacement", 0.3),
    (("cerebral_atrophy",), "ventricular_enlargement", 0.35),
    (("cerebral_atrophy",), "small_vessel_ischemic_disease", 0.35),
    (("cerebral_atrophy",), "cerebellar_atrophy", 0.08),
    (("small_vessel_ischemic_disease",), "lacunar_infarct", 0.25),
    (("chronic_infarct",), "encephalomalacia", 0.2),
    (("paranasal_sinusitis",), "mucous_retention_cyst", 0.15),
    (("sinus_related_complication",), "paranasal_sinusitis", 1.0),
    (("chiari_malformation",), "hydrocephalus", 0.1),
    (("hydrocephalus",), "ventricular_enlargement", 1.0),
    (
        ("basal_ganglia_hemorrhage", "thalamic_hemorrhage", "lobar_hemorrhage")
        + ("cerebellar_hemorrhage", "brainstem_hemorrhage"),
        "intraparenchymal_hemorrhage",
        1.0,
    ),
)

# Findings a patient keeps from one study to the next (with probability PERSIST).
PERSISTENT_CATEGORIES = ("chronic_other", "mass_lesion")
PERSISTENT_EXTRA = ("chronic_infarct", "lacunar_infarct", "chiari_malformation", "ventricular_enlargement")
PERSIST = 0.9

_PREVALENCE = np.array([PREVALENCE[fid] for fid in FINDING_IDS])


def prevalence_at(difficulty: float = 1.0) -> dict[str, float]:
    """Base prevalence reshaped by difficulty: p ** (0.75 + 0.25 d) -- a harder benchmark has a longer tail."""
    exponent = max(0.5, 0.75 + 0.25 * float(difficulty))
    return dict(zip(FINDING_IDS, (_PREVALENCE**exponent).tolist(), strict=True))


def sample_study_findings(rng: np.random.Generator, difficulty: float = 1.0) -> set[str]:
    """One study's findings: independent draws at ``prevalence_at(difficulty)``, then ``COOCCURRENCE``."""
    exponent = max(0.5, 0.75 + 0.25 * float(difficulty))
    draws = rng.random(len(FINDING_IDS)) < _PREVALENCE**exponent
    found = {fid for fid, hit in zip(FINDING_IDS, draws, strict=True) if hit}
    for (triggers, consequence, probability), roll in zip(
        COOCCURRENCE, rng.random(len(COOCCURRENCE)), strict=True
    ):
        if roll < probability and found.intersection(triggers):
            found.add(consequence)
    return found


# ---------------------------------------------------------------------------------------------------------------
# One phantom
# ---------------------------------------------------------------------------------------------------------------


def spacing_for(shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel spacing (dz, dy, dx) mm that fits the fixed 160 x 240 x 240 mm field of view."""
    return tuple(fov / n for fov, n in zip(FOV_MM, shape, strict=True))


@dataclass
class Phantom:
    hu: np.ndarray  # int16 [D,H,W]
    head: Head  # coordinates and tissue labels of the anatomy (findings do not relabel)


def render_phantom(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing_zyx: Sequence[float] | None = None,
    findings: Iterable[str] = (),
    difficulty: float = 1.0,
    *,
    anatomy_seed: int | Sequence[int] | None = None,
) -> Phantom:
    """A phantom and its anatomy. The anatomy, pose, image noise and each finding draw from their own streams
    (all derived from one draw of ``rng``), so adding a finding changes nothing but that finding's voxels (and
    the anatomy it deforms). ``anatomy_seed`` pins the patient (head shape, densities) across studies."""
    findings = set(findings)
    unknown = sorted(findings.difference(FINDING_IDS))
    if unknown:
        raise ValueError(f"unknown finding ids {unknown} (see molre/findings.yaml)")
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in (spacing_zyx or spacing_for(shape)))
    root = int(rng.integers(0, 2**63 - 1))
    patient_rng = np.random.default_rng(anatomy_seed if anatomy_seed is not None else [root, 0])
    pose_rng = np.random.default_rng([root, 1])
    noise_rng = np.random.default_rng([root, 2])

    def finding_rng(fid: str) -> np.random.Generator:  # the same stream for a finding's modifier and planter
        return np.random.default_rng([root, 3, FINDING_IDS.index(fid)])

    anatomy = sample_anatomy(patient_rng)
    pose = sample_pose(pose_rng)
    knobs = knobs_for(difficulty, side=1 if pose_rng.random() < 0.5 else -1)
    present = [fid for fid in FINDING_IDS if fid in findings]
    for fid in present:
        if fid in MODIFIERS:
            MODIFIERS[fid](anatomy, finding_rng(fid), knobs)
    head = build_head(shape, spacing, anatomy, pose, patient_rng)
    head.findings = frozenset(present)
    head.finish_hu()
    for fid in present:
        if fid in PLANTERS:
            PLANTERS[fid](head, finding_rng(fid), knobs)
    return Phantom(hu=_acquire(head.hu, noise_rng, knobs.noise_hu), head=head)


def _acquire(hu: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """Scanner look: in-plane blur (0.5 voxel, partial volume), white noise, 12-bit clip, int16."""
    out = ndimage.gaussian_filter1d(hu, 0.5, axis=1, truncate=3.0)
    out = ndimage.gaussian_filter1d(out, 0.5, axis=2, truncate=3.0)
    if noise_hu > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise_hu)
    np.clip(out, *HU_RANGE, out=out)
    return np.rint(out).astype(np.int16)


def make_phantom(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing_zyx: Sequence[float] | None = None,
    findings: Iterable[str] = (),
    difficulty: float = 1.0,
    *,
    anatomy_seed: int | Sequence[int] | None = None,
) -> np.ndarray:
    """A synthetic non-contrast head CT, int16 HU ``[D,H,W]``, slice 0 inferior (see ``render_phantom``)."""
    return render_phantom(rng, shape, spacing_zyx, findings, difficulty, anatomy_seed=anatomy_seed).hu


# ---------------------------------------------------------------------------------------------------------------
# A data set
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyPlan:
    seed: int
    index: int
    study_id: str
    patient_no: int
    visit: int
    findings: frozenset[str]
    date: str  # YYYYMMDD
    birth_date: str
    sex: str

    @property
    def patient_id(self) -> str:
        return patient_id(self.seed, self.patient_no)


def study_id(seed: int, index: int) -> str:
    return f"synth-s{seed}-{index:05d}"


def patient_id(seed: int | str, patient_no: int) -> str:
    return f"SYNTH-S{seed}-P{patient_no:05d}"


def plan_studies(
    seed: int, count: int, difficulty: float = 1.0, studies_per_patient: tuple[int, int] = (1, 3)
) -> list[StudyPlan]:
    """Studies 0..count-1: patient n has 1-3 consecutive studies (drawn from (seed, n), independent of
    ``count``), its chronic findings persist between visits, and visits are 1-400 days apart."""
    lo, hi = studies_per_patient
    plans: list[StudyPlan] = []
    patient_no = 0
    while len(plans) < count:
        prng = np.random.default_rng([seed, patient_no, 1])
        visits = int(prng.integers(lo, hi + 1))
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=int(prng.integers(0, 365 * 70)))
        date = dt.date(2015, 1, 1) + dt.timedelta(days=int(prng.integers(0, 365 * 8)))
        sex = "F" if prng.random() < 0.5 else "M"
        previous: set[str] = set()
        for visit in range(visits):
            index = len(plans)
            if index >= count:
                break
            findings = sample_study_findings(np.random.default_rng([seed, index, 1]), difficulty)
            keep = np.random.default_rng([seed, index, 3]).random(len(FINDING_IDS)) < PERSIST
            findings |= {
                f for f, k in zip(FINDING_IDS, keep, strict=True) if k and f in previous and _persists(f)
            }
            plans.append(
                StudyPlan(
                    seed=seed,
                    index=index,
                    study_id=study_id(seed, index),
                    patient_no=patient_no,
                    visit=visit,
                    findings=frozenset(findings),
                    date=date.strftime("%Y%m%d"),
                    birth_date=birth.strftime("%Y%m%d"),
                    sex=sex,
                )
            )
            previous = set(findings)
            date += dt.timedelta(days=int(prng.integers(1, 401)))
        patient_no += 1
    return plans


def _persists(fid: str) -> bool:
    return category_of(fid) in PERSISTENT_CATEGORIES or fid in PERSISTENT_EXTRA


def _write_study(args: tuple) -> bool:
    """Render and write one study (a worker function); False when it already exists."""
    plan, seed, out_dir, fmt, shape, difficulty = args
    out_dir = Path(out_dir)
    target = out_dir / (plan.study_id if fmt == "dicom" else f"{plan.study_id}.nii.gz")
    if target.exists():
        return False
    hu = make_phantom(
        np.random.default_rng([seed, plan.index, 2]),
        shape,
        None,
        plan.findings,
        difficulty,
        anatomy_seed=[seed, plan.patient_no, 99],
    )
    spacing = spacing_for(shape)
    # world position of voxel (0,0,0): the grid is centred on the FOV (see molre.data.phantom)
    origin = tuple(-n * d / 2 + d / 2 for n, d in zip(shape[::-1], spacing[::-1], strict=True))
    tmp = out_dir / f".tmp-{target.name}"
    if fmt == "dicom":
        shutil.rmtree(tmp, ignore_errors=True)
        write_dicom_series(hu, spacing, tmp, origin_xyz=origin, **_dicom_identity(plan, seed))
    else:
        write_nifti(hu, spacing, tmp, origin_xyz=origin)
    os.replace(tmp, target)
    return True


def _dicom_identity(plan: StudyPlan, seed: int) -> dict:
    """Clearly fake PHI and deterministic UIDs for one study."""
    from pydicom.uid import generate_uid

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=["molre-synth", str(seed), str(plan.index), kind]))

    return dict(
        patient_id=plan.patient_id,
        patient_name=f"SYNTH^PATIENT{plan.patient_no:05d}",
        study_uid=uid("study"),
        series_uid=uid("series"),
        study_date=plan.date,
        institution="SYNTH GENERAL",
        accession=f"SYNACC{seed:04d}{plan.index:06d}",
        description="SYNTH HEAD CT NONCONTRAST",
        extra={
            "PatientBirthDate": plan.birth_date,
            "PatientSex": plan.sex,
            "ReferringPhysicianName": "SYNTH^REFERRER",
            "StationName": "SYNTHCT01",
        },
    )


@dataclass(frozen=True)
class GenerationReport:
    labels_path: Path
    plans: list[StudyPlan]
    written: int

    def summary(self) -> str:
        patients = len({p.patient_no for p in self.plans})
        per_category = {
            c: sum(any(category_of(f) == c for f in p.findings) for p in self.plans) for c in CATEGORY_SIZES
        }
        normal = sum(not p.findings for p in self.plans)
        cats = ", ".join(f"{c}={n}" for c, n in per_category.items())
        return (
            f"{len(self.plans)} studies ({self.written} written, {len(self.plans) - self.written} already present), "
            f"{patients} patients; studies positive per category: {cats}; normal={normal}"
        )


def run_generation(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    fmt: str = "dicom",
    shape: Sequence[int] = DEFAULT_SHAPE,
    difficulty: float = 1.0,
    studies_per_patient: tuple[int, int] = (1, 3),
    workers: int = 1,
    progress: bool = False,
) -> GenerationReport:
    if fmt not in ("dicom", "nifti"):
        raise MolreError(f"synth: unknown format {fmt!r} (dicom or nifti)")
    if count < 0:
        raise MolreError(f"synth: count must be >= 0, got {count}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise MolreError(f"synth: shape must be D,H,W with each >= 8, got {shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_studies(seed, count, difficulty, studies_per_patient)
    jobs = [(plan, seed, str(out), fmt, shape, difficulty) for plan in plans]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = _progress(pool.map(_write_study, jobs), len(jobs), progress)
            written = sum(results)
    else:
        written = sum(_progress(map(_write_study, jobs), len(jobs), progress))
    return GenerationReport(_write_labels(out, plans), plans, written)


def _progress(iterable, total: int, enabled: bool):
    if not enabled:
        return list(iterable)
    from tqdm import tqdm

    return list(tqdm(iterable, total=total, desc="synth", unit="study"))


def _write_labels(out: Path, plans: list[StudyPlan]) -> Path:
    """``labels.csv``: study_id, patient_id, then one 0/1 column per finding id in taxonomy order."""
    path = out / "labels.csv"
    tmp = out / ".labels.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", "patient_id", *FINDING_IDS])
        for plan in plans:
            writer.writerow([plan.study_id, plan.patient_id, *(int(f in plan.findings) for f in FINDING_IDS)])
    os.replace(tmp, path)
    return path


def generate(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    fmt: str = "dicom",
    shape: Sequence[int] = DEFAULT_SHAPE,
    difficulty: float = 1.0,
    studies_per_patient: tuple[int, int] = (1, 3),
    workers: int = 1,
) -> Path:
    """Write ``count`` studies (DICOM series ``out_dir/<study_id>/IM-*.dcm`` or ``out_dir/<study_id>.nii.gz``) and
    ``out_dir/labels.csv``; studies already present are kept. Returns the labels.csv path."""
    return run_generation(
        out_dir, count, seed, fmt, shape, difficulty, studies_per_patient, workers
    ).labels_path


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be D,H,W integers, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"shape must be D,H,W, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--count", required=True, type=int, help="number of studies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="fmt", choices=("dicom", "nifti"), default="dicom")
    parser.add_argument("--shape", type=_shape, default=DEFAULT_SHAPE, help="D,H,W (default 40,256,256)")
    parser.add_argument("--difficulty", type=float, default=1.0, help="0 easy .. 3 very hard (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report = run_generation(
        args.out,
        args.count,
        seed=args.seed,
        fmt=args.fmt,
        shape=args.shape,
        difficulty=args.difficulty,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"molre synth: {report.summary()} -> {report.labels_path}")
    return 0


__all__ = [
    "COOCCURRENCE",
    "PREVALENCE",
    "generate",
    "make_phantom",
    "prevalence_at",
    "render_phantom",
    "run_generation",
    "sample_study_findings",
    "spacing_for",
]
