"""Shared pytest fixtures.

S3: a real S3-compatible server (moto's server mode) on 127.0.0.1, started once per session. ``s3_bucket`` gives
a test its own fresh bucket as an ``s3://`` URI and points the standard AWS variables at the server for the
duration of the test (so s3fs, boto3 and Ray workers started from the test all reach it).
"""

from __future__ import annotations

import uuid

import pytest

S3_REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_env_vars(endpoint: str) -> dict[str, str]:
    """The AWS variables that point clients at ``endpoint`` with dummy credentials (no real AWS touched)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Set the AWS variables for this test; returns the endpoint URL."""
    for key, value in s3_env_vars(s3_server).items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, empty bucket on the loopback S3 server, as ``s3://<name>``."""
    import boto3

    name = f"molre-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name=S3_REGION).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 real cores, 4 logical CPUs so a 2-worker run has room)."""
    import os

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    import ray

    if not ray.is_initialized():
        # the dashboard as ensure_ray runs it: Ray Train's placement-group cleaner needs its state API
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A tiny learnable shard dataset (48 train / 24 val / 12 test volumes of 8x64x64), see tests/tiny_data.py."""
    from tests.tiny_data import write_tiny_dataset

    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny-shards")))
