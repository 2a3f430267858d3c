"""An exclusive lease on a run folder: one training job at a time writes ``<storage>/<run_name>-<digest>``.

Two identical commands (two ``dvc queue`` workers, two teammates) land in the same run folder; without a
lease one prunes a checkpoint the other is about to read, or resumes from the other's half-written state.

The lease is one small JSON document beside the run folder, ``<run folder>.lease`` (beside, not inside:
``train.resume=false`` moves the folder aside, and the lease must stay put). It names its holder::

    {"owner": "ana@gpu-3", "pid": 4242, "job_id": "9f1c...", "acquired_at": 1.7e9, "heartbeat_at": 1.7e9,
     "token": "<unique per write>"}

- **Taking it** is a conditional write (``lease_store``): create-if-absent, so of two jobs starting at once
  exactly one wins; the other is refused at once with who holds it and since when, or waits (``wait_s``).
- **Holding it**: a daemon thread rewrites the heartbeat every ``heartbeat_s``, conditional on the version it
  wrote last. If that fails because the document changed, another job took the lease over (this one was
  presumed dead): the holder is told (``on_lost``, by default a ``KeyboardInterrupt`` raised in the main thread)
  and stops at once rather than write into a folder that is no longer its own.
- **Giving it back**: at exit, also on an error or Ctrl-C, the document is deleted, conditional on still being
  this job's. A killed job cannot give it back: its lease goes stale.
- **Stale**: a heartbeat older than ``stale_after_s`` (default ``STALE_AFTER_S``). The next job takes it over
  with a conditional replace of the exact version it judged stale, so of two takers exactly one wins, and
  says so in the log. Staleness compares the holder's clock with the taker's: hosts must agree on the time
  to well within ``stale_after_s`` (NTP does).
"""

from __future__ import annotations

import ctypes
import dataclasses
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.tracking import redact_uri
from pipeline.training.lease_store import ConditionalStore, VersionConflict, open_store

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # one small conditional write every 10 s: nothing next to a training step's cost
# Three missed renewals in a row: one slow write or a pause of the driver is survived; a job killed outright
# is taken over about half a minute later.
STALE_MISSED_BEATS = 3
STALE_AFTER_S = STALE_MISSED_BEATS * HEARTBEAT_S
LEASE_SUFFIX = ".lease"
_CONFLICT_RETRIES = 5  # a conflict means the document just changed: read it again, a few times at most


class LeaseHeld(RuntimeError):
    """Another live job holds the lease; ``holder`` says who (None: its document is being replaced)."""

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This job's lease was taken over (its heartbeat went stale) or removed while it ran."""


@dataclass(frozen=True)
class Holder:
    owner: str  # user@host
    pid: int
    job_id: str
    acquired_at: float  # Unix time
    heartbeat_at: float  # Unix time of the last renewal
    token: str  # unique per write: a document's version never comes back

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder in ``data``, or None for a document that is not one (then it counts as stale)."""
        try:
            fields = json.loads(data)
            return cls(
                owner=str(fields["owner"]),
                pid=int(fields["pid"]),
                job_id=str(fields["job_id"]),
                acquired_at=float(fields["acquired_at"]),
                heartbeat_at=float(fields["heartbeat_at"]),
                token=str(fields["token"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def describe(self, now: float) -> str:
        return (
            f"job {self.job_id} ({self.owner}, pid {self.pid}) since {_utc(self.acquired_at)}, "
            f"last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago"
        )


def lease_uri(run_uri: str) -> str:
    """Where the lease of ``run_uri`` lives: beside the folder, so moving the folder aside keeps it."""
    return run_uri.rstrip("/") + LEASE_SUFFIX


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _interrupt_main(error: LeaseLost) -> None:
    """Raise ``KeyboardInterrupt`` in the main thread at its next bytecode, past any signal handler: a
    SIGINT would reach the driver's stop-with-a-checkpoint handler, which writes into the lost folder once more."""
    del error  # logged by the heartbeat
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(threading.main_thread().ident), ctypes.py_object(KeyboardInterrupt)
    )


class RunLease:
    """The lease on one run folder; ``acquire`` it, then use it as a context manager to hold and release it.

    ``clock`` gives Unix time (tests move it); ``on_lost`` is called from the heartbeat thread once the lease
    has been taken over.
    """

    def __init__(
        self,
        run_uri: str,
        *,
        job_id: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float | None = None,
        on_lost: Callable[[LeaseLost], None] = _interrupt_main,
        clock: Callable[[], float] = time.time,
        store: ConditionalStore | None = None,
    ) -> None:
        self.run_uri = run_uri
        self.shown = redact_uri(run_uri)
        self.job_id = job_id or uuid.uuid4().hex[:12]
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = STALE_MISSED_BEATS * heartbeat_s if stale_after_s is None else stale_after_s
        if not 0 < heartbeat_s < self.stale_after_s:
            raise ValueError(f"lease: need 0 < heartbeat_s < stale_after_s, got {heartbeat_s} and {stale_after_s}")
        self.on_lost = on_lost
        self.clock = clock
        self.store = store or open_store(lease_uri(run_uri))
        self.owner = f"{getpass.getuser()}@{socket.gethostname()}"
        self.lost: LeaseLost | None = None
        self._version: str | None = None  # set while held
        self._acquired_at = 0.0
        self._lock = threading.Lock()  # renew and release never overlap
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._version is not None

    # ------------------------------------------------------------------------------------------ taking
    def _document(self) -> bytes:
        now = self.clock()
        holder = Holder(self.owner, os.getpid(), self.job_id, self._acquired_at or now, now, uuid.uuid4().hex)
        return holder.to_bytes()

    def try_acquire(self) -> Holder | None:
        """One attempt: None when this job now holds the lease, else the live holder that keeps it."""
        holder = None
        for _ in range(_CONFLICT_RETRIES):
            stored = self.store.read()
            self._acquired_at = self.clock()
            try:
                if stored is None:
                    self._version = self.store.create(self._document())
                    return None
                holder = Holder.from_bytes(stored.data)
                age = self.clock() - holder.heartbeat_at if holder else float("inf")
                if age <= self.stale_after_s:
                    return holder
                self._version = self.store.replace(self._document(), stored.version)
            except VersionConflict:
                continue  # it changed between our read and write: another job got there first, look again
            logger.warning(
                "lease: took over %s from %s: its heartbeat is older than %.0f s, so that job is presumed dead",
                self.shown,
                holder.describe(self.clock()) if holder else "an unreadable lease document",
                self.stale_after_s,
            )
            return None
        return holder

    def acquire(self, wait_s: float = 0.0) -> RunLease:
        """Take the lease, waiting up to ``wait_s`` seconds for a live holder (0: refuse at once).

        Raises:
            LeaseHeld: another live job holds it (after ``wait_s``); the message names it.
        """
        started = time.monotonic()
        while True:
            holder = self.try_acquire()
            if holder is None and self.held:
                break
            waited = time.monotonic() - started
            now = self.clock()
            who = holder.describe(now) if holder else "another job (its lease is changing hands)"
            if waited >= wait_s:
                raise LeaseHeld(self._refusal(who, waited if wait_s else None), holder)
            logger.info("lease: waiting for %s, held by %s (waited %.0f of %.0f s)", self.shown, who, waited, wait_s)
            time.sleep(max(0.05, min(self.heartbeat_s, wait_s - waited)))
        logger.info("lease: job %s holds %s (heartbeat every %.0f s)", self.job_id, self.shown, self.heartbeat_s)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.job_id}", daemon=True)
        self._beat.start()
        return self

    def _refusal(self, who: str, waited: float | None) -> str:
        still = f" still, after waiting {waited:.0f} s" if waited is not None else ""
        return (
            f"run folder {self.shown} is in use{still} by {who}. One job at a time trains in a run folder: wait for "
            f"it (train --wait), or give this run another train.run_name. A job that died leaves its lease behind; "
            f"it is taken over once its heartbeat is {self.stale_after_s:.0f} s old (lease: {lease_uri(self.shown)})"
        )

    # ----------------------------------------------------------------------------------------- holding
    def renew(self) -> None:
        """Rewrite the heartbeat, conditional on our last write. Raises ``LeaseLost`` when it was taken over."""
        with self._lock:
            if self._version is None:
                raise LeaseLost(f"lease on {self.shown} is not held")
            try:
                self._version = self.store.replace(self._document(), self._version)
            except VersionConflict as error:
                self._version = None
                stored = self.store.read()
                taker = Holder.from_bytes(stored.data) if stored else None
                by = f"by {taker.describe(self.clock())}" if taker else "(its document was removed)"
                raise LeaseLost(f"the lease on {self.shown} was taken over {by}; this job stops") from error

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLost as error:
                logger.error("lease: %s", error)
                self.lost = error
                self.on_lost(error)
                return
            except OSError as error:  # the store is unreachable for now: the next beat tries again
                logger.warning(
                    "lease: could not renew %s (%s); retrying in %.0f s", self.shown, error, self.heartbeat_s
                )

    # ------------------------------------------------------------------------------------------ giving
    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this job's; safe to call twice."""
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()
        with self._lock:
            version, self._version = self._version, None
            if version is None:
                return
            try:
                self.store.delete(version)
            except VersionConflict:
                logger.warning(
                    "lease: %s was taken over before this job released it; left to its new holder", self.shown
                )
            except OSError as error:
                logger.warning(
                    "lease: could not release %s (%s); it goes stale in %.0f s", self.shown, error, self.stale_after_s
                )
            else:
                logger.info("lease: job %s released %s", self.job_id, self.shown)

    def __enter__(self) -> RunLease:
        if not self.held:
            raise RuntimeError("RunLease: acquire() before entering the context")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
