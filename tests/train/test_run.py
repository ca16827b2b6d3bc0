"""One training run end to end in a real local Ray: 2 CPU workers (gloo DDP), tiny ViT, tiny shards."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from molre.cli import main
from molre.config import build_config, config_to_dict
from molre.data import shards, storage
from molre.errors import ConfigError, DataError, ModelError
from molre.findings import FINDING_IDS
from molre.train.checkpoint import FINGERPRINT, FINGERPRINT_KEY, read_fingerprint, read_state
from molre.train.evaluate import evaluate
from molre.train.run import latest_checkpoint, prepare, train
from tests.conftest import S3_REGION, s3_env_vars

pytestmark = pytest.mark.slow


def _cfg(data_uri: str, storage_dir: Path, name: str, **extra):
    tree = {
        "backbone": {"preset": "tiny-vit"},
        "data": {"uri": data_uri},
        "optim": {"lr_head": 1e-2, "lr_adapter": 1e-3},
        "train": {"max_epochs": 4, "min_epochs": 0, "batch_size": 2, "seed": 7, "run_name": name,
                  "storage": str(storage_dir)},
        "scaling": {"num_workers": 2, "max_failures": 1},
    }  # fmt: skip
    for key, value in extra.items():
        tree[key] = {**tree.get(key, {}), **value}
    return build_config(tree)


def _history(result) -> list[dict]:
    return read_state(result.checkpoint_path).history


DROPOUT = {"lora": {"dropout": 0.2}, "molre": {"dropout": 0.2}}  # so that a resumed epoch draws masks too


@pytest.fixture(scope="module")
def steady(ray_local, tiny_dataset, tmp_path_factory):
    """One uninterrupted 2-worker run with dropout: the reference a repeat and a resumed run must equal."""
    storage_dir = tmp_path_factory.mktemp("steady")
    return train(_cfg(tiny_dataset, storage_dir, "repeat-a", adapter=DROPOUT)), storage_dir


def test_two_workers_learn(steady):
    """That a fixed seed repeats is checked against this run by the killed-worker test below: its epoch 0 is a
    fresh run of the same config, and every later epoch must equal this run's too."""
    first, storage_dir = steady
    assert first.best_metric > 0.6  # three planted findings; chance is 0.5
    assert first.metrics["val/volumes"] == 24  # every validation volume scored exactly once across 2 workers
    assert [h["epoch"] for h in _history(first)] == [0, 1, 2, 3]
    ckpt = Path(first.checkpoint_path)
    files = {
        "best.safetensors",
        "model.safetensors",
        "optimizer.pt",
        "config.yaml",
        "setup.json",
        FINGERPRINT,
    }
    assert files <= {p.name for p in ckpt.iterdir()}
    assert any((storage_dir / "repeat-a" / "tensorboard").iterdir())


def test_fp8_frozen_matmuls_train_under_ddp_and_an_odd_train_split_loses_no_volume(ray_local, tmp_path):
    """One run for two checks (each run costs a Train start): FP8 frozen matmuls under 2-worker DDP, on a train
    split of 47 volumes that the 2 workers must see whole."""
    from tests.tiny_data import write_tiny_dataset

    data = write_tiny_dataset(str(tmp_path / "odd"), counts={"train": 47, "val": 24})
    # two gloo workers: DDP must leave the FP8 buffers alone (gloo cannot even broadcast e4m3 tensors);
    # rfs_threshold ~0: every repeat factor is 1, so an epoch trains each study once
    cfg = _cfg(data, tmp_path, "fp8", train={"frozen_matmul": "fp8"}, data={"rfs_threshold": 1e-6})
    result = train(cfg)
    assert result.best_metric > 0.6  # learns the planted findings on an e4m3 base
    history = _history(result)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    # 47 + the first repeated for 2 workers (was 46: an equal split dropped the odd volume)
    assert [h["train/volumes"] for h in history] == [48] * 4


def test_killed_worker_resumes_from_checkpoint_and_finished_run_is_not_retrained(
    steady, tiny_dataset, tmp_path
):
    """Also the check that a fixed seed repeats: the faulty run's epoch 0 is a fresh run of the steady run's config
    (before the kill), its later epochs are resumed ones; all must equal the steady run's."""
    marker = tmp_path / "killed.txt"
    fault = {"epoch": 1, "step": 1, "rank": 1, "marker": str(marker)}
    result = train(_cfg(tiny_dataset, tmp_path, "faulty", adapter=DROPOUT), fault=fault)
    assert marker.exists()  # the worker really was killed mid-epoch 1
    assert [h["epoch"] for h in _history(result)] == [0, 1, 2, 3]  # epoch 1 redone once, none counted twice
    for resumed, uninterrupted in zip(_history(result), _history(steady[0]), strict=True):  # as without it
        assert resumed["val/mean_auc"] == pytest.approx(uninterrupted["val/mean_auc"], abs=1e-9)
        assert resumed["train/loss"] == pytest.approx(uninterrupted["train/loss"], rel=1e-6)
    checkpoints = sorted(p.name for p in (tmp_path / "faulty").glob("checkpoint_*"))
    # the same run again; max_failures may change on a resume (it does not change what is computed)
    again = train(_cfg(tiny_dataset, tmp_path, "faulty", adapter=DROPOUT, scaling={"max_failures": 0}))
    assert again.checkpoint_path == result.checkpoint_path  # restored, and nothing new was trained or saved
    assert sorted(p.name for p in (tmp_path / "faulty").glob("checkpoint_*")) == checkpoints
    assert [h["epoch"] for h in _history(again)] == [0, 1, 2, 3]


def _on_s3(data: str, root: str, train: dict | None = None, scaling: dict | None = None, **extra):
    """The config of the run on S3 (one worker, one epoch), with changes."""
    return _cfg(data, root, "on-s3", train={"max_epochs": 1, **(train or {})},
                scaling={"num_workers": 1, **(scaling or {})}, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """`molre train` of one epoch on 4 + 4 volumes with its storage in a bucket of the loopback S3 server:
    (storage root, the checkpoint it printed, the data). A subprocess: its own local Ray has the AWS variables in
    every process (the session's Ray, started before them, lacks them in Ray Train's controller, which writes the
    run's snapshot to storage)."""
    import boto3

    from tests.tiny_data import write_tiny_dataset

    folder = tmp_path_factory.mktemp("s3-run")
    data = write_tiny_dataset(str(folder / "data"), counts={"train": 4, "val": 4, "test": 4})
    aws = s3_env_vars(s3_server)
    bucket = f"molre-run-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=S3_REGION, aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)  # fmt: skip
    root = f"s3://{bucket}/runs"
    (folder / "run.yaml").write_text(yaml.safe_dump(config_to_dict(_on_s3(data, root))))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({**aws, "RAY_USAGE_STATS_ENABLED": "0"})
    done = subprocess.run([sys.executable, "-m", "molre.cli", "train", "--config", str(folder / "run.yaml")],
                          env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("checkpoint: ")]
    return root, line.removeprefix("checkpoint: "), data


def test_a_run_on_s3_reports_uris_and_evaluate_and_predict_read_and_write_s3(
    s3_run, s3_env, tmp_path, monkeypatch, capsys
):
    root, checkpoint, data = s3_run
    assert checkpoint.startswith(f"{root}/on-s3/checkpoint_")  # with its scheme: a URI molre's tools take
    assert read_state(checkpoint).history[0]["epoch"] == 0
    monkeypatch.chdir(tmp_path)  # where an s3:// output taken for a local path would land ("s3:/...")
    out = f"{root.rsplit('/', 1)[0]}/eval"
    assert main(["evaluate", checkpoint, "--data", data, "--out", out, "--device", "cpu"]) == 0
    assert f"on 4 volumes; written to {out}" in capsys.readouterr().out
    written = [uri.rsplit("/", 1)[1] for uri in storage.list_dir(out)]
    assert written == ["per_finding_auc.md", "per_finding_auc.parquet", "scores.parquet", "summary.json"]
    assert json.loads(storage.read_bytes(f"{out}/summary.json"))["volumes"] == 4
    table = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{out}/per_finding_auc.parquet")))
    assert list(table["finding"]) == list(FINDING_IDS)
    assert not (tmp_path / "s3:").exists()
    # the default output folder lies under the checkpoint, on S3 too
    default = f"{checkpoint}/eval-test-{shards.read_manifest_and_sha256(data)[1][:12]}"  # one per dataset
    assert evaluate(checkpoint, data, "test")["out_dir"] == default
    assert storage.exists(f"{default}/summary.json")
    from molre.data.synth import generate

    generate(tmp_path / "series", 1, seed=5, shape=(16, 64, 64))
    series = next(p for p in (tmp_path / "series").iterdir() if p.is_dir())
    assert main(["predict", checkpoint, "--input", str(series), "--device", "cpu"]) == 0
    assert list(json.loads(capsys.readouterr().out)["probabilities"]) == list(FINDING_IDS)


def test_a_rerun_under_the_same_name_resumes_only_the_same_run(ray_local, s3_run, s3_env, tmp_path, caplog):
    root, checkpoint, data = s3_run
    from tests.tiny_data import write_tiny_dataset

    other_data = write_tiny_dataset(str(tmp_path / "other"), counts={"train": 4, "val": 4}, seed=1)
    changed = _on_s3(other_data, root, train={"max_epochs": 3, "seed": 123}, optim={"lr_head": 5e-4},
                     backbone={"preset": "tiny-davit"}, scaling={"num_workers": 2, "max_failures": 0})  # fmt: skip
    with pytest.raises(ConfigError) as info:  # refused on the driver, before any trainer or shard read
        train(changed)
    message = str(info.value)
    assert f"run 'on-s3': its checkpoint {checkpoint} belongs to a run with another config" in message
    for change in ('backbone.preset: "tiny-vit" -> "tiny-davit"', "optim.lr_head: 0.01 -> 0.0005",
                   "scaling.num_workers: 1 -> 2", "train.max_epochs: 1 -> 3", "train.seed: 7 -> 123",
                   "dataset: manifest sha256 "):  # fmt: skip
        assert change in message
    assert "max_failures" not in message and "data.uri" not in message
    assert f"Pick another train.run_name, or delete the run folder {root}/on-s3" in message
    assert latest_checkpoint(changed) == checkpoint  # nothing was trained or checkpointed
    # the same data at another URI, other retries and caches: the same run
    copy = str(shutil.copytree(data, tmp_path / "copy"))
    same = _on_s3(copy, root, train={"cache_val": False}, scaling={"max_failures": 0})
    assert prepare(same)[FINGERPRINT_KEY]["sha256"] == read_fingerprint(checkpoint)["sha256"]
    # another host-RAM budget that still keeps the train shard: the same run; one that streams it: the train
    # order (whole-epoch shuffle vs a 32-row window) would change, so it is refused, naming the budget
    smaller = _on_s3(data, root, train={"cache_train_gb": 0.01}, scaling={"max_failures": 0})
    assert prepare(smaller)[FINGERPRINT_KEY]["sha256"] == read_fingerprint(checkpoint)["sha256"]
    with pytest.raises(ConfigError) as info:
        prepare(_on_s3(data, root, train={"cache_train_gb": 0}))
    assert "train order: whole-epoch shuffle (shard kept in memory) -> 32-row window (streamed)" in str(
        info.value
    )
    assert "train.cache_train_gb decides it" in str(info.value)
    # a checkpoint from before fingerprints: its config.yaml is compared, its dataset is not (a warning)
    saved = storage.read_bytes(f"{checkpoint}/{FINGERPRINT}")
    storage.delete(f"{checkpoint}/{FINGERPRINT}")
    try:
        with caplog.at_level(logging.WARNING, logger="molre.train.checkpoint"):
            prepare(_on_s3(other_data, root))
        assert f"has no {FINGERPRINT} (written by an older molre)" in caplog.text
        with pytest.raises(ConfigError, match="train.seed: 7 -> 123"):
            prepare(_on_s3(data, root, train={"seed": 123}))
    finally:
        storage.write_bytes(f"{checkpoint}/{FINGERPRINT}", saved)


def test_bad_inputs_name_what_is_wrong(tiny_dataset, tmp_path):
    with pytest.raises(ModelError, match="cannot take the volume grid"):
        prepare(_cfg(tiny_dataset, tmp_path, "x", backbone={"preset": "tiny-vit3d"}, data={"num_slices": 6}))
    bad = tmp_path / "bad-schema"
    _copy_with_broken_schema(tiny_dataset, bad)
    with pytest.raises(DataError, match=r"train/shard-0.parquet: missing column 'known'"):
        prepare(_cfg(str(bad), tmp_path, "x"))
    empty = tmp_path / "empty-val"
    _copy_without_split(tiny_dataset, empty, "val")
    with pytest.raises(DataError, match="split 'val' is empty"):
        prepare(_cfg(str(empty), tmp_path, "x"))


def _copy_with_broken_schema(src: str, dst: Path) -> None:
    manifest = shards.read_manifest(src)
    for info in manifest.shards:
        table = shards.read_shard(storage.join(src, info.path))
        if info.split == "train":
            table = table.drop_columns(["known"])
        out = dst / info.path
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        info.sha256, info.bytes = storage.sha256(str(out)), out.stat().st_size
    (dst / "manifest.json").write_text(manifest.to_json())


def _copy_without_split(src: str, dst: Path, split: str) -> None:
    manifest = shards.read_manifest(src)
    manifest.shards = [s for s in manifest.shards if s.split != split]
    for info in manifest.shards:
        out = dst / info.path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(storage.read_bytes(storage.join(src, info.path)))
    (dst / "manifest.json").write_text(manifest.to_json())


def test_a_run_into_a_missing_bucket_fails_first_and_creates_no_bucket(s3_bucket, tiny_dataset, tmp_path):
    """Ray's storage check would mkdir a mistyped bucket where the credentials allow it: the run stops before."""
    cfg = _cfg(tiny_dataset, tmp_path, "no-bucket")
    cfg.train.storage = s3_bucket.replace("s3://", "s3://no-such-") + "/runs"
    for _ in range(2):  # the second time: still missing
        with pytest.raises(storage.StorageError, match=r"bucket s3://no-such-\S+ does not exist"):
            train(cfg)
