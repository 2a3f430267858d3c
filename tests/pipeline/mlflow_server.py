"""A real ``mlflow server`` for tests: 127.0.0.1, a free port, a SQLite store in a temp folder, stopped by PID.

The server runs in its own session (process group), because ``mlflow server`` starts a web-server child;
``stop()`` signals exactly that group — the one this helper started — never anything found by name.
``start()`` after ``stop()`` brings the same server back on the same port and store (an outage, not a reset).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` bound to 127.0.0.1:<port> with its store and artifacts under ``root``."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{(self.root / 'server.db').resolve()}"
        self.artifact_root = str((self.root / "artifacts").resolve())  # served through the server (proxied)
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> MlflowServer:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"mlflow server already running (pid {self.process.pid})")
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow_cli),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_uri,
            # artifacts go through the server (mlflow-artifacts:/), as with a team server, so an outage
            # affects artifact uploads too
            "--default-artifact-root",
            "mlflow-artifacts:/",
            "--artifacts-destination",
            self.artifact_root,
        ]
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job consumers: a lean test server
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout_s} s; see {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group (this helper's own PID is its leader), SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        pgid = process.pid  # start_new_session=True: the group id is the PID we started
        os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
        # the web-server child may outlive the leader for a moment: wait until the port is free
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.healthy():
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)  # anything of that group still alive
        except ProcessLookupError:
            pass
