"""``import_package``: every module imported up front, so that a driver outlives its working_dir copy.
``connect_ray``: a new local Ray with the CPUs asked for, and a Ray already here used as it is.

(Ray 2.60 replaces the ``_node_ip_address="127.0.0.1"`` it is given by the machine's reachable address, so
the node's address is not checked here.)

Joining a cluster at ``RAY_ADDRESS`` is exercised by ``tests/cluster`` (``train`` inside ``ray job submit``).
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import ray

from pipeline.training.ray_runtime import connect_ray, import_package


def test_every_module_is_imported_so_the_folder_may_go(tmp_path, monkeypatch):
    """What a ``ray job submit`` driver meets when Ray unpacks its working_dir again: the package's files gone."""
    root = tmp_path / "copy"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "__main__.py").write_text("raise SystemExit('__main__ runs a command: never imported')\n")
    (root / "pkg" / "late.py").write_text("VALUE = 7\n")
    (root / "pkg" / "sub" / "__init__.py").write_text("")
    (root / "pkg" / "sub" / "deep.py").write_text("from pkg.late import VALUE\nDOUBLE = 2 * VALUE\n")
    monkeypatch.syspath_prepend(str(root))
    try:
        assert sorted(import_package("pkg")) == ["pkg.late", "pkg.sub", "pkg.sub.deep"]
        shutil.rmtree(root)
        from pkg.sub.deep import DOUBLE  # noqa: PLC0415 - imported after the folder went: from sys.modules

        assert DOUBLE == 14 and "pkg.__main__" not in sys.modules
    finally:
        for name in [m for m in sys.modules if m == "pkg" or m.startswith("pkg.")]:
            del sys.modules[name]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_new_local_instance_then_the_same_one_reused(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a private instance on 127.0.0.1; no ~/.ray/auth_token
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized(), "another test left Ray running in this process"
    wanted = (os.cpu_count() or 1) + 1  # more than the machine has: the workers must still fit
    try:
        assert connect_ray(cpus_needed=wanted, dashboard=False, purpose="test") is True
        assert ray.cluster_resources()["CPU"] == wanted
        assert len(ray.nodes()) == 1  # a new instance of its own, no other node
        session = ray.get_runtime_context().gcs_address
        # Already initialised: used as it is; neither the address given nor RAY_ADDRESS is dialled.
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
        assert connect_ray(cpus_needed=1, address="127.0.0.1:2") is False
        assert ray.get_runtime_context().gcs_address == session
    finally:
        ray.shutdown()
