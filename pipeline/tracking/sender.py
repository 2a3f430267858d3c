"""The background sender: a queue of store requests that one daemon thread sends in order, so that logging
never stalls a training step, and that survives a store that is down for a while.

* **Never blocking.** ``put_metrics`` and ``put_call`` only append to the queue and return.
* **Batched.** Consecutive metric puts are merged into one request of at most ``max_metrics`` metrics
  (``MAX_METRICS_PER_REQUEST``, MLflow's ``log_batch`` limit); one put's metrics are split only if they alone
  exceed it. While the queue holds only a few metrics the thread lingers briefly for more.
* **Retried.** A request that fails for a transient reason (``is_transient``: server down, timeout,
  database locked) is retried with exponential backoff (0.5 s doubling to 5 s) until it is stored; one the
  store rejects for good is logged as an error and dropped. The caller makes requests idempotent (MLflow
  ignores an identical metric sent twice), so a retry cannot create duplicates.
* **Bounded exit.** ``flush(timeout_s)`` waits until everything queued is stored; ``close(timeout_s)``
  flushes, then stops the thread (a request still failing at that point is given up).
* **Snapshot of what is unsent.** ``pending_metrics()`` lists the metric items queued or in flight (a
  request in flight may or may not get stored), oldest first, at most ``MAX_PENDING_METRICS`` (the newest).
  The training loop writes them into each checkpoint, so a job killed with metrics still queued re-sends
  them when it resumes from that checkpoint. Calls (params, tags, artifacts) are never listed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.tracking.uris import redact_uri

logger = logging.getLogger(__name__)

MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
_LINGER_S = 0.5  # the thread waits this long for more metrics before sending a small request
_LINGER_BELOW = 200  # metrics queued: below this, a request is "small" and the thread lingers
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 5.0
_JOIN_S = 1.0  # close() waits this long for the thread to end
_MESSAGE_CHARS = 300  # an error quoted in a log line is cut to this
MAX_PENDING_METRICS = 10_000  # pending_metrics() lists at most this many (the newest): a checkpoint stays small


@dataclass
class _Op:
    """One queued unit of work. ``metrics`` ops are merged into batches; ``call`` ops run alone."""

    description: str
    metrics: list[Any] = field(default_factory=list)
    call: Callable[[], None] | None = None
    cleanup: Callable[[], None] | None = None


class Sender:
    """Sends queued requests to one store, in order, from a daemon thread that starts at construction.

    Args:
        send_metrics: sends one batch of metrics (a list of at most ``max_metrics`` items, opaque here),
            e.g. ``lambda batch: client.log_batch(run_id, metrics=batch)``; raises on failure.
        is_transient: whether an exception raised by a request means "try again" (else it is dropped).
        store: the store's URI (without credentials), named in log lines.
        name: what sends through this sender, named in the error of a put after ``close``.
        max_metrics: most metrics in one request.
        linger_s, backoff_first_s, backoff_max_s: timing (see the module docstring); tests shorten them.
    """

    def __init__(
        self,
        send_metrics: Callable[[list[Any]], None],
        *,
        is_transient: Callable[[Exception], bool],
        store: str,
        name: str,
        max_metrics: int = MAX_METRICS_PER_REQUEST,
        linger_s: float = _LINGER_S,
        backoff_first_s: float = _BACKOFF_FIRST_S,
        backoff_max_s: float = _BACKOFF_MAX_S,
    ):
        self._send_metrics = send_metrics
        self._is_transient = is_transient
        self.store = store
        self.name = name
        self._max_metrics = max_metrics
        self._linger_s = linger_s
        self._backoff = (backoff_first_s, backoff_max_s)
        self._ops: collections.deque[_Op] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False  # the thread is sending an op that is no longer in _ops
        self._in_flight: list[Any] = []  # the metrics of the request being sent (empty for a call)
        self._closed = False
        self._flushing = 0  # flush() calls waiting: the thread does not linger for them
        self._stop = threading.Event()  # set by close(): a retry in progress gives up
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the caller's side
    def put_metrics(self, metrics: list[Any], description: str) -> None:
        """Queue ``metrics`` (merged with neighbouring metric puts into one request). Returns at once."""
        self._put(_Op(description, metrics=list(metrics)))

    def put_call(self, description: str, call: Callable[[], None], cleanup: Callable[[], None] | None = None) -> None:
        """Queue ``call`` (one request, run alone, retried while transient); ``cleanup`` runs after it, whether
        it was stored or dropped. Returns at once."""
        self._put(_Op(description, call=call, cleanup=cleanup))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> bool:
        """Whether anything is queued or being sent."""
        return bool(self._ops) or self._busy

    def pending_metrics(self, limit: int = MAX_PENDING_METRICS) -> list[Any]:
        """The metric items not yet known to be stored: the request in flight, then the queued ones, in send
        order; at most ``limit`` (the newest; a warning says how many older ones are left out)."""
        with self._cond:
            items = list(self._in_flight)
            for op in self._ops:
                items.extend(op.metrics)
        if len(items) > limit:
            logger.warning(
                "MLflow store %s: %d metrics unsent; only the newest %d are kept for a resume",
                self.store,
                len(items),
                limit,
            )
            items = items[len(items) - limit :]
        return items

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued request is stored or dropped, at most ``timeout_s``. Returns False (and
        logs how many items are left) if the store did not take everything in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._ops or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        pending = sum(len(op.metrics) or 1 for op in self._ops) + int(self._busy)
                        logger.error(
                            "MLflow store %s: %d queued items (metrics, artifacts...) not stored after %g s",
                            self.store,
                            pending,
                            timeout_s,
                        )
                        return False
                    self._cond.wait(timeout=min(remaining, 0.5))
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout_s: float) -> bool:
        """Flush (at most ``timeout_s``), then stop the thread; later puts raise ``RuntimeError``. Returns
        whether everything was stored. Closing twice returns True."""
        if self._closed:
            return True
        stored = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(timeout=_JOIN_S)
        return stored

    def _put(self, op: _Op) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self._ops.append(op)
            self._cond.notify_all()

    # ---------------------------------------------------------------- the thread's side
    def _take(self) -> _Op | None:
        """Pop the next unit (cond held): one call op, or leading metric ops merged up to the request limit."""
        if not self._ops:
            return None
        if self._ops[0].call is not None:
            return self._ops.popleft()
        first = self._ops.popleft()
        merged = list(first.metrics)
        limit = self._max_metrics
        while self._ops and self._ops[0].call is None and len(merged) + len(self._ops[0].metrics) <= limit:
            merged.extend(self._ops.popleft().metrics)
        if len(merged) > limit:  # one put larger than a request: split it, keep the rest queued
            rest = merged[limit:]
            merged = merged[:limit]
            self._ops.appendleft(_Op(f"{len(rest)} metrics", metrics=rest))
        return _Op(f"{len(merged)} metrics", metrics=merged)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if not self._ops and self._closed:
                    return
                queued = sum(len(op.metrics) for op in self._ops)
                small = all(op.call is None for op in self._ops) and queued < _LINGER_BELOW
                if small and not self._flushing and not self._closed:
                    self._cond.wait(timeout=self._linger_s)  # let a few steps accumulate into one request
                op = self._take()
                if op is None:
                    continue
                self._busy = True
                self._in_flight = op.metrics
            try:
                self._send_with_retry(op)
            finally:
                with self._cond:
                    self._busy = False
                    self._in_flight = []
                    self._cond.notify_all()

    def _send_with_retry(self, op: _Op) -> None:
        delay, failures, started = self._backoff[0], 0, time.monotonic()
        while True:
            try:
                if op.call is not None:
                    op.call()
                else:
                    self._send_metrics(op.metrics)
            except Exception as error:  # classified below: transient -> retry, permanent -> report and drop
                if not self._is_transient(error):
                    logger.error("MLflow store %s rejected %s: %s", self.store, op.description, _short_error(error))
                    break
                failures += 1
                if failures == 1:
                    logger.warning(
                        "MLflow store %s unavailable (%s); buffering and retrying", self.store, _short_error(error)
                    )
                if self._stop.wait(delay):
                    logger.error("MLflow store %s: gave up on %s at close", self.store, op.description)
                    break
                delay = min(delay * 2, self._backoff[1])
                continue
            if failures:
                logger.warning(
                    "MLflow store %s is back after %.1f s; sending the buffered items",
                    self.store,
                    time.monotonic() - started,
                )
            break
        if op.cleanup is not None:
            op.cleanup()


def _short_error(error: Exception) -> str:
    """The first line of ``error``, at most 300 characters, URIs redacted: for log lines and messages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return redact_uri(text)[:_MESSAGE_CHARS]
