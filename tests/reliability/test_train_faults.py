"""Storage faults during training reads: a real ``molre.train.run.train`` (local Ray, one worker, tiny ViT) on a
tiny dataset stored on an S3 endpoint that the test takes down while the Ray Data read tasks read the shards.

The outage is placed deterministically: the relay in front of the server (``StoppableS3``) reads the request heads
it forwards and stops the server instead of relaying a chosen GET of the train shard, counted from the moment the
driver has prepared the run (its checks and label reads are done; every later GET comes from a Ray Data read
task). The retry budget reaches the read tasks through ``MOLRE_STORAGE_RETRY``, which ``train`` forwards to the
workers with the AWS variables.

- An outage shorter than the budget at epoch 0's first train read: the read task retries, the run completes, and
  its history equals that of an undisturbed run with the same seed, epoch by epoch.
- An outage that lasts, from epoch 1's first train read (after as many GETs as one ``read_shard`` of the training
  columns makes, counted here; the workers' shard caches are turned off so that epoch 1 reads storage): the run
  fails with the read task's StorageError, naming the shard and the spent budget, and the checkpoints on storage
  claim epoch 0 only, the epoch that completed.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import pytest

from molre.config import TrainConfig, build_config
from molre.data import dataset, shards, storage
from molre.errors import ConfigError
from molre.train import run as train_run
from molre.train.checkpoint import read_state
from tests.reliability.helpers import RequestHeads, StoppableS3
from tests.tiny_data import write_tiny_dataset

TRAIN_SHARD = "train/shard-0.parquet"
LONG_BUDGET = (
    "8,0.1,2"  # waits 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2 s (+-25 %): outlasts OUTAGE_S on a loaded machine
)
SHORT_BUDGET = "3,0.05,0.1"  # gives up ~0.15 s into a lasting outage
OUTAGE_S = 2.0  # longer than what s3fs/botocore absorb below molre (a refused connection is retried ~once)


def _train_shard_get(method: str, path: str) -> bool:
    return method == "GET" and path.endswith("/" + TRAIN_SHARD)


@pytest.fixture
def data_uri(s3) -> str:
    """16 train / 8 val volumes (one shard each) on the stoppable server."""
    return write_tiny_dataset(storage.join(s3.bucket(), "tiny"), {"train": 16, "val": 8})


def _cfg(data: str, storage_dir: Path, name: str, read_every_epoch: bool = False):
    train = {"max_epochs": 2, "min_epochs": 0, "batch_size": 4, "seed": 3, "run_name": name,
             "storage": str(storage_dir)}  # fmt: skip
    if read_every_epoch:  # no worker-side shard caches (where the loop has them): epoch 1 reads storage again
        fields = TrainConfig.model_fields
        train.update({k: v for k, v in (("cache_train_gb", 0), ("cache_val", False)) if k in fields})
    return build_config({
        "backbone": {"preset": "tiny-vit"},
        "data": {"uri": data},
        "optim": {"lr_head": 1e-2, "lr_adapter": 1e-3},
        "train": train,
        "scaling": {"num_workers": 1, "max_failures": 0},
    })  # fmt: skip


def _arm_after_prepare(s3: StoppableS3, monkeypatch, nth: int, restart_after: float | None) -> dict:
    """Arm the stop at the ``nth`` train-shard GET after the driver's ``prepare`` returns."""
    armed = {}
    real_prepare = train_run.prepare

    def prepare_then_arm(cfg, verify=True):
        setup = real_prepare(cfg, verify)
        armed["event"] = s3.stop_on_request(_train_shard_get, nth=nth, restart_after=restart_after)
        return setup

    monkeypatch.setattr(train_run, "prepare", prepare_then_arm)
    return armed


def _gets_per_read(s3: StoppableS3, data: str) -> int:
    """GETs one read task makes for the train shard: the same ``read_shard`` call, made here."""
    before = s3.count(_train_shard_get)
    shards.read_shard(storage.join(data, TRAIN_SHARD), dataset.READ_COLUMNS)
    return s3.count(_train_shard_get) - before


def _history(checkpoint: str) -> list[dict]:
    return read_state(checkpoint).history


def _retry_warnings(bucket: str) -> list[str]:
    """molre.data.storage's "retrying" warnings about ``bucket`` in the Ray workers' logs."""
    import ray

    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:  # private API: fall back to the default session folder
        logs = "/tmp/ray/session_latest/logs"
    hits = []
    for name in glob.glob(os.path.join(logs, "*.err")) + glob.glob(os.path.join(logs, "*.out")):
        with open(name, errors="replace") as handle:
            hits += [line for line in handle if "retrying" in line and bucket in line]
    return hits


@pytest.mark.slow
def test_outage_shorter_than_the_budget_during_training_reads_changes_nothing(
    ray_local, s3, data_uri, tmp_path, monkeypatch
):
    monkeypatch.setenv(storage.RETRY_ENV, LONG_BUDGET)
    reference = train_run.train(_cfg(data_uri, tmp_path, "undisturbed"))
    armed = _arm_after_prepare(s3, monkeypatch, nth=1, restart_after=OUTAGE_S)
    started = time.monotonic()
    result = train_run.train(_cfg(data_uri, tmp_path, "outage"))
    assert armed["event"].is_set() and s3.stops == 1  # the server really went down, during epoch 0's read
    assert time.monotonic() - started > OUTAGE_S  # and the run waited it out
    expected, got = _history(reference.checkpoint_path), _history(result.checkpoint_path)
    assert [h["epoch"] for h in got] == [h["epoch"] for h in expected] == [0, 1]
    for a, b in zip(expected, got, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
        assert b["val/mean_auc"] == pytest.approx(a["val/mean_auc"], abs=1e-9)
        assert b["train/volumes"] == a["train/volumes"] and b["val/volumes"] == a["val/volumes"] == 8
    assert result.best_metric == pytest.approx(reference.best_metric, abs=1e-9)
    # the read task rode the outage out in molre's retry loop (its warnings are in the worker logs)
    bucket = data_uri.removeprefix("s3://").split("/")[0]
    assert any(f"{TRAIN_SHARD}" in line for line in _retry_warnings(bucket))


@pytest.mark.slow
def test_lasting_outage_during_training_reads_fails_naming_the_shard(
    ray_local, s3, data_uri, tmp_path, monkeypatch
):
    monkeypatch.setenv(storage.RETRY_ENV, SHORT_BUDGET)
    per_read = _gets_per_read(s3, data_uri)
    assert per_read >= 1
    armed = _arm_after_prepare(s3, monkeypatch, nth=per_read + 1, restart_after=None)
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:  # the read task's own error, not only "a worker died"
        train_run.train(_cfg(data_uri, tmp_path, "lasting", read_every_epoch=True))
    assert armed["event"].is_set() and not s3.running
    assert time.monotonic() - started < 120
    message = str(info.value)
    shard = storage.join(data_uri, TRAIN_SHARD)
    assert message.startswith(f"{shard}: read failed after 3 attempts"), message
    # what the run left on storage: checkpoints of completed epochs only (epoch 0); none claims epoch 1
    checkpoints = sorted(p for p in (tmp_path / "lasting").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, "epoch 0 completed and was checkpointed before the outage"
    for checkpoint in checkpoints:
        state = read_state(str(checkpoint))
        assert state.epoch == 0 and [h["epoch"] for h in state.history] == [0] and not state.finished


@pytest.mark.slow
def test_a_run_reads_the_manifest_and_each_shard_once_before_training(ray_local, s3, data_uri, tmp_path):
    """prepare + build_trainer: one manifest read, one read of each shard for its checksum (the schema comes from
    the same bytes), one label read of the train shard; the trainer gets the checked shards, the workers do not."""
    per_read = _gets_per_read(s3, data_uri)
    cfg = _cfg(data_uri, tmp_path, "count")
    start = len(s3.requests)
    trainer = train_run.build_trainer(cfg, train_run.prepare(cfg))
    gets: dict[str, int] = {}
    for method, path in s3.requests[start:]:
        if method == "GET":
            gets[path.split("/tiny/", 1)[-1]] = gets.get(path.split("/tiny/", 1)[-1], 0) + 1
    assert gets == {"manifest.json": 1, TRAIN_SHARD: 1 + per_read, "val/shard-0.parquet": 1}
    assert train_run.SHARDS_KEY not in trainer.train_loop_config["setup"]


def test_relay_follows_request_heads_through_bodies_and_chunks():
    """The relay's parser finds every request head whatever the recv boundaries (bodies may contain text that
    looks like a request line)."""
    fake = b"GET /fake HTTP/1.1\r\n\r\n"
    stream = (
        b"PUT /b/k?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(fake) + fake
        + b"GET /b/train/shard-0.parquet HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n"
        + b"POST /b/u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(fake) + fake + b"\r\n0\r\nx-trailer: 1\r\n\r\n"
        + b"HEAD /b/k HTTP/1.1\r\n\r\n"
    )  # fmt: skip
    want = [("PUT", "/b/k"), ("GET", "/b/train/shard-0.parquet"), ("POST", "/b/u"), ("HEAD", "/b/k")]
    for size in (1, 2, 7, 64, len(stream)):
        heads = RequestHeads()
        got = [h for i in range(0, len(stream), size) for h in heads.feed(stream[i : i + size])]
        assert got == want, size


def test_retry_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(storage.RETRY_ENV, raising=False)
    assert storage.retry_policy() == storage.DEFAULT_RETRY
    for text, policy in (("8", storage.RetryPolicy(8)), (" 3, 0.05 ,0.1", storage.RetryPolicy(3, 0.05, 0.1))):
        monkeypatch.setenv(storage.RETRY_ENV, text)
        assert storage.retry_policy() == policy
    for bad in ("0", "many", "3,-1", "3,0.1,nan", "1,2,3,4"):
        monkeypatch.setenv(storage.RETRY_ENV, bad)
        with pytest.raises(ConfigError, match=f"{storage.RETRY_ENV}={bad!r}: expected attempts"):
            storage.read_bytes("/nonexistent/x")  # the budget is resolved before the first attempt


def test_workers_get_the_aws_variables_only_when_the_run_touches_s3(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv(storage.RETRY_ENV, "5")
    local = _cfg(str(tmp_path / "data"), tmp_path, "local")
    assert train_run.worker_storage_env(local) == {storage.RETRY_ENV: "5"}
    remote = _cfg("s3://bucket/data", tmp_path, "remote")
    assert train_run.worker_storage_env(remote)["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"


def test_workers_never_get_the_aws_secrets(monkeypatch, tmp_path):
    """Ray keeps a runtime env in plain text in its task / actor state and its log files: the keys stay out."""
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "t0k3n",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")  # a path: forwarded
    env = train_run.worker_storage_env(_cfg("s3://bucket/data", tmp_path, "remote"))
    assert not set(secrets) & set(env) and not set(secrets.values()) & set(env.values())
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/secrets/token"
