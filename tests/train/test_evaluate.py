"""evaluate / predict on a checkpoint written in the real format (no training run needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from molre.cli import main
from molre.config import build_config
from molre.data.synth import generate
from molre.errors import WeightsError
from molre.findings import FINDING_IDS
from molre.models import build_model
from molre.train.checkpoint import TrainState, save_checkpoint, trained_state
from molre.train.evaluate import evaluate
from molre.train.loop import make_optimizer
from molre.train.predict import predict
from molre.train.scoring import load_checkpoint_model
from tests.tiny_data import GRID, SPACING


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = build_config({"backbone": {"preset": "tiny-vit"}, "train": {"seed": 3, "batch_size": 4}})
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    with torch.no_grad():
        model.molre.B.normal_(0, 0.1)  # trained-looking adapters, so loading them is observable
    directory = tmp_path_factory.mktemp("ckpt")
    state = TrainState(epoch=0, best_epoch=0, best_metric=0.5, finished=True)
    setup = {"grid": list(GRID), "spacing": list(SPACING), "input_size": list(GRID)}
    save_checkpoint(
        directory, model, make_optimizer(model, cfg), state, cfg, trained_state(model), None, setup
    )
    return str(directory), model


def test_checkpoint_reloads_the_same_model(checkpoint):
    directory, model = checkpoint
    loaded, cfg, setup = load_checkpoint_model(directory)
    x = torch.rand(1, 3, 8, 64, 64)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    with pytest.raises(WeightsError, match="holds preset tiny-vit, not tiny-davit"):
        load_checkpoint_model(directory, preset="tiny-davit")


def test_evaluate_writes_per_finding_aucs(checkpoint, tiny_dataset, tmp_path, capsys):
    directory, _ = checkpoint
    result = evaluate(directory, tiny_dataset, "test", str(tmp_path / "eval"))
    assert (
        main(
            ["evaluate", directory, "--data", tiny_dataset, "--out", str(tmp_path / "cli"), "--device", "cpu"]
        )
        == 0
    )
    assert "over 3 findings on 12 volumes" in capsys.readouterr().out
    table = pd.read_parquet(tmp_path / "eval" / "per_finding_auc.parquet")
    assert list(table["finding"]) == list(FINDING_IDS)
    assert table["auc"].notna().sum() == result["n_defined"] == 3  # the tiny set plants three findings
    assert result["volumes"] == 12
    markdown = (tmp_path / "eval" / "per_finding_auc.md").read_text()
    assert "Mean AUC" in markdown and "undefined" in markdown
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["mean_auc"] == pytest.approx(
        result["mean_auc"]
    )
    # calibration columns always; without --operating-point, nothing about thresholds
    assert list(table.columns) == ["finding", "name", "category", "auc", "n_known", "positives", "n_negative",
                                   "brier", "ece"]  # fmt: skip
    assert not (tmp_path / "eval" / "thresholds.json").exists() and "operating_point" not in result
    scores = pd.read_parquet(tmp_path / "eval" / "scores.parquet")
    s, y = (np.stack(scores[c].to_list()).astype(np.float64) for c in ("scores", "labels"))
    np.testing.assert_allclose(table["brier"], ((s - y) ** 2).mean(0))  # every label known in the tiny set
    assert result["mean_brier"] == pytest.approx(table["brier"].mean()) and 0 < result["mean_ece"] < 1
    assert "Brier | ECE |" in markdown and "mean ECE" in markdown
    # beside them, the means over the findings with a known positive (the tiny set's three planted ones)
    positive = table["positives"] > 0
    assert result["calibration"]["findings_with_positives"] == positive.sum() == 3
    assert result["mean_brier_with_positives"] == pytest.approx(table["brier"][positive].mean())
    assert result["mean_ece_with_positives"] == pytest.approx(table["ece"][positive].mean())
    assert (
        f"over the 3 findings with a known positive: mean Brier score {result['mean_brier_with_positives']:.4f}"
        in (markdown)
    )


def test_calibration_means_over_the_findings_with_a_known_positive_leave_the_all_negative_ones_out():
    from molre.train.evaluate import _add_calibration, _per_finding_table

    # 4 studies x 75 findings, every score 0.1: finding 0 has 2 known positives (Brier (0.81 + 0.81 + 0.01 +
    # 0.01) / 4 = 0.41), finding 1 one positive whose label is unknown, the rest none (Brier 0.01 each)
    scores = np.full((4, len(FINDING_IDS)), 0.1, np.float32)
    labels = np.zeros((4, len(FINDING_IDS)), np.uint8)
    known = np.ones_like(labels)
    labels[:2, 0] = 1
    labels[0, 1], known[0, 1] = 1, 0
    table = _per_finding_table(np.full(len(FINDING_IDS), np.nan), labels, known)
    result = _add_calibration(table, scores, labels, known)
    assert result["mean_brier_with_positives"] == pytest.approx(0.41)
    assert result["mean_ece_with_positives"] == pytest.approx(0.4)  # |2 - 0.4| / 4, one bin
    assert result["calibration"]["findings_with_positives"] == 1
    assert result["calibration"]["findings"] == len(FINDING_IDS)
    assert result["mean_brier"] == pytest.approx((0.41 + 74 * 0.01) / 75)  # the all-negative ones dominate


def test_summary_is_strict_json_when_no_finding_has_an_auc(checkpoint, tmp_path, capsys):
    from tests.tiny_data import write_tiny_dataset

    directory, _ = checkpoint
    one = write_tiny_dataset(str(tmp_path / "one"), counts={"test": 1})  # one volume: one class per finding
    out = tmp_path / "eval"
    assert main(["evaluate", directory, "--data", one, "--out", str(out), "--device", "cpu"]) == 0
    assert "no AUC: no finding has both classes" in capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(f"summary.json holds {constant}, which strict JSON parsers reject")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["mean_auc"] is None and summary["std_auc"] is None
    assert summary["n_defined"] == 0 and len(summary["undefined"]) == len(FINDING_IDS)


def test_predict_one_dicom_series(checkpoint, tmp_path, capsys):
    directory, _ = checkpoint
    generate(tmp_path / "series", 1, seed=5, shape=(16, 64, 64))
    series = next(p for p in (tmp_path / "series").iterdir() if p.is_dir())
    out = predict(directory, str(series))
    probs = np.array(list(out["probabilities"].values()))
    assert list(out["probabilities"]) == list(FINDING_IDS) and ((probs > 0) & (probs < 1)).all()
    assert np.array(out["router_weights"]).shape == (8, 6)  # one routing vector per slice, K = 6
    assert np.sum(out["slice_attention"]) == pytest.approx(1.0, abs=1e-4)
    assert main(["predict", directory, "--input", str(series), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["probabilities"].keys() == out["probabilities"].keys()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="is not a molre checkpoint"):
        load_checkpoint_model(str(tmp_path))


def test_blocks_checkpoints_from_before_route_by_keep_token_routing(tmp_path):
    import yaml

    from molre.config import config_to_dict
    from molre.train.checkpoint import read_config

    raw = config_to_dict(build_config({"adapter": {"molre": {"placement": "blocks"}}}))
    assert raw["adapter"]["molre"].pop("route_by") == "slice"  # today's default
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert read_config(tmp_path).adapter.molre.route_by == "token"  # what that run trained with
    raw["adapter"]["molre"]["route_by"] = "slice"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert read_config(tmp_path).adapter.molre.route_by == "slice"


@pytest.mark.parametrize("antialias", [True, False])
def test_predict_prepares_a_study_as_preprocess_prepared_its_training_shard(tmp_path, antialias):
    from molre.data import shards, storage
    from molre.data.preprocess import preprocess
    from molre.train.checkpoint import RECORDED_AS_IS, preprocessing_facts
    from molre.train.predict import study_volume, this_molre_preprocessing

    labels = generate(tmp_path / "raw", 1, seed=3, shape=(64, 64, 64))  # 2.5 mm slices -> 8 mm: a 3.2x shrink
    manifest = preprocess(tmp_path / "raw", labels, "generic", str(tmp_path / "shards"), spacing=(8.0, 4.0, 4.0),
                          grid=(20, 48, 48), antialias=antialias, executor="inline", salt="t")  # fmt: skip
    (info,) = manifest.shards  # one study, one shard
    row = shards.read_shard(storage.join(str(tmp_path / "shards"), info.path)).to_pylist()[0]
    setup = {"grid": [20, 48, 48], "spacing": [8.0, 4.0, 4.0], **preprocessing_facts(manifest.config)}
    assert setup["antialias"] is antialias
    # what predict compares a checkpoint's record with is what preprocess records of the data it writes
    assert this_molre_preprocessing() == {key: manifest.config[key] for key in RECORDED_AS_IS}
    series = next(p for p in (tmp_path / "raw").iterdir() if p.is_dir())
    np.testing.assert_array_equal(study_volume(str(series), setup), shards.decode_volume(row))
    other = study_volume(str(series), {**setup, "antialias": not antialias})
    assert (other != shards.decode_volume(row)).sum() > 1000  # the setting matters for this study


def test_predict_takes_a_nifti_file_or_a_dicom_file_and_refuses_several_studies(tmp_path):
    from molre.errors import DataError
    from molre.train.predict import study_volume

    setup = {"grid": [8, 32, 32], "spacing": [8.0, 4.0, 4.0], "antialias": True, "min_slices": 8}
    generate(tmp_path / "nii", 1, seed=4, fmt="nifti", shape=(16, 64, 64))
    (nifti,) = (tmp_path / "nii").glob("*.nii.gz")
    assert study_volume(str(nifti), setup).shape == (8, 32, 32)  # a file, not only a folder
    generate(tmp_path / "dcm", 2, seed=4, shape=(16, 64, 64), studies_per_patient=(1, 1))
    folders = sorted(p for p in (tmp_path / "dcm").iterdir() if p.is_dir())
    one_file = sorted(folders[0].iterdir())[3]
    np.testing.assert_array_equal(study_volume(str(one_file), setup), study_volume(str(folders[0]), setup))
    with pytest.raises(DataError, match="holds 2 studies"):
        study_volume(str(tmp_path / "dcm"), setup)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM series or NIfTI file found"):
        study_volume(str(tmp_path / "empty"), setup)


def test_a_checkpoint_from_before_the_preprocessing_facts_reads_as_not_anti_aliased(checkpoint, tmp_path):
    from molre.train.checkpoint import read_setup

    directory, _ = checkpoint
    assert read_setup(directory)["antialias"] is False and read_setup(directory)["min_slices"] == 8
    with pytest.raises(WeightsError, match="setup.json: not a readable molre setup"):
        read_setup(tmp_path)


# ---- evaluate: the data's preprocessing against the checkpoint's, provenance, per-study scores, CIs ----------


def _stamped(root: str, **config) -> str:
    """A 4-study test set whose manifest records ``config`` (its shards as written: only the record differs)."""
    from molre.data import shards
    from tests.tiny_data import write_tiny_dataset

    write_tiny_dataset(root, counts={"test": 4}, seed=1)
    manifest = shards.read_manifest(root)
    manifest.config.update(config)
    (Path(root) / shards.MANIFEST).write_text(manifest.to_json())
    return root


def test_evaluate_refuses_data_preprocessed_unlike_the_checkpoint_unless_told(
    checkpoint, tmp_path, capsys, caplog
):
    from molre.errors import DataError

    directory, _ = checkpoint  # trained on 8x64x64 at 4x4x4 mm, no anti-aliasing (SPACING, GRID)
    other = _stamped(str(tmp_path / "other"), spacing=[4.0, 3.0, 3.0], antialias=True)  # same tensor shape
    spacing = "spacing: [4, 4, 4] (checkpoint) vs [4, 3, 3] (data)"
    antialias = "antialias: false (checkpoint) vs true (data)"
    out = tmp_path / "eval"
    with pytest.raises(DataError, match="--allow-preprocessing-mismatch") as refused:
        evaluate(directory, other, "test", str(out))
    assert refused.value.path == f"{other}/manifest.json"
    assert all(part in str(refused.value) for part in (spacing, antialias, directory))
    assert not out.exists()  # refused before anything was scored or written
    assert main(["evaluate", directory, "--data", other, "--out", str(out), "--device", "cpu"]) == 2
    assert spacing in capsys.readouterr().err

    assert main(["evaluate", directory, "--data", other, "--out", str(out), "--device", "cpu",
                 "--allow-preprocessing-mismatch"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preprocessing"]["mismatches"] == [spacing, antialias]
    assert summary["preprocessing"]["mismatch_allowed"] is True
    assert any(spacing in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert spacing in (out / "per_finding_auc.md").read_text()


def test_checkpoints_record_every_preprocessing_setting_and_older_ones_say_what_was_not_compared(
    checkpoint, tmp_path
):
    from molre.data.preprocess import PreprocessConfig
    from molre.errors import DataError
    from molre.train.checkpoint import preprocessing_facts, read_setup

    directory, _ = checkpoint
    config = PreprocessConfig(spacing=SPACING, grid=GRID, antialias=False).as_dict()  # preprocess records it
    facts = preprocessing_facts(config)  # what the driver's prepare() gives the workers (+ grid and spacing)
    model, cfg, _ = load_checkpoint_model(directory)
    recent = tmp_path / "recent"
    recent.mkdir()
    setup = {"grid": list(GRID), "spacing": list(SPACING), "input_size": list(GRID), **facts}
    state = TrainState(epoch=0, best_epoch=0, best_metric=0.5, finished=True)
    save_checkpoint(recent, model, make_optimizer(model, cfg), state, cfg, trained_state(model), None, setup)
    recorded = read_setup(recent)
    assert {k: recorded[k] for k in ("hu_range", "pad_value", "interpolation")} == {
        "hu_range": [-1024, 3071], "pad_value": -1024, "interpolation": "trilinear"}  # fmt: skip
    assert recorded["alignment"] == config["alignment"]

    clipped = _stamped(str(tmp_path / "clipped"), **{**config, "hu_range": [-1000, 3000]})
    changed = r"hu_range: \[-1024, 3071\] \(checkpoint\) vs \[-1000, 3000\] \(data\)"
    with pytest.raises(DataError, match=changed):
        evaluate(str(recent), clipped, "test", str(tmp_path / "refused"))

    # the fixture's setup.json predates these settings: compared where both record them, the rest named
    same = _stamped(str(tmp_path / "same"), **config)
    older = evaluate(directory, same, "test", str(tmp_path / "older"))["preprocessing"]
    assert older["mismatches"] == []
    assert older["not_compared"] == dict.fromkeys(
        ("hu_range", "pad_value", "alignment", "interpolation"), "not recorded by the checkpoint"
    )


def test_evaluate_output_is_auditable_and_one_dataset_never_overwrites_another(
    checkpoint, tiny_dataset, tmp_path
):
    import molre
    from molre.data import shards
    from molre.train.metrics import per_finding_auc

    directory, _ = checkpoint
    internal = evaluate(directory, tiny_dataset, "test")  # default output folder
    sha256 = shards.read_manifest_and_sha256(tiny_dataset)[1]
    assert internal["out_dir"] == f"{directory}/eval-test-{sha256[:12]}"
    external = _stamped(str(tmp_path / "external"))  # another test set, preprocessed alike
    assert evaluate(directory, external, "test")["out_dir"] != internal["out_dir"]

    folder = internal["out_dir"]
    summary = json.loads(Path(folder, "summary.json").read_text())
    assert {k: summary[k] for k in ("checkpoint", "data", "split", "manifest_sha256", "molre_version")} == {
        "checkpoint": directory, "data": tiny_dataset, "split": "test", "manifest_sha256": sha256,
        "molre_version": molre.__version__}  # fmt: skip
    assert summary["training_dataset_sha256"] is None  # the fixture's checkpoint has no fingerprint.json

    (shard,) = shards.list_shards(tiny_dataset, "test")
    rows = {row["study_hash"]: row for row in shards.read_shard(shard).to_pylist()}
    scores = pd.read_parquet(f"{folder}/scores.parquet").set_index("study_hash")
    assert sorted(scores.index) == sorted(rows) and len(scores) == 12
    for column in ("labels", "known", "patient_hash"):
        assert all(np.array_equal(scores.loc[h, column], rows[h][column]) for h in rows)
    table = pd.read_parquet(f"{folder}/per_finding_auc.parquet")
    recomputed = per_finding_auc(*(np.stack(scores[c].to_list()) for c in ("scores", "labels", "known")))
    np.testing.assert_allclose(table["auc"], recomputed, equal_nan=True)  # the scores the AUCs came from
    labels = np.stack([rows[h]["labels"] for h in rows])
    assert (table["n_known"] == 12).all() and list(table["positives"]) == list(labels.sum(0))
    assert (table["positives"] + table["n_negative"] == table["n_known"]).all()


def test_the_study_bootstrap_counts_each_drawn_study_as_a_repeated_row():
    from sklearn.metrics import roc_auc_score

    from molre.train.operating_points import weighted_auc

    rng = np.random.default_rng(0)
    score = np.round(rng.random(40), 1)  # ties within and across classes
    label, known = rng.random(40) < 0.4, rng.random(40) < 0.8
    counts = rng.multinomial(40, np.full(40, 1 / 40), size=20)
    for auc, drawn in zip(weighted_auc(score, label, known, counts.astype(float)), counts, strict=True):
        rows = np.repeat(np.arange(40), drawn)
        rows = rows[known[rows]]
        assert auc == pytest.approx(roc_auc_score(label[rows], score[rows]), abs=1e-12)
    assert np.isnan(weighted_auc(score, np.zeros(40, bool), known, counts.astype(float))).all()  # one class


def test_evaluate_bootstrap_gives_study_level_cis(checkpoint, tiny_dataset, tmp_path, capsys):
    from molre.train.evaluate import bootstrap_auc_ci

    directory, _ = checkpoint
    out = tmp_path / "eval"
    argv = ["evaluate", directory, "--data", tiny_dataset, "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--bootstrap", "200"]) == 0
    assert "(95% CI " in capsys.readouterr().out
    table = pd.read_parquet(out / "per_finding_auc.parquet")
    defined = table["auc"].notna()
    assert (table["auc_ci_low"][defined] <= table["auc"][defined]).all()
    assert (table["auc"][defined] <= table["auc_ci_high"][defined]).all()
    assert (table["auc_ci_high"] > table["auc_ci_low"])[defined].all()  # 12 studies: wide, not a point
    assert table["auc_ci_low"][~defined].isna().all()
    summary = json.loads((out / "summary.json").read_text())
    low, high = summary["mean_auc_ci"]
    assert low <= summary["mean_auc"] <= high and summary["bootstrap"]["resamples"] == 200
    assert "95% CI" in (out / "per_finding_auc.md").read_text()
    scores = pd.read_parquet(out / "scores.parquet")
    again = bootstrap_auc_ci(*(np.stack(scores[c].to_list()) for c in ("scores", "labels", "known")), 200)
    np.testing.assert_array_equal(again[0], table["auc_ci_low"])  # seeded: a re-run gives the same CIs
    assert again[2] == summary["mean_auc_ci"]
    assert main([*argv, "--bootstrap", "-1"]) == 2
    assert "bootstrap: -1 resamples" in capsys.readouterr().err


def test_preprocessing_settings_are_compared_as_values_and_unrecorded_ones_are_named():
    from molre.train.checkpoint import preprocessing_changes

    trained = {"grid": [8, 64, 64], "spacing": [4, 4, 4], "antialias": True, "hu_range": [-1024, 3071]}
    data = {"grid": [8, 64, 64], "spacing": [4.0, 4.0, 4.0], "antialias": True, "min_slices": 8,
            "pad_value": -1024}  # fmt: skip
    changes, unknown = preprocessing_changes(trained, data)  # min_slices: the default (8) on both sides
    assert changes == []
    assert unknown == {"hu_range": "not recorded by the data", "pad_value": "not recorded by the checkpoint",
                       "alignment": "recorded by neither", "interpolation": "recorded by neither"}  # fmt: skip
    changes, _ = preprocessing_changes(trained, {**data, "grid": [16, 64, 64], "min_slices": 4})
    assert changes == ["grid: [8, 64, 64] (checkpoint) vs [16, 64, 64] (data)",
                       "min_slices: 8 (checkpoint) vs 4 (data)"]  # fmt: skip


# ---- evaluate scores as the run's validation did: bf16 autocast for a bf16 run, fp32 as before otherwise ------


def _with_precision(directory: str, target: Path, precision: str) -> str:
    """A copy of the checkpoint at ``directory`` recorded as trained under ``train.precision=precision``."""
    import shutil

    import yaml

    shutil.copytree(directory, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["train"]["precision"] = precision
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(target)


def _validation_scores(directory: str, root: str, split: str) -> dict[str, np.ndarray]:
    """{study_hash: scores} as training's validation scores ``split``: the model set up as a worker sets it up
    (``prepare_runtime``: bf16 frozen weights under bf16), then ``loop.score_shard`` on decoded batches."""
    from molre.data import shards
    from molre.data.dataset import decode_batch
    from molre.models.runtime import prepare_runtime
    from molre.train.loop import score_shard

    class Shard:  # what a worker's ShardCache replays: the split's decoded batches
        def iter_batches(self, *, batch_size, batch_format="numpy"):
            for uri in shards.list_shards(root, split):
                for batch in shards.read_shard(uri).to_batches(max_chunksize=batch_size):
                    yield decode_batch(batch.to_pydict())

    model, cfg, setup = load_checkpoint_model(directory)
    prepare_runtime(model, cfg, "cpu")
    out = score_shard(model, cfg, Shard(), setup, torch.device("cpu"))
    return dict(zip(out["study_hash"], out["scores"], strict=True))


def test_evaluate_scores_as_the_runs_validation_bf16_under_autocast_fp32_as_before(
    checkpoint, tiny_dataset, tmp_path
):
    directory, _ = checkpoint  # train.precision auto: fp32 on the CPU
    bf16 = _with_precision(directory, tmp_path / "bf16", "bf16")
    scored = {}
    for name, ckpt in (("fp32", directory), ("bf16", bf16)):
        result = evaluate(ckpt, tiny_dataset, "test", str(tmp_path / f"eval-{name}"))
        assert result["precision"] == name
        assert f"scored in {name} on cpu" in Path(result["out_dir"], "per_finding_auc.md").read_text()
        table = pd.read_parquet(Path(result["out_dir"], "scores.parquet"))
        scored[name] = dict(zip(table["study_hash"], np.stack(table["scores"].to_list()), strict=True))
        validation = _validation_scores(ckpt, tiny_dataset, "test")
        assert scored[name].keys() == validation.keys()
        for study, scores in validation.items():  # the same bits: what validation reported is reproduced
            np.testing.assert_array_equal(scored[name][study], scores)
    # the test can tell them apart: bf16 rounding moves the tiny model's probabilities by ~1e-3
    assert max(np.abs(scored["bf16"][s] - scored["fp32"][s]).max() for s in scored["fp32"]) > 1e-4


# ---- evaluate at an operating point chosen on another split, and calibration -------------------------------


def test_evaluate_reports_an_operating_point_chosen_on_val_and_applied_to_test(
    checkpoint, tiny_dataset, tmp_path, capsys, monkeypatch
):
    import molre.train.evaluate as evaluate_module
    from molre.data import shards
    from molre.train import operating_points as op

    directory, _ = checkpoint
    scored_splits = []
    score_split = evaluate_module._score_split
    monkeypatch.setattr(evaluate_module, "_score_split",
                        lambda *a: scored_splits.append(a[4]) or score_split(*a))  # fmt: skip
    out = tmp_path / "eval"
    argv = ["evaluate", directory, "--data", tiny_dataset, "--device", "cpu"]
    assert main([*argv, "--out", str(out), "--operating-point", "sensitivity=0.9", "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "at sensitivity=0.9 (thresholds from val): mean sensitivity " in printed
    assert scored_splits == ["test", "val"]  # each split scored once

    # thresholds.json: per finding id, with the rule, the split and the provenance
    saved = json.loads((out / "thresholds.json").read_text())
    sha256 = shards.read_manifest_and_sha256(tiny_dataset)[1]
    assert {k: saved[k] for k in ("format", "rule", "split", "chosen_on_evaluated_split", "checkpoint",
                                  "manifest_sha256", "data")} == {
        "format": "molre-thresholds/1", "rule": "sensitivity=0.9", "split": "val",
        "chosen_on_evaluated_split": False, "checkpoint": directory, "manifest_sha256": sha256,
        "data": tiny_dataset}  # fmt: skip
    assert list(saved["thresholds"]) == list(FINDING_IDS)
    chosen = np.array(
        [np.nan if r["threshold"] is None else r["threshold"] for r in saved["thresholds"].values()]
    )
    assert (~np.isnan(chosen)).sum() == 3  # the three planted findings: both classes in val; the rest none
    assert all(r["sensitivity"] >= 0.9 for r in saved["thresholds"].values() if r["threshold"] is not None)
    assert (
        saved["thresholds"][FINDING_IDS[5]]["reason"] == "no positive among the 24 known labels of split val"
    )

    # the table: existing columns first, unchanged; the test's operating point, recomputed from scores.parquet
    table = pd.read_parquet(out / "per_finding_auc.parquet")
    assert list(table.columns[:9]) == ["finding", "name", "category", "auc", "n_known", "positives",
                                       "n_negative", "auc_ci_low", "auc_ci_high"]  # fmt: skip
    np.testing.assert_array_equal(table["threshold"], chosen)
    scores = pd.read_parquet(out / "scores.parquet")
    s, y, k = (np.stack(scores[c].to_list()) for c in ("scores", "labels", "known"))
    flagged, positive, known = s >= chosen, y.astype(bool), k.astype(bool)  # NaN thresholds flag nothing
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (flagged & positive & known).sum(0) / (positive & known).sum(0)
    defined = ~np.isnan(chosen)
    np.testing.assert_allclose(table["sensitivity"][defined], sensitivity[defined])
    assert list(table["tp"][defined]) == list((flagged & positive & known).sum(0)[defined])
    assert table["sensitivity"][~defined].isna().all() and table["tp"][~defined].isna().all()
    assert (table[["tp", "fp", "tn", "fn"]].sum(axis=1)[defined] == 12).all()  # every test label known
    for name in ("sensitivity", "specificity"):
        assert (table[f"{name}_ci_low"] <= table[name])[defined].all()
        assert (table[name] <= table[f"{name}_ci_high"])[defined].all()

    summary = json.loads((out / "summary.json").read_text())
    point = summary["operating_point"]
    assert point["ci_method"] == "thresholds re-chosen per replicate"
    assert "thresholds re-chosen by sensitivity=0.9 on a resample of val drawn with each" in (
        (out / "per_finding_auc.md").read_text()
    )
    assert point["mean_sensitivity"] == pytest.approx(sensitivity[defined].mean())
    assert (
        point["n_thresholds"] == 3 and len(point["no_threshold"]) == 72 and point["threshold_split"] == "val"
    )
    assert (
        "## Operating point sensitivity=0.9: thresholds chosen on val"
        in (out / "per_finding_auc.md").read_text()
    )

    # the thresholds are val's: choosing on val (allowed explicitly when evaluating val) gives the same ones
    scored_splits.clear()
    on_val = evaluate(directory, tiny_dataset, "val", str(tmp_path / "val"),
                      operating_point="sensitivity=0.9", threshold_split="val",
                      allow_thresholds_on_evaluated_split=True, bootstrap=50)  # fmt: skip
    assert scored_splits == ["val"] and on_val["operating_point"]["chosen_on_evaluated_split"] is True
    val_scores = pd.read_parquet(tmp_path / "val" / "scores.parquet")
    val = tuple(np.stack(val_scores[c].to_list()) for c in ("scores", "labels", "known"))
    rule = op.parse_rule("sensitivity=0.9")
    again, _ = op.choose_thresholds(*val, rule)
    np.testing.assert_array_equal(again, chosen)
    assert "optimistic" in (tmp_path / "val" / "per_finding_auc.md").read_text()

    # the CIs re-chose the thresholds on resamples of val (drawn apart from test's), or, on val itself, on the
    # very resample they were judged on
    rechosen = op.bootstrap_rate_cis(s, y, k, chosen, 50, rule=rule, chosen_on=val)
    on_itself = op.bootstrap_rate_cis(*val, chosen, 50, rule=rule)
    val_table = pd.read_parquet(tmp_path / "val" / "per_finding_auc.parquet")
    for name in ("sensitivity", "specificity"):
        for cis, written in ((rechosen, table), (on_itself, val_table)):
            np.testing.assert_array_equal(written[f"{name}_ci_low"], cis[name][0])
            np.testing.assert_array_equal(written[f"{name}_ci_high"], cis[name][1])
    assert summary["operating_point"]["mean_sensitivity_ci"] == rechosen["sensitivity"][2]
    assert on_val["operating_point"]["ci_method"] == "thresholds re-chosen per replicate"
    assert (
        "re-chosen by sensitivity=0.9 on the same resample"
        in (tmp_path / "val" / "per_finding_auc.md").read_text()
    )


def test_evaluate_refuses_thresholds_from_the_evaluated_split_and_bad_operating_points(
    checkpoint, tiny_dataset, tmp_path, capsys
):
    directory, _ = checkpoint
    out = tmp_path / "eval"
    argv = ["evaluate", directory, "--data", tiny_dataset, "--device", "cpu", "--out", str(out)]
    for extra, message in (
        (["--operating-point", "youden", "--threshold-split", "test"],
         "choosing the thresholds on the evaluated split 'test'"),
        (["--operating-point", "sensitivity=0.9", "--split", "val"], "only a test split defaults to val"),
        (["--operating-point", "sensitivity=1.5"], "the target 1.5 is outside (0, 1]"),
        (["--operating-point", "ppv=0.9"], "'ppv=0.9': unknown rule"),
        (["--threshold-split", "val"], "given without an operating point"),
    ):  # fmt: skip
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything was scored or written
    test_only = _stamped(str(tmp_path / "external"))  # an external test set: no val split to choose on
    assert main([*argv[:3], test_only, *argv[4:], "--operating-point", "youden"]) == 2
    assert "split 'val' of " in capsys.readouterr().err and not out.exists()


# ---- evaluate with the thresholds of a thresholds.json (--thresholds): external validation ---------------------


@pytest.fixture(scope="module")
def chosen(checkpoint, tiny_dataset, tmp_path_factory) -> Path:
    """The folder of an evaluation of test at sensitivity=0.9, thresholds chosen on val (thresholds.json)."""
    out = tmp_path_factory.mktemp("chosen")
    evaluate(checkpoint[0], tiny_dataset, "test", str(out), operating_point="sensitivity=0.9")
    return out


def _other_model(directory: str, target: Path) -> str:
    """A copy of the checkpoint at ``directory`` whose best weights differ in one adapter number: another
    model under the same config (as a longer or another training run gives)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(directory, target)
    state = load_file(target / "best.safetensors")
    name = next(n for n in sorted(state) if "molre" in n and state[n].is_floating_point())
    state[name].view(-1)[0] += 0.5
    save_file(state, target / "best.safetensors")
    return str(target)


def test_evaluate_applies_a_thresholds_file_as_chosen_and_on_data_without_a_val_split(
    checkpoint, chosen, tiny_dataset, tmp_path, capsys, monkeypatch
):
    import hashlib
    import shutil

    import molre.train.evaluate as evaluate_module

    directory, _ = checkpoint
    file = str(chosen / "thresholds.json")
    saved = json.loads(Path(file).read_text())
    first = json.loads((chosen / "summary.json").read_text())
    assert len(saved["trained_sha256"]) == 64 and saved["trained_sha256"] == first["trained_sha256"]
    scored_splits = []
    score_split = evaluate_module._score_split
    monkeypatch.setattr(evaluate_module, "_score_split",
                        lambda *a: scored_splits.append(a[4]) or score_split(*a))  # fmt: skip

    out = tmp_path / "applied"
    argv = ["evaluate", directory, "--data", tiny_dataset, "--device", "cpu", "--thresholds", file]
    assert main([*argv, "--out", str(out)]) == 0
    assert (
        f"at sensitivity=0.9 (thresholds of {file}, chosen on val): mean sensitivity"
        in capsys.readouterr().out
    )
    assert scored_splits == ["test"]  # applied, not chosen again: val is not scored
    columns = [
        "threshold",
        "threshold_reason",
        "tp",
        "fp",
        "tn",
        "fn",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
    ]
    before, after = (pd.read_parquet(folder / "per_finding_auc.parquet")[columns] for folder in (chosen, out))
    pd.testing.assert_frame_equal(after, before)  # the same thresholds on the same studies: the same results
    assert after["threshold"].notna().sum() == 3
    point = json.loads((out / "summary.json").read_text())["operating_point"]
    for key in (
        "rule",
        "threshold_split",
        "n_thresholds",
        "no_threshold",
        "mean_sensitivity",
        "mean_specificity",
    ):
        assert point[key] == first["operating_point"][key]
    assert point["thresholds_file"] == file and point["model_verified"] is True
    assert point["thresholds_sha256"] == hashlib.sha256(Path(file).read_bytes()).hexdigest()
    assert point["threshold_data"] == tiny_dataset and point["chosen_on_evaluated_split"] is False
    assert (
        f"thresholds from `{file}` (sha256 {point['thresholds_sha256'][:12]}...), chosen on val"
        in (out / "per_finding_auc.md").read_text()
    )
    assert not (out / "thresholds.json").exists()  # the thresholds' file stays the one they were chosen in

    # another hospital's test set, no val split to choose on, and the checkpoint moved: the file still applies
    moved = shutil.copytree(directory, tmp_path / "moved")
    external = _stamped(str(tmp_path / "external"))
    result = evaluate(str(moved), external, "test", str(tmp_path / "external-eval"), thresholds=file)
    assert result["operating_point"]["model_verified"] is True
    scores = pd.read_parquet(tmp_path / "external-eval" / "scores.parquet")
    s, y = (np.stack(scores[c].to_list()) for c in ("scores", "labels"))  # every label known in the tiny set
    thresholds = np.array(
        [np.nan if r["threshold"] is None else r["threshold"] for r in saved["thresholds"].values()]
    )
    flagged, positive, defined = s >= thresholds, y.astype(bool), ~np.isnan(thresholds)
    table = pd.read_parquet(tmp_path / "external-eval" / "per_finding_auc.parquet")
    assert list(table["tp"][defined]) == list((flagged & positive).sum(0)[defined])
    assert list(table["tn"][defined]) == list((~flagged & ~positive).sum(0)[defined])
    assert table["tp"][~defined].isna().all()


def test_the_cis_of_a_thresholds_file_hold_its_thresholds_fixed(checkpoint, chosen, tiny_dataset, tmp_path):
    from molre.train import operating_points as op

    file = str(chosen / "thresholds.json")
    out = tmp_path / "applied"
    point = evaluate(checkpoint[0], tiny_dataset, "test", str(out), thresholds=file, bootstrap=50)[
        "operating_point"
    ]
    assert point["ci_method"] == "thresholds fixed"
    assert "the thresholds held fixed" in (out / "per_finding_auc.md").read_text()
    scores = pd.read_parquet(out / "scores.parquet")
    evaluated = tuple(np.stack(scores[c].to_list()) for c in ("scores", "labels", "known"))
    fixed = op.bootstrap_rate_cis(*evaluated, op.read_thresholds(file).values, 50)
    table = pd.read_parquet(out / "per_finding_auc.parquet")
    for name in ("sensitivity", "specificity"):
        np.testing.assert_array_equal(table[f"{name}_ci_low"], fixed[name][0])
        np.testing.assert_array_equal(table[f"{name}_ci_high"], fixed[name][1])
        assert point[f"mean_{name}_ci"] == fixed[name][2]


def test_evaluate_refuses_thresholds_of_another_model_or_finding_list_or_of_the_evaluated_split(
    checkpoint, chosen, tiny_dataset, tmp_path, capsys, caplog
):
    from molre.errors import ConfigError

    directory, _ = checkpoint
    file = str(chosen / "thresholds.json")
    other = _other_model(directory, tmp_path / "other")
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        other,
        "--data",
        tiny_dataset,
        "--device",
        "cpu",
        "--out",
        str(out),
        "--thresholds",
        file,
    ]
    assert main(argv) == 2
    refused = capsys.readouterr().err
    assert f"thresholds: {file} was chosen on the scores of another model than checkpoint {other}" in refused
    assert (
        f"trained_sha256 {json.loads(Path(file).read_text())['trained_sha256'][:12]}... in the file"
        in refused
    )
    with pytest.raises(ConfigError, match="another model"):
        evaluate(other, tiny_dataset, "test", str(out), thresholds=file)

    saved = json.loads(Path(file).read_text())
    foreign = {**saved, "thresholds": {("renamed" if fid == FINDING_IDS[0] else fid): record
                                       for fid, record in saved["thresholds"].items()}}  # fmt: skip
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    argv[1] = directory
    assert main([*argv[:-1], str(tmp_path / "foreign.json")]) == 2
    assert f"{tmp_path / 'foreign.json'}: its finding ids are not this molre's 75" in capsys.readouterr().err
    for extra, message in (
        (["--operating-point", "youden"], "--operating-point chooses thresholds, --thresholds applies"),
        (["--split", "val"], "holds thresholds chosen on split 'val' of this very data"),
    ):
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # every refusal before anything was scored or written

    # a file from before the model's digests were recorded: applied, with a warning and a note
    del saved["trained_sha256"], saved["frozen_sha256"]
    (tmp_path / "older.json").write_text(json.dumps(saved))
    result = evaluate(other, tiny_dataset, "test", str(out), thresholds=str(tmp_path / "older.json"))
    assert result["operating_point"]["model_verified"] is False
    assert any("record no trained_sha256" in r.getMessage() for r in caplog.records)
    assert "records no model digest" in (out / "per_finding_auc.md").read_text()
