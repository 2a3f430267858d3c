"""A cluster on one machine, on 127.0.0.1 only: an S3 object store, a token-authenticated Ray head with worker
nodes, and a team MLflow server with a login. To rehearse a cluster run before paying for one.

    infra/local/start [--dir DIR] [--workers 2]   # start everything; prints the line that loads its env
    infra/local/stop  [--dir DIR]                 # stop exactly the processes `start` started
    python infra/local/cluster.py add-node|kill NAME|revive mlflow|status [--dir DIR]

What runs (each service one process group, its PID recorded in ``DIR/state.json``; logs in ``DIR/logs``):

- ``s3``: ``infra/local/s3_server.py`` (moto) with one access key; it holds the bucket for shards,
  checkpoints, MLflow's artifacts and the DVC remote. Requests without the key are refused. In memory:
  stopping it loses the bucket.
- ``ray-head``: GCS, dashboard and job server, and a raylet with 0 CPUs: job drivers and Ray Train's
  controller run there, training ranks never do. Token authentication (``RAY_AUTH_MODE=token``).
- ``ray-worker-<i>``: a worker node with 1 CPU and a resource of its own, ``ssd_node_<i>``, so that two
  ranks of one CPU each run on two different nodes (all nodes share one IP: tell them apart by node id).
- ``mlflow``: ``mlflow server --app-name basic-auth``, SQLite stores (runs, users), artifacts proxied to
  ``s3://<bucket>/mlartifacts``. Users: ``admin`` and ``ssd-train``, the user the training runs log as.

The nodes carry the S3 key and the ``ssd-train`` login in their environment (as instance profiles and
mounted secret files do on a real cluster), so jobs find them without being told; the client environment
(``DIR/env``, mode 0600: ``set -a; . DIR/env; set +a``) has the Ray token, the job server's address, the S3
key and endpoint, and the MLflow URI and login. The head's PATH starts with this venv's bin, because a job's
``python`` is whatever the head finds first.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import services as svc  # noqa: E402 - infra/local is a folder of scripts, not a package

DEFAULT_DIR = Path(os.environ.get("SSD_CLUSTER_DIR", f"/tmp/ssd-cluster-{os.getuid()}"))
BUCKET = "ssd"
TRAIN_USER = "ssd-train"
S3_SERVER = Path(__file__).resolve().parent / "s3_server.py"
MARKER = ".ssd-local-cluster"  # in the state folder: start may clear it
STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
# Variables of the invoking shell that would point the services at another cluster, store or server.
_FOREIGN_PREFIXES = ("RAY_", "MLFLOW_", "AWS_")


class Cluster:
    """The state of one loopback cluster, kept in ``DIR/state.json``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.state_path = self.root / "state.json"
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    # ------------------------------------------------------------------------------------ bookkeeping
    def save(self) -> None:
        temp = self.state_path.with_suffix(".tmp")
        _write_private(temp, json.dumps(self.state, indent=2))  # it holds the secrets
        temp.replace(self.state_path)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def secret(self, key: str) -> str:
        return self.state["secrets"][key]

    def client_env(self) -> dict[str, str]:
        """What a client of the cluster needs: ray job submit, the pipeline's storage, dvc, MLflow."""
        ports = self.state["ports"]
        return {
            "RAY_API_SERVER_ADDRESS": f"http://{svc.HOST}:{ports['dashboard']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "ray_token"),
            **self.state["s3_env"],
            "MLFLOW_TRACKING_URI": f"http://{svc.HOST}:{ports['mlflow']}",
            "MLFLOW_TRACKING_USERNAME": TRAIN_USER,
            "MLFLOW_TRACKING_PASSWORD": self.secret("train_password"),
        }

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
        env["PATH"] = f"{svc.BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
        return env

    def _node_env(self) -> dict[str, str]:
        return {
            **self._base_env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "ray_token"),
            **self.state["s3_env"],
            "MLFLOW_TRACKING_USERNAME": TRAIN_USER,
            "MLFLOW_TRACKING_PASSWORD": self.secret("train_password"),
        }

    def _record(self, name: str, pid: int, **extra) -> None:
        self.state["services"][name] = {"pid": pid, "log": str(self.log(name)), "started": time.time(), **extra}
        self.save()

    # ---------------------------------------------------------------------------------------- start
    def start(self, workers: int) -> None:
        if self.state and any(svc.alive(s["pid"]) for s in self.state.get("services", {}).values()):
            raise SystemExit(f"a cluster is already running from {self.root} (infra/local/stop --dir {self.root})")
        self._fresh_root()
        gcs, dashboard, client, mlflow, s3 = svc.free_ports(5)
        self.state = {
            "ports": {"gcs": gcs, "dashboard": dashboard, "client": client, "mlflow": mlflow, "s3": s3},
            "secrets": {
                "ray_token": secrets.token_hex(32),
                "admin_password": secrets.token_urlsafe(24),
                "train_password": secrets.token_urlsafe(24),
                "flask_secret_key": secrets.token_hex(32),
            },
            "services": {},
            "next_worker": 1,
        }
        _write_private(self.root / "ray_token", self.secret("ray_token"))
        self.save()
        try:
            self._start_s3()
            head, mlflow = self._spawn_ray_head(), self._spawn_mlflow()  # both take a while: side by side
            try:
                head()
            except RuntimeError:  # Ray's fixed 30 s for a raylet to register ran out (a loaded machine): again
                svc.kill_group(self.state["services"].pop("ray-head")["pid"], grace_s=0)
                self._spawn_ray_head()()
            mlflow()
            self._create_train_user()
            for _ in range(workers):
                self.add_node()
        except BaseException:
            self.stop()
            raise
        _write_private(self.root / "env", "".join(f"export {k}={v}\n" for k, v in self.client_env().items()))

    def _fresh_root(self) -> None:
        """An empty state folder: created with a marker, or one that has the marker (a stopped cluster's: its
        stores are cleared, as the bucket they point into is gone). Any other folder is refused."""
        marker = self.root / MARKER
        if self.root.exists() and not marker.exists() and any(self.root.iterdir()):
            raise SystemExit(f"{self.root} exists and was not made by infra/local/start; choose another --dir")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        marker.touch()
        for folder in ("mlflow", "ray", "logs", *(p.name for p in self.root.glob("ray-w*"))):
            shutil.rmtree(self.root / folder, ignore_errors=True)

    def _start_s3(self) -> None:
        env_file = self.root / "s3.env"
        env_file.unlink(missing_ok=True)
        cmd = [str(svc.BIN / "python"), str(S3_SERVER), "--port", str(self.state["ports"]["s3"])]
        cmd += ["--bucket", BUCKET, "--env-file", str(env_file)]
        pid = svc.spawn(cmd, env=self._base_env(), log=self.log("s3"), cwd=self.root)
        self._record("s3", pid)
        svc.wait_until(env_file.exists, pid=pid, what="the S3 server", log=self.log("s3"), timeout_s=60)
        lines = env_file.read_text().splitlines()
        self.state["s3_env"] = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
        self.save()

    def _spawn_ray_head(self) -> Callable[[], None]:
        """Start the head; returns the wait for it to be ready."""
        ports = dict(self.state["ports"])
        ports.update(zip(svc.NODE_PORTS, svc.free_ports(len(svc.NODE_PORTS)), strict=True))
        env = {**self._node_env(), **svc.HEALTH_CHECK_ENV, **svc.JOB_STOP_ENV}
        temp = self.root / "ray"  # Ray's socket paths must stay under 108 bytes: keep DIR short
        pid = svc.spawn(svc.ray_head_command(ports, temp), env=env, log=self.log("ray-head"), cwd=self.root)
        self._record("ray-head", pid)
        token, dashboard = self.secret("ray_token"), ports["dashboard"]
        return lambda: svc.wait_until(
            lambda: bool(svc.ray_nodes(dashboard, token)),
            pid=pid,
            what="the Ray head",
            log=self.log("ray-head"),
            timeout_s=STARTUP_TIMEOUT_S,
        )

    def add_node(self, attempts: int = 3) -> str:
        """Start one more worker node (as an autoscaler would) and wait until it has joined; returns its name.
        ``ray start`` gives up when its raylet has not registered within 30 s (a fixed limit in Ray); on a
        loaded machine that happens, so a node that exits during start-up is started again (twice)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._add_node()
            except RuntimeError:
                failed = self.state["services"].pop(f"ray-worker-{self.state['next_worker'] - 1}")
                self.save()
                svc.kill_group(failed["pid"], grace_s=0)
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _add_node(self) -> str:
        index = self.state["next_worker"]
        self.state["next_worker"] = index + 1
        name, resource = f"ray-worker-{index}", f"ssd_node_{index}"
        ports = dict(zip(svc.NODE_PORTS, svc.free_ports(len(svc.NODE_PORTS)), strict=True))
        temp = self.root / f"ray-w{index}"  # the node's own (see ray_worker_command); short, as the head's
        cmd = svc.ray_worker_command(self.state["ports"]["gcs"], ports, resource, temp)
        pid = svc.spawn(cmd, env=self._node_env(), log=self.log(name), cwd=self.root)
        self._record(name, pid, resource=resource)
        token, dashboard = self.secret("ray_token"), self.state["ports"]["dashboard"]
        svc.wait_until(
            lambda: svc.alive_node_with(dashboard, token, resource) is not None,
            pid=pid,
            what=f"Ray worker node {name}",
            log=self.log(name),
            timeout_s=STARTUP_TIMEOUT_S,
        )
        self.state["services"][name]["node_id"] = svc.alive_node_with(dashboard, token, resource)["node_id"]
        self.save()
        return name

    def _spawn_mlflow(self) -> Callable[[], None]:
        """Start the MLflow server; returns the wait for it to answer."""
        root = self.root / "mlflow"
        root.mkdir(exist_ok=True)
        s3 = self.state["s3_env"]
        env = {
            **self._base_env(),
            "MLFLOW_AUTH_CONFIG_PATH": str(svc.mlflow_auth_config(root)),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secret("admin_password"),  # used once, when auth.db is created
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("flask_secret_key"),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **s3,
            "MLFLOW_S3_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
        }
        port = self.state["ports"]["mlflow"]
        pid = svc.spawn(svc.mlflow_command(port, root, BUCKET), env=env, log=self.log("mlflow"), cwd=root)
        self._record("mlflow", pid)
        return lambda: svc.wait_until(
            lambda: svc.http_ok(f"http://{svc.HOST}:{port}/health"),
            pid=pid,
            what="the MLflow server",
            log=self.log("mlflow"),
            timeout_s=STARTUP_TIMEOUT_S,
        )

    def _create_train_user(self) -> None:
        """Create ``ssd-train`` through the basic-auth app's REST API, as the admin."""
        url = f"http://{svc.HOST}:{self.state['ports']['mlflow']}/api/2.0/mlflow/users/create"
        body = json.dumps({"username": TRAIN_USER, "password": self.secret("train_password")}).encode()
        login = base64.b64encode(f"admin:{self.secret('admin_password')}".encode()).decode()
        headers = {"Authorization": f"Basic {login}", "Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=30) as response:
            assert response.status == 200, response.status

    # ------------------------------------------------------------------------------ faults and repair
    def kill(self, name: str) -> None:
        """SIGKILL service ``name``'s whole process group at once: a crash, not a shutdown."""
        entry = self._entry(name)
        svc.kill_group(entry["pid"], grace_s=0)
        entry["killed"] = time.time()
        self.save()

    def revive(self, name: str) -> None:
        """Start ``mlflow`` again on its port and stores (an outage, not a reset). Nodes are not revived:
        ``add-node`` starts a new one, as an autoscaler does; the S3 server keeps its data in memory only."""
        if name != "mlflow":
            raise SystemExit(f"revive: only mlflow can be revived, not {name!r} (use add-node for a Ray node)")
        if svc.alive(self._entry(name)["pid"]):
            raise SystemExit("revive: mlflow is running")
        self._spawn_mlflow()()

    def _entry(self, name: str) -> dict:
        try:
            return self.state["services"][name]
        except KeyError:
            raise SystemExit(f"no service {name!r} in {self.state_path}") from None

    # ----------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Stop every service this cluster started, nodes first, by process group; keep the logs."""
        names = sorted(self.state.get("services", {}), key=lambda n: (not n.startswith("ray-worker"), n != "ray-head"))
        for name in names:
            svc.kill_group(self.state["services"][name]["pid"], grace_s=STOP_GRACE_S)
        for leftover in ("state.json", "env", "ray_token", "s3.env"):
            (self.root / leftover).unlink(missing_ok=True)
        self.state = {}

    def status(self) -> dict:
        return {name: {**entry, "alive": svc.alive(entry["pid"])} for name, entry in self.state["services"].items()}


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created 0600, never world-readable for a moment)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "add-node", "kill", "revive", "status"])
    parser.add_argument("name", nargs="?", help="kill: a service (ray-worker-1, mlflow...); revive: mlflow")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state, logs, stores (default {DEFAULT_DIR})")
    parser.add_argument("--workers", type=int, default=2, help="start: worker nodes (default 2)")
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir)
    if args.command != "start" and not cluster.state:
        raise SystemExit(f"no cluster in {args.dir.resolve()} (infra/local/start --dir {args.dir})")
    if args.command in ("kill", "revive") and not args.name:
        parser.error(f"{args.command} needs a service name")
    if args.command == "start":
        cluster.start(args.workers)
        print(f"cluster up; load its environment with:  set -a; . {cluster.root / 'env'}; set +a")
    elif args.command == "stop":
        cluster.stop()
    elif args.command == "add-node":
        print(cluster.add_node())
    elif args.command == "kill":
        cluster.kill(args.name)
    elif args.command == "revive":
        cluster.revive(args.name)
    else:
        print(json.dumps(cluster.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
