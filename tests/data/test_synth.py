"""Synthetic head CT phantoms: anatomy, each finding's signature, label sampling, dataset writing and the CLI."""

from __future__ import annotations

import csv
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache

import nibabel as nib
import numpy as np
import pydicom
import pytest

from molre.cli import main as cli_main
from molre.data import synth
from molre.data.lesions import MODIFIERS, PLANTERS, knobs_for
from molre.data.phantom import CEREBRUM, CSF_SPACES, INTRACRANIAL, PARENCHYMA, SKULL, Tissue, tissue_lut
from molre.findings import FINDING_IDS

SHAPE = (32, 128, 128)  # 5 x 1.875 x 1.875 mm
SEED = 3
TINY = (12, 48, 48)  # for the writers: ~13 x 5 x 5 mm voxels


@cache
def baseline():
    return synth.render_phantom(np.random.default_rng(SEED), SHAPE)


@cache
def with_finding(fid: str) -> np.ndarray:
    return synth.make_phantom(np.random.default_rng(SEED), SHAPE, findings={fid})


# ---- anatomy -------------------------------------------------------------------------------------------------


def test_phantom_is_deterministic_int16_and_varies_by_seed():
    a = synth.make_phantom(np.random.default_rng(1), TINY)
    b = synth.make_phantom(np.random.default_rng(1), TINY)
    c = synth.make_phantom(np.random.default_rng(2), TINY)
    assert a.dtype == np.int16 and a.shape == TINY
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1024 and a.max() <= 3071


@pytest.mark.parametrize(
    ("tissue", "lo", "hi"),
    [
        (Tissue.AIR, -1024, -950),
        (Tissue.SCALP, 0, 60),
        (Tissue.BONE, 700, 1800),
        (Tissue.DIPLOE, 300, 1100),
        (Tissue.GREY, 33, 47),
        (Tissue.WHITE, 22, 34),
        (Tissue.DEEP_GREY, 28, 44),
        (Tissue.VENTRICLE, -5, 15),
        (Tissue.CEREBELLUM, 25, 45),
        (Tissue.FAT, -120, -30),
        (Tissue.SINUS_AIR, -1024, -600),
    ],
)
def test_tissue_densities_are_plausible(tissue, lo, hi):
    ph = baseline()
    voxels = ph.hu[ph.head.labels == tissue]
    assert voxels.size > 20, f"{tissue.name} missing from the phantom"
    assert lo <= np.median(voxels) <= hi


def test_anatomy_layout():
    ph = baseline()
    head, labels = ph.head, ph.head.labels
    # layers outwards from the brain: scalp outside bone outside CSF outside parenchyma
    t = head.t
    assert np.median(t[labels == Tissue.SCALP]) > np.median(t[labels == Tissue.BONE]) > 0
    assert np.median(t[labels == Tissue.CSF]) < 0
    # ventricles near the centre, sinuses low and anterior, cerebellum low and posterior
    assert np.abs(head.X[labels == Tissue.VENTRICLE]).mean() < 20
    assert head.Z[labels == Tissue.SINUS_AIR].mean() < -30 and head.Y[labels == Tissue.SINUS_AIR].mean() < -20
    assert (
        head.Z[labels == Tissue.CEREBELLUM].mean() < -25 and head.Y[labels == Tissue.CEREBELLUM].mean() > 25
    )
    # both hemispheres have grey and white matter
    for side in (-1, 1):
        cerebrum = tissue_lut(CEREBRUM)[labels] & (head.X * side > 10)
        assert cerebrum.sum() > 5000


def test_patients_vary_and_anatomy_seed_pins_them():
    a = synth.render_phantom(np.random.default_rng(10), TINY, anatomy_seed=[7, 7])
    b = synth.render_phantom(np.random.default_rng(11), TINY, anatomy_seed=[7, 7])
    c = synth.render_phantom(np.random.default_rng(12), TINY)
    assert a.head.anatomy.size == b.head.anatomy.size != c.head.anatomy.size
    assert not np.array_equal(a.head.pose.rotation, b.head.pose.rotation)  # same patient, repositioned


def test_phantom_speed():
    synth.make_phantom(np.random.default_rng(0), SHAPE)  # warm-up
    start = time.perf_counter()
    synth.make_phantom(
        np.random.default_rng(1), SHAPE, findings={"acute_subdural_hematoma", "cerebral_atrophy"}
    )
    assert time.perf_counter() - start < 1.5  # ~0.05 s on one core; generous for a shared machine


# ---- findings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """Voxels whose HU moved by more than ``threshold`` in ``sign``'s direction (0: either way): at least ``count``
    of them, median new HU in [lo, hi], mostly (60%) in ``where`` before, optionally near the inner table."""

    sign: int
    threshold: float
    lo: float
    hi: float
    where: tuple
    count: int = 3
    near_table: bool = False
    peak: float | None = None  # and some changed voxels must end up above this HU


BRAIN = PARENCHYMA + CSF_SPACES
BLOOD = Signature(+1, 15, 45, 95, INTRACRANIAL)
OUTSIDE = tuple(t for t in Tissue if t not in INTRACRANIAL)
AIR_SPACES = (Tissue.SINUS_AIR, Tissue.MASTOID_AIR, Tissue.NASAL_AIR)

SIGNATURES: dict[str, Signature] = {
    # hemorrhage: hyperdense blood, except the hypodense chronic subdural
    "intraparenchymal_hemorrhage": BLOOD,
    "basal_ganglia_hemorrhage": BLOOD,
    "thalamic_hemorrhage": BLOOD,
    "lobar_hemorrhage": BLOOD,
    "cerebellar_hemorrhage": BLOOD,
    "brainstem_hemorrhage": BLOOD,
    "acute_subdural_hematoma": Signature(+1, 15, 45, 95, INTRACRANIAL, 50, near_table=True),
    "chronic_subdural_hematoma": Signature(-1, 8, -5, 32, INTRACRANIAL, 50, near_table=True),
    "epidural_hematoma": Signature(+1, 15, 45, 95, INTRACRANIAL, 20, near_table=True),
    "subarachnoid_hemorrhage": Signature(+1, 15, 30, 95, INTRACRANIAL, 20),
    "intraventricular_hemorrhage": Signature(+1, 15, 35, 95, (Tissue.VENTRICLE,)),
    "hemorrhagic_transformation": Signature(0, 4, 10, 60, INTRACRANIAL, 50, peak=45),  # hypodense + petechiae
    # vascular
    "acute_infarct": Signature(-1, 4, 10, 36, BRAIN, 50),
    "chronic_infarct": Signature(-1, 8, -5, 28, BRAIN, 50),
    "lacunar_infarct": Signature(-1, 5, -5, 32, BRAIN, 2),
    "loss_of_insular_ribbon": Signature(-1, 4, 15, 40, BRAIN),
    "hyperdense_vessel_sign": Signature(+1, 10, 40, 110, INTRACRANIAL),
    "venous_sinus_thrombosis": Signature(+1, 10, 45, 100, INTRACRANIAL),
    "vascular_malformation": Signature(+1, 10, 35, 300, INTRACRANIAL),
    "aneurysm": Signature(+1, 10, 30, 400, INTRACRANIAL),
    # trauma
    "skull_fracture": Signature(-1, 100, -300, 1000, SKULL),
    "skull_base_fracture": Signature(0, 100, -1024, 1500, SKULL + AIR_SPACES),
    "facial_fracture": Signature(0, 100, -1024, 1500, SKULL + AIR_SPACES),
    "cerebral_contusion": Signature(0, 5, 5, 80, BRAIN),
    "pneumocephalus": Signature(-1, 200, -1024, -150, INTRACRANIAL),
    "scalp_hematoma": Signature(+1, 15, 0, 95, (Tissue.SCALP, Tissue.AIR)),
    # mass / lesion
    "meningioma": Signature(+1, 8, 35, 400, INTRACRANIAL, near_table=True),
    "intra_axial_mass": Signature(-1, 4, 5, 36, BRAIN, 30),
    "metastases": Signature(+1, 8, 32, 80, BRAIN),
    "pituitary_mass": Signature(0, 10, -100, 500, INTRACRANIAL + SKULL),
    "arachnoid_cyst": Signature(-1, 10, -5, 28, INTRACRANIAL, 20),
    "colloid_cyst": Signature(+1, 10, 30, 80, INTRACRANIAL),
    "lipoma": Signature(-1, 50, -130, 0, INTRACRANIAL),
    "bone_lesion": Signature(0, 100, -100, 2100, SKULL),
    "focal_lesion_nonspecific": Signature(-1, 4, 5, 34, BRAIN),
    # structural: anatomy deformed, CSF becoming brain or brain becoming CSF
    "hydrocephalus": Signature(-1, 10, -10, 28, INTRACRANIAL, 200),
    "ventricular_enlargement": Signature(-1, 10, -10, 28, INTRACRANIAL, 50),
    "midline_shift": Signature(0, 10, -10, 60, INTRACRANIAL, 20),
    "subfalcine_herniation": Signature(0, 10, -10, 60, INTRACRANIAL, 20),
    "transtentorial_herniation": Signature(0, 10, -10, 60, INTRACRANIAL, 10),
    "tonsillar_herniation": Signature(+1, 10, 15, 60, INTRACRANIAL),
    "mass_effect": Signature(0, 10, -10, 60, INTRACRANIAL, 20),
    "cerebral_edema": Signature(0, 5, -10, 60, INTRACRANIAL, 200),
    "basal_cistern_effacement": Signature(+1, 10, 12, 60, INTRACRANIAL),
    "sulcal_effacement": Signature(+1, 10, 12, 60, INTRACRANIAL, 20),
    "chiari_malformation": Signature(+1, 10, 15, 60, INTRACRANIAL),
    # chronic / other
    "cerebral_atrophy": Signature(-1, 10, -10, 28, INTRACRANIAL, 200),
    "cerebellar_atrophy": Signature(-1, 10, -10, 28, INTRACRANIAL, 50),
    "small_vessel_ischemic_disease": Signature(-1, 4, 10, 30, (Tissue.WHITE,), 50),
    "encephalomalacia": Signature(-1, 10, -5, 30, BRAIN, 20),
    "porencephalic_cyst": Signature(-1, 10, -5, 28, BRAIN, 20),
    "basal_ganglia_calcification": Signature(+1, 30, 60, 500, PARENCHYMA),
    "parenchymal_calcification": Signature(+1, 30, 60, 500, BRAIN),
    "vascular_calcification": Signature(+1, 30, 60, 700, INTRACRANIAL + (Tissue.SOFT,)),
    "dural_calcification": Signature(+1, 30, 60, 900, INTRACRANIAL),
    "choroid_plexus_calcification": Signature(+1, 20, 15, 400, INTRACRANIAL),
    "paranasal_sinusitis": Signature(+1, 200, -700, 80, AIR_SPACES + SKULL, 10),
    "mucous_retention_cyst": Signature(+1, 200, -800, 80, AIR_SPACES + SKULL),
    "mastoid_opacification": Signature(+1, 200, -800, 400, AIR_SPACES + SKULL),  # fluid between bony septa
    "sinus_related_complication": Signature(0, 10, -800, 400, INTRACRANIAL + AIR_SPACES + SKULL, 20),
    "postoperative_changes": Signature(0, 50, -1024, 1500, OUTSIDE + INTRACRANIAL, 10),
    "craniotomy_defect": Signature(-1, 300, -200, 700, SKULL, 50),
    "ventricular_shunt": Signature(+1, 300, 200, 3071, OUTSIDE + INTRACRANIAL, 10),
    "clip_or_coil": Signature(0, 20, -300, 3071, INTRACRANIAL + SKULL + OUTSIDE, 10),
    "hyperostosis_frontalis": Signature(+1, 300, 250, 1600, INTRACRANIAL, 20),
    # a few voxels only, partly averaged with the sella floor
    "empty_sella": Signature(-1, 8, -10, 400, INTRACRANIAL, 1),
    "enlarged_perivascular_spaces": Signature(-1, 5, -10, 36, BRAIN),
    "cavum_septum_pellucidum": Signature(0, 10, -10, 45, INTRACRANIAL),
    "mega_cisterna_magna": Signature(-1, 10, -10, 28, INTRACRANIAL, 10),
    "orbital_abnormality": Signature(0, 20, -1024, 300, OUTSIDE, 10),
    "lens_implant": Signature(0, 20, -200, 400, OUTSIDE),
    "scalp_soft_tissue_lesion": Signature(+1, 200, -800, 60, (Tissue.AIR, Tissue.SCALP)),
    "nasal_septal_deviation": Signature(0, 100, -1024, 500, OUTSIDE),
    "osteoma": Signature(+1, 300, 300, 2100, OUTSIDE),
    "dolichoectasia": Signature(+1, 10, 30, 250, INTRACRANIAL),
}


def test_every_finding_has_a_generator_and_a_signature():
    assert set(SIGNATURES) == set(FINDING_IDS)
    assert set(MODIFIERS) | set(PLANTERS) == set(FINDING_IDS)


@pytest.mark.parametrize("fid", FINDING_IDS)
def test_finding_planted_alone_changes_the_volume_plausibly(fid):
    base = baseline()
    old = base.hu.astype(np.int32)
    new = with_finding(fid).astype(np.int32)
    spec = SIGNATURES[fid]
    diff = new - old
    moved = diff * spec.sign > spec.threshold if spec.sign else np.abs(diff) > spec.threshold
    assert moved.sum() >= spec.count, f"{fid}: only {moved.sum()} voxels changed by > {spec.threshold} HU"
    assert spec.lo <= np.median(new[moved]) <= spec.hi, f"{fid}: median new HU {np.median(new[moved])}"
    where = tissue_lut(spec.where)[base.head.labels[moved]].mean()
    assert where >= 0.6, f"{fid}: only {where:.0%} of the change is where it belongs"
    if spec.near_table:
        assert np.median(base.head.depth[moved]) < 25, f"{fid}: not along the inner table"
    if spec.peak is not None:
        assert (new[moved] > spec.peak).sum() >= 3, f"{fid}: nothing above {spec.peak} HU"


def test_findings_are_distinct_from_each_other():
    """No two findings produce the same change (a model could in principle tell each apart)."""
    base = baseline().hu.astype(np.int32)
    fingerprints = {}
    for fid in FINDING_IDS:
        diff = with_finding(fid).astype(np.int32) - base
        fingerprints[fid] = (np.flatnonzero(np.abs(diff) > 4)[:200].tobytes(), int(diff.sum()))
    assert len(set(fingerprints.values())) == len(FINDING_IDS)


def test_all_findings_together_render():
    hu = synth.make_phantom(np.random.default_rng(4), TINY, findings=set(FINDING_IDS))
    assert hu.shape == TINY and hu.dtype == np.int16


def test_unknown_finding_is_rejected():
    with pytest.raises(ValueError, match="unknown finding"):
        synth.make_phantom(np.random.default_rng(0), TINY, findings={"not_a_finding"})


def test_difficulty_knobs():
    easy, hard = knobs_for(0.0), knobs_for(2.0)
    assert easy.size > 1.0 > hard.size and easy.contrast > hard.contrast and easy.noise_hu < hard.noise_hu

    def edh_and_noise(difficulty):
        clean = synth.render_phantom(np.random.default_rng(SEED), SHAPE, difficulty=difficulty)
        edh = synth.make_phantom(np.random.default_rng(SEED), SHAPE, None, {"epidural_hematoma"}, difficulty)
        white = clean.hu[clean.head.labels == Tissue.WHITE]
        return (np.abs(edh.astype(int) - clean.hu) > 15).sum(), white.std()

    (edh_easy, noise_easy), (edh_hard, noise_hard) = edh_and_noise(0.0), edh_and_noise(2.0)
    assert edh_easy > edh_hard and noise_easy < noise_hard


# ---- labels --------------------------------------------------------------------------------------------------


@cache
def sampled(n: int = 4000, difficulty: float = 1.0) -> list[set[str]]:
    rng = np.random.default_rng(0)
    return [synth.sample_study_findings(rng, difficulty) for _ in range(n)]


def test_prevalence_table_covers_the_taxonomy():
    assert list(synth.PREVALENCE) == list(FINDING_IDS)
    assert all(0 < p < 0.5 for p in synth.PREVALENCE.values())
    for triggers, consequence, probability in synth.COOCCURRENCE:
        assert set(triggers) <= set(FINDING_IDS) and consequence in FINDING_IDS and 0 < probability <= 1


def test_prevalence_is_long_tailed():
    studies = sampled()
    freq = Counter(f for s in studies for f in s)
    rate = {fid: freq[fid] / len(studies) for fid in FINDING_IDS}
    assert 0.15 < rate["cerebral_atrophy"] < 0.35
    assert 0.12 < rate["small_vessel_ischemic_disease"] < 0.35
    assert 0.12 < rate["paranasal_sinusitis"] < 0.3
    assert max(rate.values()) < 0.4
    assert sum(r < 0.01 for r in rate.values()) >= 25  # a long tail of rare findings
    assert 0.05 < sum(not s for s in studies) / len(studies) < 0.5  # some normal studies


def test_cooccurrence():
    studies = sampled()
    for s in studies:
        if "hydrocephalus" in s:
            assert "ventricular_enlargement" in s
        if "subfalcine_herniation" in s:
            assert "midline_shift" in s
        if s.intersection({"basal_ganglia_hemorrhage", "thalamic_hemorrhage", "lobar_hemorrhage"}):
            assert "intraparenchymal_hemorrhage" in s

    def conditional(target, given):
        with_given = [s for s in studies if given in s]
        return sum(target in s for s in with_given) / max(1, len(with_given))

    base_rate = sum("midline_shift" in s for s in studies) / len(studies)
    assert conditional("midline_shift", "acute_subdural_hematoma") > 3 * base_rate
    assert conditional("scalp_hematoma", "skull_fracture") > 0.4


def test_difficulty_lengthens_the_tail():
    easy, hard = synth.prevalence_at(0.0), synth.prevalence_at(2.0)
    assert easy["colloid_cyst"] > synth.PREVALENCE["colloid_cyst"] > hard["colloid_cyst"]


def test_study_plans_do_not_depend_on_count():
    long, short = synth.plan_studies(5, 12), synth.plan_studies(5, 7)
    assert long[:7] == short
    per_patient = Counter(p.patient_no for p in long)
    assert max(per_patient.values()) >= 2 and len(per_patient) >= 4
    assert all(p.study_id == f"synth-s5-{p.index:05d}" for p in long)


# ---- writing -------------------------------------------------------------------------------------------------


def _labels(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_generate_dicom(tmp_path):
    labels_path = synth.generate(tmp_path / "a", 3, seed=7, shape=TINY)
    rows = _labels(labels_path)
    assert list(rows[0]) == ["study_id", "patient_id", *FINDING_IDS]
    assert [r["study_id"] for r in rows] == [f"synth-s7-{i:05d}" for i in range(3)]
    plans = synth.plan_studies(7, 3)
    spacing = synth.spacing_for(TINY)
    series_uids = set()
    for plan, row in zip(plans, rows, strict=True):
        assert {f for f in FINDING_IDS if row[f] == "1"} == set(plan.findings)
        files = sorted((tmp_path / "a" / plan.study_id).glob("IM-*.dcm"))
        assert len(files) == TINY[0]
        slices = [pydicom.dcmread(f) for f in files]
        first = slices[0]
        assert first.Modality == "CT" and first.InstitutionName == "SYNTH GENERAL"
        assert str(first.PatientName).startswith("SYNTH^PATIENT") and first.PatientID == row["patient_id"]
        assert (
            len({s.SeriesInstanceUID for s in slices}) == 1 and len({s.StudyInstanceUID for s in slices}) == 1
        )
        series_uids.add(first.SeriesInstanceUID)
        z = np.array([float(s.ImagePositionPatient[2]) for s in slices])
        np.testing.assert_allclose(np.diff(z), spacing[0])
        hu = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices])
        expected = synth.make_phantom(
            np.random.default_rng([7, plan.index, 2]),
            TINY,
            None,
            plan.findings,
            anatomy_seed=[7, plan.patient_no, 99],
        )
        np.testing.assert_array_equal(hu, expected)
    assert len(series_uids) == 3

    # same seed elsewhere: byte-identical; a larger count adds studies and leaves the old ones alone
    synth.generate(tmp_path / "b", 3, seed=7, shape=TINY)
    for plan in plans:
        a_files = sorted((tmp_path / "a" / plan.study_id).iterdir())
        b_files = sorted((tmp_path / "b" / plan.study_id).iterdir())
        assert [f.read_bytes() for f in a_files] == [f.read_bytes() for f in b_files]
    before = (tmp_path / "a" / plans[0].study_id / "IM-0001.dcm").stat().st_mtime_ns
    report = synth.run_generation(tmp_path / "a", 5, seed=7, shape=TINY)
    assert report.written == 2 and len(_labels(report.labels_path)) == 5
    assert (tmp_path / "a" / plans[0].study_id / "IM-0001.dcm").stat().st_mtime_ns == before


def test_generate_nifti(tmp_path):
    synth.generate(tmp_path, 2, seed=1, fmt="nifti", shape=TINY)
    plans = synth.plan_studies(1, 2)
    for plan in plans:
        image = nib.load(tmp_path / f"{plan.study_id}.nii.gz")
        data = np.asanyarray(image.dataobj).transpose(2, 1, 0)
        expected = synth.make_phantom(
            np.random.default_rng([1, plan.index, 2]),
            TINY,
            None,
            plan.findings,
            anatomy_seed=[1, plan.patient_no, 99],
        )
        np.testing.assert_array_equal(data, expected)
        np.testing.assert_allclose(image.header.get_zooms(), synth.spacing_for(TINY)[::-1])
    assert len(_labels(tmp_path / "labels.csv")) == 2


def test_generate_rejects_bad_arguments(tmp_path):
    from molre.errors import MolreError

    with pytest.raises(MolreError, match="format"):
        synth.generate(tmp_path, 1, fmt="png", shape=TINY)
    with pytest.raises(MolreError, match="shape"):
        synth.generate(tmp_path, 1, shape=(4, 48, 48))


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--count", "3", "--seed", "2", "--format", "nifti"]
    argv += ["--shape", "12,48,48"]
    assert cli_main([*argv, "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "3 studies (3 written" in summary and "patients" in summary and "hemorrhage=" in summary
    assert len(list(out.glob("*.nii.gz"))) == 3
    assert cli_main([*argv, "--difficulty", "2"]) == 0  # with the progress bar; all present already
    assert "0 written" in capsys.readouterr().out
