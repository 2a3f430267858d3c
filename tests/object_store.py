"""A real S3 server for tests: ``infra/local/s3_server.py`` (moto, real access keys) as a subprocess.

``tests/conftest.py`` registers this module as a plugin, so every test can ask for its fixtures::

    def test_something(s3_env):           # the server's env is set for this test
        url = s3_env.fresh_url("shards")  # s3://<bucket>/<unique prefix>/shards

- ``object_store`` (session): one server for the whole session; an ``S3Server`` (endpoint, bucket,
  access_key, secret_key, env, pid, url()).
- ``s3_env`` (function): sets the server's client variables for the test (and points ``AWS_PROFILE``,
  ``~/.aws/config`` and ``~/.aws/credentials`` away, so a developer's own AWS setup cannot interfere, and
  the shard cache into the test's folder); returns the same ``S3Server``. ``point_clients_at`` does the
  same for a module-scoped fixture's ``MonkeyPatch.context()``.

``S3Server(root).start()`` / ``.stop()`` work without pytest too. The server runs in its own session and is
stopped by its PID (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO / "infra" / "local" / "s3_server.py"
STARTUP_TIMEOUT_S = 60.0
ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
# Variables that would make a client pick other credentials or another endpoint than the server's.
FOREIGN_KEYS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN", "AWS_REGION")


class S3Server:
    """``infra/local/s3_server.py`` on 127.0.0.1 and a free port, its env file and log under ``root``."""

    def __init__(self, root: Path, bucket: str = "ssd", port: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.port = port
        self.env_file = self.root / "s3.env"
        self.log_path = self.root / "s3_server.log"
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    @property
    def access_key(self) -> str:
        return self.env["AWS_ACCESS_KEY_ID"]

    @property
    def secret_key(self) -> str:
        return self.env["AWS_SECRET_ACCESS_KEY"]

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def fresh_url(self, *parts: str) -> str:
        """A URL under a new random prefix, so tests sharing the server never see each other's objects."""
        return self.url(uuid.uuid4().hex[:12], *parts)

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> S3Server:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"s3 server already running (pid {self.pid})")
        self.env_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(SERVER_SCRIPT), "--port", str(self.port), "--bucket", self.bucket]
        cmd += ["--env-file", str(self.env_file)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"s3 server exited with {self.process.returncode}; see {self.log_path}")
            if self.env_file.exists():  # written once the socket listens (atomically)
                self.env = dict(
                    line.split("=", 1) for line in self.env_file.read_text(encoding="utf-8").splitlines() if line
                )
                self.port = int(self.endpoint.rsplit(":", 1)[1])
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"s3 server did not start within {timeout_s} s; see {self.log_path}")

    def client(self, **overrides: str):
        """A boto3 S3 client signed with the server's key (``overrides`` replace its arguments)."""
        import boto3

        kwargs = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.env["AWS_DEFAULT_REGION"],
            **overrides,
        }
        return boto3.client("s3", **kwargs)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group (its leader is the PID started here), SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("object_store")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(object_store: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The server's client variables for one test, with any other AWS configuration pointed away."""
    return point_clients_at(object_store, monkeypatch, tmp_path)


def point_clients_at(server: S3Server, mp: pytest.MonkeyPatch, home: Path) -> S3Server:
    """Set ``server``'s client variables in ``mp``, point ``AWS_PROFILE``, ``~/.aws/config`` and
    ``~/.aws/credentials`` away (to absent files under ``home``) and the shard cache into ``home``. For a
    module-scoped fixture, ``mp`` is a ``pytest.MonkeyPatch.context()``; returns ``server``."""
    for key in FOREIGN_KEYS:
        mp.delenv(key, raising=False)
    mp.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    for key in ENV_KEYS:
        mp.setenv(key, server.env[key])
    mp.setenv("SSD_SHARD_CACHE", str(home / "shard-cache"))  # pipeline.shards.cache, not ~/.cache
    return server
