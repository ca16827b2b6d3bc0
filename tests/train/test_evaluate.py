"""evaluate / predict on a checkpoint written in the real format (no training run needed)."""

from __future__ import annotations

import json

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
from molre.train.evaluate import evaluate, load_checkpoint_model, predict
from molre.train.loop import make_optimizer
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
    from molre.train.checkpoint import preprocessing_facts
    from molre.train.evaluate import study_volume

    labels = generate(tmp_path / "raw", 1, seed=3, shape=(64, 64, 64))  # 2.5 mm slices -> 8 mm: a 3.2x shrink
    manifest = preprocess(tmp_path / "raw", labels, "generic", str(tmp_path / "shards"), spacing=(8.0, 4.0, 4.0),
                          grid=(20, 48, 48), antialias=antialias, executor="inline", salt="t")  # fmt: skip
    (info,) = manifest.shards  # one study, one shard
    row = shards.read_shard(storage.join(str(tmp_path / "shards"), info.path)).to_pylist()[0]
    setup = {"grid": [20, 48, 48], "spacing": [8.0, 4.0, 4.0], **preprocessing_facts(manifest.config)}
    assert setup["antialias"] is antialias
    series = next(p for p in (tmp_path / "raw").iterdir() if p.is_dir())
    np.testing.assert_array_equal(study_volume(str(series), setup), shards.decode_volume(row))
    other = study_volume(str(series), {**setup, "antialias": not antialias})
    assert (other != shards.decode_volume(row)).sum() > 1000  # the setting matters for this study


def test_predict_takes_a_nifti_file_or_a_dicom_file_and_refuses_several_studies(tmp_path):
    from molre.errors import DataError
    from molre.train.evaluate import study_volume

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
