"""The processes of the loopback cluster: how each service is started, when it is ready, and how it is stopped.

Every service is one process started in a session of its own (``start_new_session``), so its PID is also
the ID of its process group, and everything it starts (a raylet's workers, gunicorn's workers) inherits
that group unless it leaves it. Stopping a service signals exactly that group: never a process found by
name, so other Ray clusters or MLflow servers on the machine are left alone.

Only the standard library is imported here: ``infra/local/start`` runs before anything is known about the
environment, and the services themselves are the venv's executables (``ray``, ``mlflow``, ``python``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow and python of the cluster
HOST = "127.0.0.1"
WORKER_CPUS = 1  # one training rank (train.threads_per_worker=1) per worker node: ranks land on different nodes
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # per node; Ray's default (30 % of RAM) is far too much for a laptop
# The GCS declares a node dead after `threshold` failed health checks `period` apart (Ray's defaults, 3 s x 5,
# take 15 s or more). A laptop rehearsal of a node failure should not wait that long.
HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}

# `ray job stop` sends the driver SIGTERM and, by default, SIGKILL 3 s later: too soon for `train` to stop at a
# step boundary, write that step's checkpoint, flush MLflow and release the run folder's lease (a killed driver
# leaves it behind, and the next job waits until it is stale). The job supervisors run on the head and read this.
# infra/docker/Dockerfile sets the same for every cluster that runs the image (a test keeps them equal).
JOB_STOP_ENV = {"RAY_JOB_STOP_WAIT_TIME_S": "120"}


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 now (held open together, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def spawn(cmd: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path) -> int:
    """Start ``cmd`` in a new session (its PID is its process group's ID), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return process.pid


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes whose process group is ``pgid`` (read from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, *, grace_s: float) -> None:
    """SIGTERM process group ``pgid`` (SIGKILL at once when ``grace_s`` is 0), SIGKILL what is left after
    ``grace_s``. Returns when no process of the group is left (or after a further 10 s)."""
    try:
        os.killpg(pgid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pgid)
    deadline = time.monotonic() + grace_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
        _reap(pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
        _reap(pgid)


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is this process's child (so that it does not stay a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(ready: Callable[[], bool], *, pid: int, what: str, log: Path, timeout_s: float) -> None:
    """Poll ``ready`` until it is true; raise naming ``what`` and the end of ``log`` if ``pid`` dies or time
    runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive(pid):
            raise RuntimeError(f"{what} exited during start-up; the end of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {timeout_s:.0f} s; the end of {log}:\n{_tail(log)}")
        time.sleep(0.5)


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------------ Ray
def ray_head_command(ports: dict[str, int], temp_dir: Path) -> list[str]:
    """``ray start --head --block``: GCS, dashboard (job server) and a raylet with no CPUs, so that the head
    runs job drivers and Ray Train's controller (which ask for 0 CPUs) but never a training rank."""
    return [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={ports['gcs']}",
        "--include-dashboard=true",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        *_node_port_flags(ports),
        "--num-cpus=0",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
    ]


def ray_worker_command(gcs_port: int, ports: dict[str, int], name: str, temp_dir: Path) -> list[str]:
    """``ray start --address ... --block``: a worker node with one CPU and a resource of its own, ``name``.
    ``temp_dir`` is the node's own, as on a real cluster: nodes that share one would each forward every node's
    worker logs to the job's driver (each line of ``ray job logs`` once per node)."""
    return [
        str(BIN / "ray"),
        "start",
        f"--address={HOST}:{gcs_port}",
        "--block",
        f"--node-ip-address={HOST}",
        *_node_port_flags(ports),
        f"--temp-dir={temp_dir}",
        f"--num-cpus={WORKER_CPUS}",
        "--num-gpus=0",
        f"--resources={json.dumps({name: 1})}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
    ]


NODE_PORTS = ("node_manager", "object_manager", "metrics", "agent_http", "agent_grpc", "runtime_env")


def _node_port_flags(ports: dict[str, int]) -> list[str]:
    """Every port a raylet would otherwise take from a fixed default (52365 for the agent) or at random."""
    return [
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
    ]


def ray_nodes(dashboard_port: int, token: str) -> list[dict]:
    """The cluster's nodes as the dashboard lists them (``node_id``, ``state``, ``resources_total``...);
    [] while the dashboard does not answer."""
    url = f"http://{HOST}:{dashboard_port}/api/v0/nodes?limit=1000&detail=true"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return []


def alive_node_with(dashboard_port: int, token: str, resource: str) -> dict | None:
    """The live node that offers the custom resource ``resource``, if the cluster has one."""
    for node in ray_nodes(dashboard_port, token):
        if node.get("state") == "ALIVE" and resource in node.get("resources_total", {}):
            return node
    return None


# --------------------------------------------------------------------------------------------- MLflow
def mlflow_command(port: int, root: Path, bucket: str) -> list[str]:
    """The team server: basic auth, a SQLite store for runs, artifacts proxied to ``s3://<bucket>/mlartifacts``
    (clients upload through the server and need no S3 credentials of their own)."""
    return [
        str(BIN / "mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        "mlflow-artifacts:/",
        "--artifacts-destination",
        f"s3://{bucket}/mlartifacts",
    ]


def mlflow_auth_config(root: Path) -> Path:
    """The basic-auth app's settings: users in their own SQLite file; new users may read every experiment
    and own what they create. The admin's password comes from the environment (MLFLOW_AUTH_ADMIN_PASSWORD)."""
    path = root / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    return path


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False
