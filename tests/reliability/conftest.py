"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest

from tests.conftest import s3_env_vars
from tests.reliability.helpers import StoppableS3


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A ``StoppableS3`` of this test's own (an outage cannot disturb other tests), with the AWS variables pointing
    at it for the duration of the test.

    The keys are also in a credentials file named by ``AWS_SHARED_CREDENTIALS_FILE``: molre forwards that path to
    Ray workers it did not start, never the keys themselves (``storage.FORWARDED_ENV``), so workers of the
    session's Ray (started before this test set the variables) find them there, as a cluster's nodes would."""
    server = StoppableS3()
    env = s3_env_vars(server.endpoint)
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    credentials.chmod(0o600)
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    server.start()
    yield server
    server.close()
