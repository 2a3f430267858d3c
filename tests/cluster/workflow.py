"""The README's "Cluster on your laptop" commands, verbatim, and what the cluster test needs to run and inspect
them: a shell with the cluster's environment, the cluster's state, its job server, its MLflow server, its bucket.

``COMMANDS`` is the single copy of those lines: ``tests/test_readme.py`` checks that README's section shows
exactly these, and ``tests/cluster/test_workflow.py`` runs them. Where a line names a job (``$JOB``), a run
(``$RUN``) or a node (``$NODE``), the test sets that variable (README sets them with ``export``); nothing
else is substituted.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent  # the clones get a .venv link to it, like a checkout after `make install`

# The short training run the README rehearses: the embedded default's data and model, 2 workers of 1 thread,
# 4 images per step, a checkpoint every 40 steps, every step logged. 200 steps: after the node failure the
# recovered job must still be running when `ray job stop` reaches it, and on a busy 2-core machine that CLI took
# 14 s to start while the job did 0.2 s steps (with 60 steps and a checkpoint every 10, the job finished first;
# with 120 and 20, the stop landed 2 steps before the end).
MAX_STEPS = 200
EXCLUDES = '{"excludes": ["/.git", "/.venv", "/.dvc/cache", "/data", "/shards", "/runs", "/models", "/mlflow.db"]}'
SUBMIT = (
    ".venv/bin/ray job submit --submission-id $JOB --no-wait --working-dir . "
    f"--runtime-env-json '{EXCLUDES}' "
    "-- python -m pipeline train --wait --shards s3://$SSD_S3_BUCKET/shards "
    "--model-out s3://$SSD_S3_BUCKET/models/$RUN.pt "
    "train.storage_path=s3://$SSD_S3_BUCKET/runs tracking.uri=$MLFLOW_TRACKING_URI "
    f"train.run_name=$RUN train.max_steps={MAX_STEPS} train.batch_size=4 train.checkpoint_every_steps=40 "
    "train.log_every_steps=1 train.loader_workers=0 train.precision=fp32"
)
START = "infra/local/start"
LOAD_ENV = 'set -a; . "${SSD_CLUSTER_DIR:-/tmp/ssd-cluster-$(id -u)}/env"; set +a'
REPRO = ".venv/bin/dvc repro shard"
UPLOAD = ".venv/bin/python -m pipeline upload shards shards s3://$SSD_S3_BUCKET/shards"
REMOTE_ADD = ".venv/bin/dvc remote add --local -d laptop s3://$SSD_S3_BUCKET/dvc"
REMOTE_ENDPOINT = ".venv/bin/dvc remote modify --local laptop endpointurl $AWS_ENDPOINT_URL"
PUSH = ".venv/bin/dvc push shard"
COMMIT = 'git add dvc.lock && git commit -m "shards for the cluster"'
RM_SHARDS = "rm -rf shards"
JOB_STOP = ".venv/bin/ray job stop $JOB"
JOB_LOGS = ".venv/bin/ray job logs $JOB"
KILL_NODE = ".venv/bin/python infra/local/cluster.py kill $NODE"
ADD_NODE = ".venv/bin/python infra/local/cluster.py add-node"
KILL_MLFLOW = ".venv/bin/python infra/local/cluster.py kill mlflow"
REVIVE_MLFLOW = ".venv/bin/python infra/local/cluster.py revive mlflow"
PULL = ".venv/bin/dvc pull shard"
STOP = "infra/local/stop"
COMMANDS = (START, LOAD_ENV, REPRO, UPLOAD, REMOTE_ADD, REMOTE_ENDPOINT, PUSH, COMMIT, RM_SHARDS, SUBMIT, JOB_LOGS)
COMMANDS += (KILL_NODE, ADD_NODE, KILL_MLFLOW, REVIVE_MLFLOW, JOB_STOP, PULL, STOP)


def fresh_clone(source: Path, target: Path) -> Path:
    """``git clone`` of ``source`` at ``target``, with a ``.venv`` link to this venv (as ``make install`` leaves
    a checkout). For the repository itself, the working tree's uncommitted files are copied over the clone,
    so that the test runs the code on disk."""
    subprocess.run(["git", "clone", "-q", str(source), str(target)], check=True)
    if source == REPO:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.split(b"\0")
        for name in filter(None, (entry.decode() for entry in listed)):
            origin = REPO / name
            if origin.is_file() and not origin.is_symlink():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                (target / name).write_bytes(origin.read_bytes())
    subprocess.run(["git", "config", "user.email", "test@example.com"], cwd=target, check=True)
    subprocess.run(["git", "config", "user.name", "cluster test"], cwd=target, check=True)
    (target / ".venv").symlink_to(VENV)
    return target


class Shell:
    """Runs README lines with bash in a checkout, after ``LOAD_ENV`` once the cluster's env file exists."""

    def __init__(self, cluster_dir: Path, log: Path):
        self.cluster_dir = cluster_dir
        self.log = log
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "SSD_"))}
        self.env.update(SSD_CLUSTER_DIR=str(cluster_dir), PATH=f"{VENV / 'bin'}{os.pathsep}{self.env['PATH']}")

    def script(self, line: str) -> str:
        prefix = f"{LOAD_ENV}; " if (self.cluster_dir / "env").exists() else ""
        return f"set -euo pipefail; {prefix}{line}"

    def run(self, line: str, cwd: Path, timeout: float = 300, **variables: str) -> str:
        """Run ``line``; return its output; fail the test with the output's end if it fails."""
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", self.script(line)],
            cwd=cwd,
            env={**self.env, **variables},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with open(self.log, "a") as log:
            log.write(
                f"$ {line}  [{time.monotonic() - started:.1f} s, rc {done.returncode}]\n{done.stdout}{done.stderr}"
            )
        assert done.returncode == 0, f"{line} failed:\n{(done.stdout + done.stderr)[-4000:]}"
        return done.stdout + done.stderr

    def start(self, line: str, cwd: Path) -> subprocess.Popen:
        """Start ``line`` in the background (output to the log)."""
        with open(self.log, "a") as log:
            return subprocess.Popen(["bash", "-c", self.script(line)], cwd=cwd, env=self.env, stdout=log, stderr=log)

    def client_env(self) -> dict[str, str]:
        """The cluster's client environment (``DIR/env``) as a dict."""
        lines = (self.cluster_dir / "env").read_text().splitlines()
        return dict(line.removeprefix("export ").split("=", 1) for line in lines if "=" in line)


# ------------------------------------------------------------------------------------------ the cluster
def cluster_state(cluster_dir: Path) -> dict[str, Any]:
    return json.loads((cluster_dir / "state.json").read_text())


class JobServer:
    """Ray's job server and state API over HTTP, with the cluster's token."""

    def __init__(self, env: dict[str, str]):
        self.address = env["RAY_API_SERVER_ADDRESS"]
        self.token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def status(self, job: str) -> str:
        return self._get(f"/api/jobs/{job}")["status"]

    def logs(self, job: str) -> str:
        return self._get(f"/api/jobs/{job}/logs")["logs"]

    def wait(self, job: str, timeout_s: float) -> str:
        """Wait until ``job`` has ended; return its final status."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, (
                f"job {job} still {status} after {timeout_s} s:\n{self.logs(job)[-4000:]}"
            )
            time.sleep(2)
        return status

    def training_nodes(self, job: str) -> set[str]:
        """Node ids of ``job``'s live training ranks (Ray Train's ``RayTrainWorker`` actors)."""
        job_id = self._get(f"/api/jobs/{job}")["job_id"]
        query = "/api/v0/actors?limit=1000&detail=true&filter_keys=class_name&filter_predicates=%3D"
        actors = self._get(query + "&filter_values=RayTrainWorker")["data"]["result"]["result"]
        return {a["node_id"] for a in actors if a["state"] == "ALIVE" and a["job_id"] == job_id}


class Mlflow:
    """The MLflow server's REST API as the training user."""

    def __init__(self, env: dict[str, str]):
        self.uri = env["MLFLOW_TRACKING_URI"]
        login = f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}"
        self.auth = "Basic " + base64.b64encode(login.encode()).decode()

    def call(self, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": self.auth, "Content-Type": "application/json"}
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{path}", data, headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def runs(self, run_name: str) -> list[dict]:
        """Every run named ``run_name``, in any experiment."""
        experiments = self.call("experiments/search", {"max_results": 1000})["experiments"]
        body = {
            "experiment_ids": [e["experiment_id"] for e in experiments],
            "filter": f"attributes.run_name = '{run_name}'",
            "max_results": 1000,
        }
        return self.call("runs/search", body).get("runs", [])

    def history(self, run_id: str, key: str) -> list[dict]:
        """Every stored value of metric ``key`` (``step``, ``timestamp`` in ms, ``value``)."""
        query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key, "max_results": 25000})
        return self.call(f"metrics/get-history?{query}").get("metrics", [])

    def model_versions(self, run_id: str) -> list[dict]:
        query = urllib.parse.urlencode({"filter": f"run_id='{run_id}'"})
        return self.call(f"model-versions/search?{query}").get("model_versions", [])


def s3_client(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def s3_keys(env: dict[str, str], prefix: str) -> list[str]:
    """Every key under ``prefix`` in the cluster's bucket."""
    pages = s3_client(env).get_paginator("list_objects_v2").paginate(Bucket=env["SSD_S3_BUCKET"], Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def wait_for(predicate, what: str, timeout_s: float, every_s: float = 1.0):
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(every_s)
    return value


_STEP = re.compile(r"(\d\d:\d\d:\d\d) INFO pipeline.training.progress: step (\d+)/")
_START = re.compile(r"(\d\d:\d\d:\d\d) INFO pipeline.training.loop: rank 0/\d+ on \w+: starting at step (\d+)")


def step_times(logs: str) -> list[tuple[float, int]]:
    """(time, step) of rank 0's progress lines in a job's log (today's date, whole seconds)."""
    day = datetime.date.today()
    return [
        (datetime.datetime.combine(day, datetime.time.fromisoformat(t)).timestamp(), int(s))
        for t, s in _STEP.findall(logs)
    ]


def recovery(logs: str, killed: float) -> dict[str, float | int]:
    """From a job's log and the time a node was killed: when the new worker group's rank 0 started
    (``group_restarted_s``), at which step (``resumed_from_step``), and when it completed its first step
    (``next_step_s``), in seconds after the kill (the log has whole seconds)."""
    day = datetime.datetime.fromtimestamp(killed).date()

    def clock(hms: str) -> float:
        return datetime.datetime.combine(day, datetime.time.fromisoformat(hms)).timestamp()

    restarted, step = next((clock(t), int(s)) for t, s in _START.findall(logs) if clock(t) >= int(killed))
    done = next(clock(t) for t, s in _STEP.findall(logs) if clock(t) >= restarted and int(s) == step + 1)
    return {"group_restarted_s": restarted - killed, "resumed_from_step": step, "next_step_s": done - killed}
