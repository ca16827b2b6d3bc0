"""The sweep driver's pieces without a sweep: the experiment record checked on resume, the leaderboard callback's
failed writes, the trials' failure budget, checkpoint URIs on S3 (real files, a real S3 server, no Ray cluster)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train

from molre.data import storage
from molre.data.dataset import arrow_filesystem
from molre.data.storage import StorageError
from molre.errors import ConfigError
from molre.train.checkpoint import checkpoint_uri
from molre.tune import sweep
from molre.tune.space import SweepSpec
from tests.tiny_data import write_tiny_dataset


def _spec(data: str, lr: float = 1e-2, experts=(2, 3), **extra) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "exp",
        "base": {"backbone": {"preset": "tiny-vit"}, "data": {"uri": data}, "optim": {"lr_head": lr}},
        "space": {"adapter.molre.experts": {"choice": list(experts)}},
        "search": {"algorithm": "grid"},
        **extra,
    })  # fmt: skip


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("resume-data")
    return tuple(
        write_tiny_dataset(str(root / n), counts={"train": 2, "val": 2}, seed=s)
        for n, s in (("a", 0), ("b", 1))
    )


def _create(spec: SweepSpec, experiment: Path, data: str) -> None:
    """What fit_experiment writes when it creates an experiment."""
    sweep.write_experiment_record(str(experiment), sweep.experiment_record(spec, data))


def test_resume_with_the_recorded_spec_and_data_is_allowed(datasets, tmp_path):
    data, _ = datasets
    _create(_spec(data), tmp_path, data)
    record = json.loads((tmp_path / sweep.SPEC_FILE).read_text())
    assert record["spec"] == _spec(data).model_dump(mode="json")
    assert record["data"]["uri"] == data and len(record["data"]["manifest_sha256"]) == 64
    sweep.check_resumable(_spec(data), str(tmp_path), data)  # the same: no error


def test_resume_with_a_changed_spec_is_refused_naming_the_changed_keys(datasets, tmp_path):
    data, other = datasets
    _create(_spec(data), tmp_path, data)
    with pytest.raises(ConfigError) as err:
        sweep.check_resumable(_spec(other, lr=5e-4, experts=(2, 3, 4)), str(tmp_path), other)
    message = str(err.value)
    assert "cannot resume experiment exp" in message and str(tmp_path) in message
    for key in ("base.optim.lr_head: 0.01 -> 0.0005", "space.adapter.molre.experts.choice", "base.data.uri",
                "data.manifest_sha256"):  # fmt: skip
        assert key in message
    assert "resources" not in message and "search" not in message  # unchanged keys are not named


def test_resume_on_changed_data_at_the_same_uri_is_refused(datasets, tmp_path):
    data, other = datasets
    copy = str(tmp_path / "data")
    write_tiny_dataset(copy, counts={"train": 2, "val": 2}, seed=0)
    _create(_spec(copy), tmp_path / "exp", copy)
    write_tiny_dataset(copy, counts={"train": 2, "val": 3}, seed=0)  # re-preprocessed in place: other content
    with pytest.raises(ConfigError, match=r"data\.manifest_sha256: \""):
        sweep.check_resumable(_spec(copy), str(tmp_path / "exp"), copy)


def test_another_experiment_of_the_same_name_is_refused(datasets, tmp_path):
    data, _ = datasets
    _create(_spec(data), tmp_path, data)
    other = _spec(data, resources={"num_workers": 2}, search={"algorithm": "grid", "seeds": [0, 1]})
    with pytest.raises(
        ConfigError, match=r"resources\.num_workers: 1 -> 2.*search\.seeds: \[0\] -> \[0, 1\]"
    ):
        sweep.check_resumable(other, str(tmp_path), data)


def test_an_experiment_without_a_record_resumes_with_a_warning_and_gets_one(datasets, tmp_path, caplog):
    data, _ = datasets
    with caplog.at_level(logging.WARNING, logger="molre.tune.sweep"):
        sweep.check_resumable(_spec(data), str(tmp_path), data)
    assert f"has no {sweep.SPEC_FILE}" in caplog.text and str(tmp_path) in caplog.text
    assert json.loads((tmp_path / sweep.SPEC_FILE).read_text())["data"]["uri"] == data
    with pytest.raises(ConfigError, match="lr_head"):  # from now on checked against it
        sweep.check_resumable(_spec(data, lr=1.0), str(tmp_path), data)


def test_an_unreadable_record_is_a_clear_error(datasets, tmp_path):
    data, _ = datasets
    (tmp_path / sweep.SPEC_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{sweep.SPEC_FILE}: not a readable experiment record"):
        sweep.check_resumable(_spec(data), str(tmp_path), data)


def _trial(trial_id: str, status: str = "TERMINATED"):
    """A trial as the callback sees it (Tune's Trial: id, status, recorded config, last result)."""
    metrics = {"epoch": 0, "best_epoch": 0, "val/best_mean_auc": 0.7, "time_total_s": 3.0}
    return SimpleNamespace(trial_id=trial_id, status=status, config={"point": {"adapter.molre.experts": 2},
                           "seed": 0}, last_result=metrics)  # fmt: skip


def test_a_failed_leaderboard_write_is_logged_and_the_sweep_goes_on(datasets, tmp_path, caplog):
    data, _ = datasets
    experiment = tmp_path / "exp"
    (experiment / "report.html" / "blocker").mkdir(parents=True)  # report.html cannot be written
    callback = sweep.LeaderboardCallback(_spec(data), str(experiment), data)
    trials = [_trial("t1"), _trial("t2", "ERROR")]
    with caplog.at_level(logging.ERROR, logger="molre.tune.sweep"):
        callback.on_trial_complete(0, trials, trials[0])  # no exception: Tune would abort the sweep
        callback.on_trial_error(1, trials, trials[1])
    failures = [r for r in caplog.records if "could not rewrite the leaderboard" in r.getMessage()]
    assert len(failures) == 2
    assert str(experiment) in failures[0].getMessage() and "report.html" in failures[0].getMessage()
    with pytest.raises(OSError, match="report.html"):  # the sweep's final write still fails loudly
        sweep.write_results(sweep.trials_table(trials, _spec(data), data), str(experiment), _spec(data))
    (experiment / "report.html" / "blocker").rmdir()
    (experiment / "report.html").rmdir()
    callback.on_trial_complete(2, trials, trials[1])  # storage back: the next trial's end writes everything
    assert (experiment / "report.html").is_file() and (experiment / "trials.parquet").is_file()


def test_trials_survive_several_worker_losses_and_the_spec_sets_how_many(datasets, tmp_path):
    data, _ = datasets
    fs, path = arrow_filesystem(str(tmp_path))
    run_config = sweep.tune_run_config(_spec(data), str(tmp_path / "exp"), fs, path)
    assert run_config.failure_config.max_failures == 3  # was 1: a second spot reclaim failed the trial
    spec = _spec(data, resources={"trial_max_failures": -1})
    assert sweep.tune_run_config(spec, str(tmp_path / "exp"), fs, path).failure_config.max_failures == -1
    with pytest.raises(ValueError, match="trial_max_failures"):
        _spec(data, resources={"trial_max_failures": -2})


def test_checkpoint_uri_keeps_the_s3_scheme(s3_bucket, tmp_path):
    where = f"{s3_bucket}/sweeps/exp/runs/t1/checkpoint_000001"
    storage.write_bytes(f"{where}/config.yaml", b"x: 1\n")
    fs, path = arrow_filesystem(where)  # as Train's storage is given: the fsspec s3fs under pyarrow
    checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
    assert not checkpoint.path.startswith(
        "s3://"
    )  # what Train reports: bucket/key, relative to its filesystem
    uri = checkpoint_uri(checkpoint.path, s3_bucket)
    assert uri == where and storage.read_bytes(f"{uri}/config.yaml") == b"x: 1\n"
    local = ray.train.Checkpoint.from_directory(str(tmp_path))
    assert checkpoint_uri(local.path, str(tmp_path)) == str(tmp_path)


def test_a_sweep_into_a_missing_bucket_fails_first_and_creates_no_bucket(s3_bucket, tmp_path):
    """Ray's storage check would mkdir a mistyped bucket where the credentials allow it; the sweep stops first."""
    missing = s3_bucket.replace("s3://", "s3://no-such-") + "/sweeps"
    for _ in range(2):  # the second time: still missing, nothing created by the first attempt
        with pytest.raises(StorageError, match=r"bucket s3://no-such-\S+ does not exist"):
            sweep.run_sweep(_spec(str(tmp_path / "data")), missing)
