"""Join a Ray cluster or start a private one: what ``train`` and ``predict --ray`` do before any Ray work.

In order: a Ray already initialised in this process is used as it is; else the cluster at ``address`` (an
option such as ``predict --ray-address``) or at ``RAY_ADDRESS`` (as inside ``ray job submit``) is joined;
else a new local instance is started (asked for 127.0.0.1; Ray 2.60 advertises the machine's reachable address
instead) with at least the CPUs the caller's workers ask for, so its work can always be scheduled (more than
the machine has only oversubscribes it). Without an address Ray is started with ``address="local"``: a *new*
instance, never a ``ray start`` cluster that happens to run on this machine.

Imports only Ray core, so that a command that needs no Ray Train (``predict --ray``) starts quickly.

Joining a cluster by address is what a ``ray job submit`` driver does, and that driver runs inside the job's
``working_dir`` copy on the head node. When the driver connects, the head's runtime-env agent may set the
job's environment up again, and Ray 2.60 does that by deleting the copy and unpacking it anew
(``WorkingDirPlugin.create`` calls ``download_and_unpack_package(..., overwrite=True)``): the cwd is gone and,
until the unpacking ends, so is every module file. So before joining, every module of the ``pipeline``
package is imported (``import_package``): nothing the driver does later needs the copy's files.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil

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
        import_package("pipeline")  # the working_dir copy may vanish for a while once joined (module docstring)
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


def import_package(name: str) -> list[str]:
    """Import every module of package ``name`` (but ``__main__``, which runs a command); returns their names."""
    package = importlib.import_module(name)
    names = [
        info.name
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}.")
        if not info.name.endswith(".__main__")
    ]
    for module in names:
        importlib.import_module(module)
    return names
