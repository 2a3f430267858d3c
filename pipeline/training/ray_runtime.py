"""Join a Ray cluster or start a private one: what ``train`` and ``predict --ray`` do before any Ray work.

In order: a Ray already initialised in this process is used as it is; else the cluster at ``address`` (an
option such as ``predict --ray-address``) or at ``RAY_ADDRESS`` (as inside ``ray job submit``) is joined;
else a new local instance is started (asked for 127.0.0.1; Ray 2.60 advertises the machine's reachable address
instead) with at least the CPUs the caller's workers ask for, so its work can always be scheduled (more than
the machine has only oversubscribes it). Without an address Ray is started with ``address="local"``: a *new*
instance, never a ``ray start`` cluster that happens to run on this machine.

Imports only Ray core, so that a command that needs no Ray Train (``predict --ray``) starts quickly.
"""

from __future__ import annotations

import logging
import os

import ray

from pipeline.tracking.uris import redact_uri

logger = logging.getLogger(__name__)


def connect_ray(*, cpus_needed: int, address: str | None = None, dashboard: bool = True, purpose: str = "ray") -> bool:
    """Attach this process to Ray (module docstring); True when this call connected (the caller then calls
    ``ray.shutdown()`` when done), False when Ray was already initialised here.

    ``cpus_needed``: the CPUs the caller's workers reserve together; a local instance gets at least that many.
    ``dashboard``: start the dashboard with a local instance (Ray Train V2's placement-group cleaner polls
    its State API; Ray Data needs none). ``purpose`` names the command in log lines.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("%s: joining the Ray cluster at %s", purpose, redact_uri(address))
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    cores = os.cpu_count() or 1
    logger.info("%s: starting a local Ray instance (%d CPUs) on 127.0.0.1", purpose, max(cores, cpus_needed))
    ray.init(
        address="local",  # a new instance: never join a `ray start` cluster that happens to run on this machine
        num_cpus=max(cores, cpus_needed),
        include_dashboard=dashboard,
        **({"dashboard_host": "127.0.0.1"} if dashboard else {}),
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
    )
    return True
