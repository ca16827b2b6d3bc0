"""molre predict on real DICOM and checkpoints written in the real format: what it says it scored, unreadable
files, batches, routing inside the blocks, run folders (evaluate's too), the precision it scores in, the
checkpoint's recorded preprocessing against this molre's, and the CLI's errors."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from molre.cli import main
from molre.config import build_config
from molre.data.synth import generate
from molre.errors import DataError
from molre.findings import FINDING_IDS, FINDINGS
from molre.models import build_model
from molre.train.checkpoint import TrainState, save_checkpoint, trained_state
from molre.train.loop import make_optimizer
from molre.train.predict import predict
from tests.tiny_data import GRID, SPACING


def _write_checkpoint(directory: Path, state: TrainState | None = None, **tree) -> str:
    """A tiny-vit checkpoint with trained-looking MoLRE adapters (``tree``: config overrides)."""
    cfg = build_config({"backbone": {"preset": "tiny-vit"}, "train": {"seed": 3, "batch_size": 4}, **tree})
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.molre_modules():
            m.B.normal_(0, 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    state = state or TrainState(epoch=0, best_epoch=0, best_metric=0.5, finished=True)
    setup = {"grid": list(GRID), "spacing": list(SPACING), "input_size": list(GRID)}
    save_checkpoint(
        directory, model, make_optimizer(model, cfg), state, cfg, trained_state(model), None, setup
    )
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """One DICOM series of 16 slices, IM-0001.dcm (most inferior) to IM-0016.dcm."""
    root = tmp_path_factory.mktemp("study")
    generate(root, 1, seed=5, shape=(16, 64, 64))
    return next(p for p in root.iterdir() if p.is_dir())


def _truncated_copy(study: Path, dst: Path, name: str) -> Path:
    shutil.copytree(study, dst)
    (dst / name).write_bytes((dst / name).read_bytes()[:300])  # a file cut short in transfer
    return dst


def test_unreadable_files_of_the_series_are_named_not_silently_dropped(checkpoint, study, tmp_path, capsys):
    end = _truncated_copy(study, tmp_path / "end", "IM-0001.dcm")
    assert main(["predict", checkpoint, "--input", str(end), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["input"]["slices"] == 15  # scored without it, as preprocess would have quarantined it
    (skipped,) = out["skipped_files"]
    assert skipped["file"] == "IM-0001.dcm" and "truncated" in skipped["reason"]  # relative to the input
    assert (
        "warning" in captured.err and "1 unreadable file(s)" in captured.err and "IM-0001.dcm" in captured.err
    )
    # in the middle: the series fails with a gap, and the error names the unreadable file, not only its neighbour
    middle = _truncated_copy(study, tmp_path / "middle", "IM-0008.dcm")
    with pytest.raises(DataError, match=r"missing slice.* after IM-0007\.dcm.*unreadable file.*IM-0008\.dcm"):
        predict(checkpoint, str(middle))


def test_a_batch_loads_the_model_once_and_goes_on_past_a_bad_study(
    checkpoint, study, tmp_path, capsys, monkeypatch
):
    import molre.train.predict as ev

    loads = []
    real_load = ev.load_checkpoint_model
    monkeypatch.setattr(ev, "load_checkpoint_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    one_file = str(sorted(study.iterdir())[5])  # a DICOM file: its series
    listed = tmp_path / "inputs.txt"
    listed.write_text(f"# studies of the week\n\n  {one_file}  \n")
    missing = str(tmp_path / "missing")
    argv = ["predict", checkpoint, "--input", str(study), "--input", missing, "--inputs", str(listed)]
    assert main([*argv, "--device", "cpu"]) == 1  # one study failed
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]  # JSON Lines, one object per study
    assert [line["input"]["path"] for line in lines] == [str(study), missing, one_file]
    assert (
        lines[1]["error"] == {"file": missing, "reason": "does not exist"} and "probabilities" not in lines[1]
    )
    assert len(loads) == 1  # the model is built once for the batch
    assert lines[2]["input"]["series"] == "."  # the file's series, in the file's folder
    single = predict(checkpoint, str(study))
    assert lines[0]["probabilities"] == lines[2]["probabilities"] == single["probabilities"]
    assert (
        "1 of 3 studies could not be scored" in captured.err and f"{missing}: does not exist" in captured.err
    )


def test_the_output_says_what_was_scored_and_by_which_model(checkpoint, study, capsys, caplog):
    import molre
    from molre.train.checkpoint import RECORDED_AS_IS

    assert main(["predict", checkpoint, "--input", str(study), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)  # one study: one JSON document, as before
    assert (
        out["input"]["path"] == str(study)
        and out["input"]["series"] == "."
        and out["input"]["kind"] == "dicom"
    )
    assert out["input"]["slices"] == 16 and out["input"]["spacing_mm"][0] == pytest.approx(10.0)
    # the fixture's setup.json predates the recorded HU range ... interpolation: not compared (a warning)
    not_compared = dict.fromkeys(RECORDED_AS_IS, "not recorded by the checkpoint")
    assert out["model"] == {
        "checkpoint": checkpoint, "preset": "tiny-vit",
        "adapter": {"kind": "molre", "placement": "features", "route_by": "slice", "experts": 6},
        "grid": list(GRID), "spacing_mm": list(SPACING), "molre_version": molre.__version__,
        "precision": "fp32",  # train.precision auto on the CPU
        "preprocessing": {"mismatches": [], "not_compared": not_compared, "mismatch_allowed": False},
    }  # fmt: skip
    assert any("preprocessing settings not compared" in r.getMessage() for r in caplog.records)
    assert [f["id"] for f in out["findings"]] == list(out["probabilities"]) == list(FINDING_IDS)
    assert [(f["name"], f["category"]) for f in out["findings"]] == [(f.name, f.category) for f in FINDINGS]
    # the model's 8 slices of 4 mm, inferior to superior, around the aligned grid's centre
    assert out["slice_z_mm"] == [-14.0, -10.0, -6.0, -2.0, 2.0, 6.0, 10.0, 14.0]
    assert len(out["slice_attention"]) == len(out["router_weights"]) == 8
    assert out["skipped_files"] == []


@pytest.mark.parametrize(("grid", "slices"), [(8, 8), (8, 4), (16, 10)])
def test_slice_z_mm_is_where_the_resampling_to_the_models_slices_reads(grid, slices):
    from molre.data.augment import resize_volume
    from molre.train.predict import model_slice_z_mm

    dz = 4.0
    z_grid = (np.arange(grid) - (grid - 1) / 2) * dz  # each aligned slice's centre, mm from the grid's centre
    ramp = torch.tensor(z_grid, dtype=torch.float64).reshape(1, 1, grid, 1, 1).expand(1, 1, grid, 2, 2)
    read = resize_volume(ramp, (slices, 2, 2))[0, 0, :, 0, 0].numpy()  # what each model slice is made of
    setup = {"grid": [grid, 64, 64], "spacing": [dz, 1.0, 1.0], "input_size": [slices, 64, 64]}
    np.testing.assert_allclose(model_slice_z_mm(setup), read, atol=1e-3)


def test_router_weights_of_molre_inside_the_blocks(study, tmp_path):
    from molre.models.molre import MoLRE
    from molre.train.predict import study_volume
    from molre.train.scoring import load_checkpoint_model, score_volumes

    blocks = _write_checkpoint(tmp_path / "blocks", adapter={"molre": {"placement": "blocks"}})
    out = predict(blocks, str(study))
    model, cfg, setup = load_checkpoint_model(blocks)
    names = [name for name, m in model.named_modules() if isinstance(m, MoLRE)]
    assert names and set(out["router_weights"]) == set(names)  # every adapted linear, by module name
    for rows in out["router_weights"].values():
        assert np.array(rows).shape == (8, 6)  # one gate per slice, K = 6
        np.testing.assert_allclose(np.sum(rows, axis=1), 1.0, atol=1e-4)
    score_volumes(model, cfg, setup, torch.from_numpy(study_volume(str(study), setup))[None])
    gates = model.get_submodule(names[-1]).last_router_weights
    np.testing.assert_allclose(out["router_weights"][names[-1]], gates.numpy(), atol=1e-5)
    # route_by=token gates every token: nothing per slice to report
    token = build_model(build_config({"adapter": {"molre": {"placement": "blocks", "route_by": "token"}}}))
    token.eval()(torch.rand(1, 3, 8, 64, 64))
    assert token.router_weights(in_blocks=True) == {} and token.router_weights() is None


def _run_folder(root: Path, checkpoint: str, names: list[str]) -> Path:
    """A run folder as Ray Train leaves it: the checkpoints and the snapshot its checkpoint manager writes."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.context import StorageContext
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    run = root / "runs" / "my-run"
    for name in names:
        shutil.copytree(checkpoint, run / name)

    async def report():  # the manager notifies its listeners on the running event loop
        manager = CheckpointManager(CheckpointConfig(), StorageContext(str(run.parent), run.name))
        for epoch, name in enumerate(names):
            manager.register_checkpoint(_TrainingReport(Checkpoint(str(run / name)), {"epoch": epoch}, False))

    asyncio.run(report())
    return run


# Ray's checkpoint manager writes and reads its snapshot through pydantic 1's API
@pytest.mark.filterwarnings("ignore:The `(json|parse_obj)` method is deprecated")
def test_a_run_folder_resolves_to_its_latest_checkpoint_and_bad_arguments_are_clear_errors(
    checkpoint, study, tmp_path, capsys, monkeypatch
):
    run = _run_folder(tmp_path, checkpoint, ["checkpoint_000000", "checkpoint_000001"])
    _write_checkpoint(run / "checkpoint_000001", TrainState(epoch=3, best_epoch=2, best_metric=0.75))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "runs/my-run", "--input", str(study), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"]["checkpoint"] == "runs/my-run/checkpoint_000001"  # as given
    assert (
        "runs/my-run is a run folder: using its latest checkpoint runs/my-run/checkpoint_000001 (epoch 3, not "
        "finished; its best weights: epoch 2, val/mean_auc 0.7500)" in captured.err
    )
    assert "snapshot was found" not in captured.err  # Ray's note on restoring a run to train it
    snapshot = "runs/my-run/checkpoint_manager_snapshot.json"
    for argv, message in (
        ([snapshot, "--input", str(study)], f"{snapshot} is a file; give the checkpoint folder"),
        ([checkpoint, "--input", "s3://bucket/study"], "s3://bucket/study: predict reads local files only"),
        ([checkpoint], "give --input SERIES (repeatable) or --inputs FILE"),
    ):
        assert main(["predict", *argv, "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err


def test_a_bf16_run_is_scored_under_bf16_autocast_as_its_validation_was(study, tmp_path):
    from molre.data.augment import augment_batch
    from molre.train.predict import study_volume
    from molre.train.scoring import load_checkpoint_model

    bf16 = _write_checkpoint(tmp_path / "bf16", train={"seed": 3, "batch_size": 4, "precision": "bf16"})
    out = predict(bf16, str(study))
    assert out["model"]["precision"] == "bf16"
    # routing and attention come out of autocast in bf16, which numpy cannot take: reported as floats
    assert np.array(out["router_weights"]).shape == (8, 6) and len(out["slice_attention"]) == 8
    model, cfg, setup = load_checkpoint_model(bf16)
    hu = torch.from_numpy(study_volume(str(study), setup))[None]
    x = augment_batch(hu, cfg.data, torch.Generator(), train=False, out_size=tuple(setup["input_size"]))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as loop.score_shard scores a bf16 run
            by_hand = torch.sigmoid(model(x).float())[0].numpy()
        fp32 = torch.sigmoid(model(x).float())[0].numpy()
    probabilities = np.float32(list(out["probabilities"].values()))
    np.testing.assert_array_equal(probabilities, by_hand)
    assert np.abs(probabilities - fp32).max() > 1e-4  # what predict gave before: ~1e-3 off validation


def test_a_checkpoint_preprocessed_unlike_this_molre_is_refused_unless_told(
    checkpoint, study, tmp_path, capsys, caplog
):
    from molre.train.predict import this_molre_preprocessing

    recent = tmp_path / "recent"  # as molre writes a checkpoint today: its training data's settings recorded
    shutil.copytree(checkpoint, recent)
    setup = json.loads((recent / "setup.json").read_text()) | this_molre_preprocessing()
    (recent / "setup.json").write_text(json.dumps(setup))
    caplog.clear()
    agreed = {"mismatches": [], "not_compared": {}, "mismatch_allowed": False}
    assert predict(str(recent), str(study))["model"]["preprocessing"] == agreed
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # all compared, all alike

    (recent / "setup.json").write_text(
        json.dumps({**setup, "hu_range": [-1000, 3000], "interpolation": "nearest"})
    )
    hu_range = "hu_range: [-1000, 3000] (checkpoint) vs [-1024, 3071] (this molre)"
    interpolation = 'interpolation: "nearest" (checkpoint) vs "trilinear" (this molre)'
    with pytest.raises(DataError, match="--allow-preprocessing-mismatch") as refused:
        predict(str(recent), str(study))
    assert refused.value.path == f"{recent}/setup.json"
    assert all(part in refused.value.reason for part in (f"checkpoint {recent}", hu_range, interpolation))
    argv = ["predict", str(recent), "--input", str(study), "--device", "cpu"]
    assert main(argv) == 2 and hu_range in capsys.readouterr().err
    assert main([*argv, "--input", str(study)]) == 2  # a batch too, before any study is scored
    assert hu_range in capsys.readouterr().err

    assert main([*argv, "--allow-preprocessing-mismatch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["preprocessing"] == {"mismatches": [hu_range, interpolation], "not_compared": {},
                                             "mismatch_allowed": True}  # fmt: skip
    assert any(hu_range in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.filterwarnings("ignore:The `(json|parse_obj)` method is deprecated")
def test_evaluate_takes_a_run_folder_and_records_both_folders(
    checkpoint, tmp_path, capsys, caplog, monkeypatch
):
    import logging

    from molre.data import shards
    from molre.train.evaluate import evaluate
    from tests.tiny_data import write_tiny_dataset

    data = write_tiny_dataset(str(tmp_path / "data"), counts={"test": 4})
    sha256 = shards.read_manifest_and_sha256(data)[1]
    _run_folder(tmp_path, checkpoint, ["checkpoint_000000", "checkpoint_000001"])
    monkeypatch.chdir(tmp_path)
    latest = "runs/my-run/checkpoint_000001"
    picked = f"runs/my-run is a run folder: using its latest checkpoint {latest} (epoch 0, finished"
    assert main(["evaluate", "runs/my-run", "--data", data, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"molre evaluate: {picked}" in captured.err
    out = f"{latest}/eval-test-{sha256[:12]}"  # the default folder: under the checkpoint evaluated
    assert captured.out.rstrip().endswith(f"written to {out}")
    summary = json.loads(Path(out, "summary.json").read_text())
    assert (summary["checkpoint_given"], summary["checkpoint"]) == ("runs/my-run", latest)
    assert "(the latest of run folder `runs/my-run`)" in Path(out, "per_finding_auc.md").read_text()

    caplog.set_level(logging.INFO, logger="molre.train.evaluate")
    result = evaluate("runs/my-run", data, "test", str(tmp_path / "eval"))
    assert any(picked in r.getMessage() for r in caplog.records)  # the function logs its pick
    assert (result["checkpoint_given"], result["checkpoint"]) == ("runs/my-run", latest)
    assert result["mean_auc"] == summary["mean_auc"]


# ---- predict --thresholds: each finding flagged at the thresholds evaluate chose for this model ---------------


@pytest.fixture(scope="module")
def thresholds_file(checkpoint, tmp_path_factory) -> Path:
    """The thresholds.json evaluate writes for the module's checkpoint (youden, chosen on a 12-study val)."""
    from molre.train.evaluate import evaluate
    from tests.tiny_data import write_tiny_dataset

    root = tmp_path_factory.mktemp("thresholds")
    data = write_tiny_dataset(str(root / "data"), counts={"val": 12, "test": 4})
    evaluate(checkpoint, data, "test", str(root / "eval"), operating_point="youden")
    return root / "eval" / "thresholds.json"


def test_predict_flags_each_finding_at_a_thresholds_files_thresholds_read_locally_or_from_s3(
    checkpoint, study, thresholds_file, tmp_path, capsys, s3_bucket
):
    import hashlib

    from molre.data import storage

    plain = predict(checkpoint, str(study))
    assert "flags" not in plain and "operating_point" not in plain["model"]  # without --thresholds: as before
    probabilities, ids = plain["probabilities"], list(FINDING_IDS)
    saved = json.loads(thresholds_file.read_text())
    # thresholds on the decision's edge: the study's probability itself (flagged: >=), the next float above it
    # (not flagged), and 0 for a finding the file has none for (flagged)
    saved["thresholds"][ids[0]]["threshold"] = probabilities[ids[0]]
    saved["thresholds"][ids[1]]["threshold"] = float(np.nextafter(probabilities[ids[1]], 1.0))
    saved["thresholds"][ids[10]] = {"threshold": 0.0, "reason": None}
    edited = json.dumps(saved).encode()
    uri = f"{s3_bucket}/eval/thresholds.json"
    storage.write_bytes(uri, edited)
    assert main(["predict", checkpoint, "--input", str(study), "--device", "cpu", "--thresholds", uri]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["probabilities"] == probabilities
    expected = {fid: None if record["threshold"] is None else probabilities[fid] >= record["threshold"]
                for fid, record in saved["thresholds"].items()}  # fmt: skip
    assert list(out["flags"]) == ids and out["flags"] == expected
    assert (out["flags"][ids[0]], out["flags"][ids[1]], out["flags"][ids[10]]) == (True, False, True)
    assert out["flags"][ids[5]] is None  # never positive in val: no threshold there
    point = out["model"].pop("operating_point")
    assert out["model"] == plain["model"]
    assert (point["rule"], point["threshold_split"], point["thresholds_file"]) == ("youden", "val", uri)
    assert (
        point["thresholds_sha256"] == hashlib.sha256(edited).hexdigest() and point["model_verified"] is True
    )

    # a batch: every line flagged
    argv = ["predict", checkpoint, "--input", str(study), "--input", str(study), "--device", "cpu"]
    assert main([*argv, "--thresholds", str(thresholds_file)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(line["flags"]) for line in lines] == [75, 75]


def test_predict_refuses_thresholds_of_another_model_before_reading_any_input(
    checkpoint, thresholds_file, tmp_path, capsys
):
    from molre.errors import ConfigError

    other = _write_checkpoint(tmp_path / "other", train={"seed": 4, "batch_size": 4})  # other trained weights
    missing = str(tmp_path / "missing")
    argv = ["predict", other, "--input", missing, "--input", missing, "--device", "cpu"]
    assert main([*argv, "--thresholds", str(thresholds_file)]) == 2
    err = capsys.readouterr().err
    assert f"was chosen on the scores of another model than checkpoint {other}" in err
    assert "does not exist" not in err  # refused before any input was read
    with pytest.raises(ConfigError, match=f"the file names checkpoint {checkpoint}"):
        predict(other, missing, thresholds=str(thresholds_file))
