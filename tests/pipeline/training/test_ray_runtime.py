"""``connect_ray``: a new local Ray with the CPUs asked for, and a Ray already here used as it is.

(Ray 2.60 replaces the ``_node_ip_address="127.0.0.1"`` it is given by the machine's reachable address, so
the node's address is not checked here.)

Joining a cluster at ``RAY_ADDRESS`` is exercised by ``tests/cluster`` (``train`` inside ``ray job submit``).
"""

from __future__ import annotations

import os

import pytest
import ray

from pipeline.training.ray_runtime import connect_ray

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(180)]


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
