"""``ray job submit`` end to end: a token-authenticated head node on 127.0.0.1 runs ``python -m pipeline train``.

The head is ``ray start --head --block`` in a subprocess with free ports and its own short temp dir; it is
stopped by its PID (SIGTERM makes ``--block`` tear its processes down), never with ``ray stop``.

Token authentication (Ray 2.60): ``ray start`` enables it when ``RAY_AUTH_MODE=token`` is set (or a token
file exists); every client (``ray job submit``, the job's driver, its workers) then needs the token, from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``. The test makes its own token and
passes it through the environment, so nothing is written to the home directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.artifacts.model_file import load_model_file
from tests.pipeline.fixtures import synthetic_shards

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
# Everything the job does not need; the shards and outputs live outside the working dir (shared storage).
EXCLUDES = [
    ".git",
    ".venv",
    ".bench",
    ".dvc/cache",
    "data",
    "shards",
    "runs",
    "models",
    "mlflow.db",
    "mlartifacts",
    "metrics",
    "reports",
    "plots",
    "eval",
    "benchmarks/results",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.egg-info",
    "__pycache__",
]

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(420)]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def head(tmp_path):
    """A token-authenticated single-node cluster: yields (dashboard address, client env with the token)."""
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SSD_TRAIN_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while _ray("job", "list", f"--address={address}", env=env, timeout=60).returncode != 0:
            assert process.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(2)
        yield address, env
    finally:
        process.send_signal(signal.SIGTERM)  # --block: the head kills the processes it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_and_writes_the_model_file(head, tmp_path):
    address, env = head
    shards = synthetic_shards(tmp_path, num_train=32, num_val=8, image_size=96)
    params = tmp_path / "params.yaml"
    params.write_text(
        "seed: 3\nmodel: {preset: ssd_tiny}\naugment: {expand: false, crop: false}\n"
        "train: {num_workers: 2, threads_per_worker: 1, loader_workers: 0, batch_size: 4, max_steps: 4,\n"
        "        warmup_steps: 1, checkpoint_every_steps: 2, run_name: job-test}\n"
        "tracking: {enabled: false}\n"
    )
    model_out = tmp_path / "models" / "ssd.pt"

    # Without the token the cluster refuses the client.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-such-token")
    refused = _ray("job", "list", f"--address={address}", env=no_token, timeout=60)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr, refused.stderr[-2000:]

    submission = f"ssd-train-{secrets.token_hex(4)}"
    submitted = _ray(
        "job",
        "submit",
        f"--address={address}",
        f"--submission-id={submission}",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        "python",
        "-m",
        "pipeline",
        "train",
        "--params",
        str(params),
        "--shards",
        shards,
        "--model-out",
        str(model_out),
        f"train.storage_path={tmp_path / 'runs'}",
        env=env,
        timeout=360,
    )
    logs = submitted.stdout[-4000:] + submitted.stderr[-2000:]
    assert submitted.returncode == 0, logs
    status = _ray("job", "status", f"--address={address}", submission, env=env, timeout=60)
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr, logs
    loaded = load_model_file(model_out)
    assert loaded.preset == "ssd_tiny" and loaded.params["train"]["max_steps"] == 4
    assert loaded.classes and loaded.params["seed"] == 3
    runs = list((tmp_path / "runs").glob("job-test-*/checkpoint_step_000000004"))
    assert len(runs) == 1, "the final checkpoint is in the shared storage path"
