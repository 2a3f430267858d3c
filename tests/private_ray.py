"""A private local Ray for a test module: 127.0.0.1, token authentication off, its own short temp folder.

Every module that starts Ray in-process uses it, inside a ``pytest.MonkeyPatch.context()`` whose other
variables (the S3 server's, for instance) Ray's processes then inherit::

    @pytest.fixture(scope="module")
    def ray_local():
        with pytest.MonkeyPatch.context() as mp, private_ray(mp, "rt", num_cpus=2) as ray_session:
            yield ray_session

``ray.shutdown()`` stops what ``ray.init`` started (by the processes it owns, never by name) and the temp
folder is removed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from tests.pipeline.mlflow_server import free_port

START_ATTEMPTS = 3


@dataclass(frozen=True)
class RaySession:
    """The started instance: its session folder (``temp``) and GCS address (``address``, for ``RAY_ADDRESS``)."""

    temp: Path
    address: str


@contextlib.contextmanager
def private_ray(mp: pytest.MonkeyPatch, prefix: str, *, num_cpus: int, dashboard: bool = True) -> Iterator[RaySession]:
    """``ray.init`` of a new local instance (``address="local"``: never another test's ``ray start`` cluster on
    this machine) with ``num_cpus`` CPUs, on 127.0.0.1, with a dashboard on a free port when ``dashboard``.
    ``RAY_AUTH_MODE=disabled`` (nothing written to ``~/.ray``) and no ``RAY_ADDRESS`` are set in ``mp``.

    A busy machine can miss Ray's fixed 30 s node start-up wait (a bare ``Exception``): that is retried
    (``START_ATTEMPTS`` in all), since it is never what a test is about."""
    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.delenv("RAY_ADDRESS", raising=False)
    dashboard_options = {"dashboard_host": "127.0.0.1", "dashboard_port": free_port()} if dashboard else {}
    try:
        for attempt in range(START_ATTEMPTS):
            try:
                context = ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=dashboard,
                    _node_ip_address="127.0.0.1",
                    _temp_dir=temp,
                    logging_level="WARNING",
                    **dashboard_options,
                )
                break
            except Exception:  # noqa: BLE001 - Ray raises a bare Exception when its node start-up times out
                ray.shutdown()
                if attempt == START_ATTEMPTS - 1:
                    raise
        yield RaySession(Path(temp), context.address_info["gcs_address"])
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
