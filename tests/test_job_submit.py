"""`ray job submit` against a real Ray head, the way a cluster user runs molre (docs/cluster.md).

One head per module: `ray start --head --block` on 127.0.0.1 with token authentication, every port picked
free and its own --temp-dir, so it never meets another Ray on this machine; it is stopped by signalling the
`ray start` process we launched (never `ray stop`, which would stop every Ray on the machine). Jobs go through
the real CLI (`ray job submit/status/logs`) with the token in the client's environment, upload this checkout
as the working dir, run with this test's Python environment (PATH), and reach the loopback S3 server through
the AWS variables passed in the runtime env. While a job runs, its status is polled through the job REST API
(the CLI's own endpoint, with the token): a `ray job status` process costs ~1 CPU-s, which every 3 s took a
third of a core from the job on a 2-core machine; the CLI reads the final status once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import S3_REGION, s3_env_vars

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment running the tests: its `ray` CLI and its `python`
SWEEP_TIMEOUT_S = 12 * 60
FAIL_FAST_S = 180  # an invalid config must fail within this, start-up of the job's Python included

pytestmark = pytest.mark.slow


@dataclass
class Head:
    address: str  # the dashboard / job API, http://127.0.0.1:<port>
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token + the token path
    token: str
    temp_dir: Path
    log: Path


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _clean_env() -> dict[str, str]:
    """This process's environment without any Ray or AWS setting (another cluster's address, real creds)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}


def _kill_leftovers(temp_dir: Path) -> None:
    """Processes of *this* head only (their command line names its temp dir), by PID."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(mine, timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = Path(tempfile.mkdtemp(prefix="molre-rayhead-", dir="/tmp"))  # short: Ray's socket paths
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _clean_env()
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        # Ray's single-machine switch: every Ray address is 127.0.0.1 (otherwise `ray start` replaces
        # --node-ip-address=127.0.0.1 by the machine's routable IP and GCS is dialled there).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops the head at once (no 30 s node drain)
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # job entrypoints' `python` = this environment's
    )
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    log = temp_dir / "head.log"
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        "--num-cpus=4", "--num-gpus=0", "--object-store-memory=600000000",
        f"--temp-dir={temp_dir / 'ray'}", "--disable-usage-stats",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/gcs_healthz", timeout=5)  # whitelisted: no token
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head not up after 180 s:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)
        yield Head(address, env, token.read_text(), temp_dir, log)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started, then exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we created for it: only this head
            proc.wait(timeout=30)
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(head: Head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `ray` CLI, as a user with the cluster's token would run it (plain, uncoloured output)."""
    group, command, *rest = args  # options go before a job's `-- entrypoint`
    return subprocess.run(
        [str(BIN / "ray"), group, command, "--log-color", "false", *rest],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    """deploy/runtime_env.yaml (what docs/cluster.md submits with) plus the local-only bits."""
    env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    env["excludes"] = [*env.get("excludes", []), ".venv", "runs", ".cache", ".pytest_cache", ".ruff_cache"]
    env["env_vars"] = {"RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})}
    return env


def submit(head: Head, entrypoint: list[str], extra_env: dict[str, str] | None = None) -> str:
    submission_id = f"molre-test-{uuid.uuid4().hex[:10]}"
    result = ray_cli(
        head, "job", "submit", "--address", head.address, "--submission-id", submission_id,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env(extra_env)),
        "--no-wait", "--", *entrypoint,
    )  # fmt: skip
    assert result.returncode == 0, f"ray job submit failed:\n{result.stdout}\n{result.stderr}"
    return submission_id


def job_status(head: Head, submission_id: str) -> str:
    result = ray_cli(head, "job", "status", "--address", head.address, submission_id, timeout=60)
    text = result.stdout + result.stderr
    quoted = re.escape(f"'{submission_id}'")
    if re.search(rf"Job {quoted} succeeded", text):
        return "SUCCEEDED"
    if re.search(rf"Job {quoted} failed", text):
        return "FAILED"
    if re.search(rf"Job {quoted} was stopped", text):
        return "STOPPED"
    match = re.search(rf"Status for job {quoted}: (\w+)", text)
    assert match, f"unexpected `ray job status` output:\n{text}"
    return match.group(1)


def job_logs(head: Head, submission_id: str) -> str:
    """`ray job logs`, then `ray job status` (its "Status message" says why a job failed before logging)."""
    logs = ray_cli(head, "job", "logs", "--address", head.address, submission_id, timeout=60)
    status = ray_cli(head, "job", "status", "--address", head.address, submission_id, timeout=60)
    return logs.stdout + logs.stderr + "\n--- ray job status ---\n" + status.stdout + status.stderr


ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def job_state(head: Head, submission_id: str) -> str:
    """The job's status from the job REST API (what `ray job status` asks), without a CLI process."""
    request = urllib.request.Request(f"{head.address}/api/jobs/{submission_id}")
    request.add_header("Authorization", f"Bearer {head.token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


def wait_for(head: Head, submission_id: str, timeout: float) -> str:
    """Poll the job's status until it ends, then read it with `ray job status`; stop the job (and fail) when it
    takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while (state := job_state(head, submission_id)) not in ENDED:
        if time.monotonic() > deadline:
            ray_cli(head, "job", "stop", "--address", head.address, submission_id, timeout=60)
            pytest.fail(
                f"job {submission_id} still {state} after {timeout:.0f} s:\n{job_logs(head, submission_id)[-6000:]}"
            )
        time.sleep(1)
    status = job_status(head, submission_id)
    assert status == state, f"`ray job status` says {status}, the job API {state}"
    return status


def bucket_keys(endpoint: str, uri: str) -> list[str]:
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# ---- the harness itself --------------------------------------------------------------------------------


def test_head_refuses_requests_without_the_token(ray_head):
    request = urllib.request.Request(f"{ray_head.address}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    request.add_header("Authorization", "Bearer " + "0" * 64)
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(request, timeout=10)
    assert wrong.value.code == 403


def test_submitted_job_runs_here_and_reaches_the_bucket(ray_head, s3_bucket, s3_server, tmp_path):
    """A trivial job through the same path as the sweep: working dir, this Python, S3 env -> object in bucket."""
    script = tmp_path / "put.py"
    script.write_text(
        "import sys, boto3, molre\n"
        "bucket, key = sys.argv[1], sys.argv[2]\n"
        "boto3.client('s3').put_object(Bucket=bucket, Key=key, Body=sys.executable.encode())\n"
        "print('wrote', key, 'from', sys.executable)\n"
    )
    bucket = s3_bucket.removeprefix("s3://")
    submission_id = submit(
        ray_head, ["python", str(script), bucket, "harness/ok.txt"], s3_env_vars(s3_server)
    )
    status = wait_for(ray_head, submission_id, timeout=180)
    logs = job_logs(ray_head, submission_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert f"from {sys.executable}" in logs or f"from {BIN}" in logs, logs[-2000:]
    assert bucket_keys(s3_server, f"{s3_bucket}/harness/") == ["harness/ok.txt"]


def test_molre_train_on_the_head_machine_joins_the_ray_start_cluster(ray_head, tiny_dataset, tmp_path):
    """docs/cluster.md's `ray start --head`, then `molre train` on that machine without RAY_ADDRESS: it joins the
    cluster `ray start` recorded (ray.init refused the local Ray's num_cpus for an existing cluster)."""
    run = {"backbone": {"preset": "tiny-vit"}, "data": {"uri": tiny_dataset},
           "train": {"max_epochs": 1, "min_epochs": 0, "run_name": "joined", "storage": str(tmp_path / "runs")}}  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_head.temp_dir)  # where this head's `ray start --temp-dir` wrote its address
    proc = subprocess.run([str(BIN / "molre"), "train", "--config", str(config)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Connecting to existing Ray cluster at address: 127.0.0.1" in output
    assert (tmp_path / "runs" / "joined").is_dir()


# ---- the sweep -------------------------------------------------------------------------------------------


def test_smoke_sweep_via_ray_job_submit_writes_leaderboard_to_s3(ray_head, s3_bucket, s3_server, tmp_path):
    # `--smoke` (1 epoch, the small synthetic dataset generated into the bucket and read back by the trial) on the
    # embedded default's settings with one point, LoRA + MoLRE: one trial proves the cluster path as two did
    # (each trial costs ~35 CPU-s of process starts)
    spec = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    spec["space"] = {"adapter.kind": {"choice": ["molre"]}, "adapter.molre.experts": {"choice": [2]}}
    config = tmp_path / "one_point.yaml"
    config.write_text(yaml.safe_dump(spec))
    storage = f"{s3_bucket}/exp"
    started = time.monotonic()
    submission_id = submit(
        ray_head,
        ["python", "jobs/sweep.py", "--smoke", "--config", str(config), "--storage", storage],
        s3_env_vars(s3_server),
    )
    status = wait_for(ray_head, submission_id, timeout=SWEEP_TIMEOUT_S)
    logs = job_logs(ray_head, submission_id)
    assert status == "SUCCEEDED", f"smoke sweep {status}:\n{logs[-8000:]}"
    for dialled in re.findall(r"Connecting to existing Ray cluster at address: (\S+?):\d+", logs):
        assert dialled == "127.0.0.1", f"the driver dialled {dialled}, not loopback"
    keys = bucket_keys(s3_server, storage + "/")
    names = {key.rsplit("/", 1)[-1] for key in keys}
    assert {"leaderboard.md", "trials.parquet"} <= names, (
        f"leaderboard missing in {storage}: {sorted(keys)[:50]}"
    )
    assert any("/datasets/synthetic-" in key for key in keys)  # the smoke data lives in the bucket too
    print(
        f"smoke sweep via ray job submit: {time.monotonic() - started:.0f} s, {len(keys)} objects in {storage}"
    )


def test_invalid_config_fails_fast_with_the_reason_in_job_logs(ray_head, s3_bucket, s3_server, tmp_path):
    """The embedded default sweep with one mistyped key in its run config (optim.lr_heda for lr_head)."""
    bad_key = "lr_heda"
    spec = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    spec.setdefault("base", {}).setdefault("optim", {})[bad_key] = 3.0e-3
    config = tmp_path / "bad_sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    started = time.monotonic()
    submission_id = submit(
        ray_head,
        ["python", "jobs/sweep.py", "--config", str(config), "--storage", f"{s3_bucket}/bad"],
        s3_env_vars(s3_server),
    )
    status = wait_for(ray_head, submission_id, timeout=FAIL_FAST_S)
    elapsed = time.monotonic() - started
    logs = job_logs(ray_head, submission_id)
    assert status == "FAILED", logs[-4000:]
    assert bad_key in logs, f"the reason (unknown key {bad_key}) is not in `ray job logs`:\n{logs[-4000:]}"
    assert elapsed < FAIL_FAST_S
