"""Stopping at a step boundary with a checkpoint: on SIGTERM / SIGINT, and on Ray's preemption notice.

A signal reaches the driver (``python -m pipeline train``; Ctrl-C during ``dvc repro``, ``kill``, a
scheduler's SIGTERM). ``fit_until_signalled`` runs ``TorchTrainer.fit()`` on a helper thread so that the
main thread owns the handlers (Ray Train installs its own SIGINT handler, which aborts the workers, only
when ``fit()`` runs on the main thread). The first SIGTERM or SIGINT sets ``StopRequests``, a small Ray
actor whose handle every worker holds; the handlers are then put back, so a second signal stops the
driver the usual, abrupt way.

The workers (``StopWatch``): a daemon thread on every rank waits for the request, and each step every rank
adds its "stop" flag to one all-reduce (``agree``), the same collective pattern as the non-finite guard:
all ranks stop after the same step, rank 0 writes the checkpoint of that step, and the driver exits with
128 + the signal number. Re-running the command resumes from that step.

Ray's preemption notice (a node being drained, e.g. a spot instance reclaimed; ``ray.train.get_preemption_info``)
asks for a checkpoint at the next step boundary but not for a stop: training goes on, and when the node
goes away Ray Train restarts the worker group from that checkpoint, on fewer workers if need be. The notice
is read every ``PREEMPTION_CHECK_EVERY`` steps: the call is a barrier through Ray (rank 0's view is
broadcast), which every rank must make at the same steps.

The agreement all-reduce runs on the CPU (gloo): on the default process group when that is gloo, otherwise
on a gloo group made for it, so a GPU step never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import ray
import ray.exceptions
import ray.train
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PREEMPTION_CHECK_EVERY = 10  # steps between reads of Ray's preemption notice (a barrier through Ray)
_JOIN_POLL_S = 0.2  # how often the driver's main thread wakes to run signal handlers
T = TypeVar("T")


class StopRequests:
    """Ray actor (async): the driver's stop request, which every worker waits for."""

    def __init__(self) -> None:
        self._reason: str | None = None
        self._event = asyncio.Event()

    async def request(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
            self._event.set()

    async def wait(self) -> str:
        """Returns the reason once a stop was requested."""
        await self._event.wait()
        assert self._reason is not None
        return self._reason


def start_stop_requests() -> Any:
    """A ``StopRequests`` actor for one driver invocation (no CPU reserved; the driver kills it at the end), on
    the driver's own node. Ray places an actor that asks for no resources on any node (9 of 12 on the worker
    nodes of the loopback cluster): there it died with its node, and a later SIGTERM reached no rank."""
    on_the_drivers_node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_concurrency=1000)(StopRequests)
    return actor.options(scheduling_strategy=on_the_drivers_node).remote()


class Signalled(NamedTuple):
    """What ``fit_until_signalled`` returns: ``fit``'s result and the signal that asked for a stop, if one did."""

    result: Any
    signum: int | None


def fit_until_signalled(fit: Callable[[], T], requests: Any) -> Signalled:
    """Run ``fit()`` on a helper thread; the first SIGTERM / SIGINT meanwhile calls ``requests.request``.

    Signal handlers live on the main thread: called on another, it just runs ``fit()``. ``fit``'s exception,
    if any, is raised here.
    """
    if threading.current_thread() is not threading.main_thread():
        return Signalled(fit(), None)
    outcome: dict[str, Any] = {}
    received: list[int] = []

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread and re-raised there
            outcome["error"] = error

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def handler(signum: int, frame: Any) -> None:
        del frame
        received.append(signum)
        restore()  # a second signal acts as it would have without us
        name = signal.Signals(signum).name
        logger.warning("%s: stopping after the current step with a checkpoint (again to stop at once)", name)
        requests.request.remote(name)

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(_JOIN_POLL_S)
    finally:
        restore()
    if "error" in outcome:
        raise outcome["error"]
    return Signalled(outcome.get("result"), received[0] if received else None)


class Decision(NamedTuple):
    """What every rank does after a step, agreed by all."""

    stop: bool  # checkpoint this step and end the run (a signal reached the driver)
    checkpoint: bool  # checkpoint this step (Ray's preemption notice, or ``stop``)


class StopWatch:
    """One rank's view of the stop requests and preemption notices, and the collective that agrees on them."""

    def __init__(self, requests: Any | None) -> None:
        self._requested = threading.Event()
        self._notices_seen = 0  # preemption notices already answered with a checkpoint
        self._group = _control_group()
        if requests is not None:
            threading.Thread(target=self._wait, args=(requests,), name="stop-requests", daemon=True).start()

    def _wait(self, requests: Any) -> None:
        try:
            reason = ray.get(requests.wait.remote())
        except ray.exceptions.RayActorError:  # the driver is done with the actor: nothing will be requested
            return
        logger.warning("stop requested (%s): stopping after the current step", reason)
        self._requested.set()

    def decide(self, step: int) -> Decision:
        """After ``step`` completed steps: stop and/or checkpoint now? Every rank calls this after every step."""
        notice = step % PREEMPTION_CHECK_EVERY == 0 and self._new_preemption_notice()
        stop = _any_rank(self._requested.is_set(), self._group)
        return Decision(stop=stop, checkpoint=stop or notice)

    def _new_preemption_notice(self) -> bool:
        """True once per new notice from Ray (the same answer on every rank: it is rank 0's, broadcast)."""
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        seen = len(info.preempted_node_ids)
        if seen <= self._notices_seen:
            return False
        self._notices_seen = seen
        logger.warning("Ray preemption notice for ranks %s: checkpointing now", info.preempted_ranks)
        return True


def _control_group() -> Any:
    """The process group for the CPU flags: the default one when it is gloo, a new gloo group otherwise
    (every rank must make it, in the same order), or None without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def _any_rank(flag: bool, group: Any) -> bool:
    """True on every rank if ``flag`` is True on any (one all-reduce of a CPU scalar)."""
    if group is None:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return bool(value.item() > 0)
