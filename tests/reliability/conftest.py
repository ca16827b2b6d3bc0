"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest

from tests.conftest import s3_env_vars
from tests.reliability.helpers import StoppableS3


@pytest.fixture
def s3(monkeypatch):
    """A ``StoppableS3`` of this test's own (an outage cannot disturb other tests), with the AWS variables pointing
    at it for the duration of the test."""
    server = StoppableS3()
    for key, value in s3_env_vars(server.endpoint).items():
        monkeypatch.setenv(key, value)
    server.start()
    yield server
    server.close()
