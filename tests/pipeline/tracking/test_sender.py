"""pipeline.tracking.sender.Sender against a store made of plain callables: order, batching, retries, bounds."""

from __future__ import annotations

import logging
import queue
import threading
import time

import pytest

from pipeline.tracking.sender import Sender

FAST = {"linger_s": 0.01, "backoff_first_s": 0.01, "backoff_max_s": 0.02}


def make_sender(send, **kwargs) -> Sender:
    options = {"store": "sqlite:///s.db", "name": "tracker for run r", **FAST, **kwargs}
    return Sender(send, is_transient=lambda error: isinstance(error, OSError), **options)


def test_metric_puts_merge_up_to_the_request_limit_in_order_and_calls_run_alone():
    events: list[tuple[str, object]] = []
    gate = threading.Event()
    sender = make_sender(lambda batch: events.append(("metrics", list(batch))), max_metrics=5)
    sender.put_call("hold", lambda: (gate.wait(5), events.append(("call", "hold"))))  # the queue fills meanwhile
    sender.put_metrics([1, 2], "2 metrics")
    sender.put_metrics([3, 4], "2 metrics")
    sender.put_metrics([5, 6], "2 metrics")  # 4 + 2 > 5: starts the next request
    sender.put_call("c", lambda: events.append(("call", "c")))
    sender.put_metrics(list(range(7, 19)), "12 metrics")  # alone larger than a request: split 5 + 5 + 2
    sender.put_metrics([19], "1 metric")  # joins the last 2
    assert sender.pending
    gate.set()
    assert sender.flush(5.0) and not sender.pending
    assert events == [
        ("call", "hold"),
        ("metrics", [1, 2, 3, 4]),
        ("metrics", [5, 6]),
        ("call", "c"),
        ("metrics", [7, 8, 9, 10, 11]),
        ("metrics", [12, 13, 14, 15, 16]),
        ("metrics", [17, 18, 19]),
    ]
    assert sender.close(1.0)


def test_a_put_returns_at_once_while_the_store_hangs():
    stored: list[int] = []
    gate = threading.Event()

    def send(batch):
        gate.wait(5)
        stored.extend(batch)

    sender = make_sender(send)
    worst = 0.0
    for step in range(200):
        started = time.monotonic()
        sender.put_metrics([step], "1 metric")
        worst = max(worst, time.monotonic() - started)
    assert worst < 1.0, f"a put blocked for {worst:.3f} s"  # the store holds each request for up to 5 s
    gate.set()
    assert sender.close(5.0)
    assert stored == list(range(200))  # all of them, once each, in order


def test_transient_failures_are_retried_until_stored_and_rejected_requests_dropped(caplog):
    attempts: list[list[int]] = []
    stored: list[list[int]] = []
    cleaned = threading.Event()

    def send(batch):
        attempts.append(list(batch))
        if len(attempts) <= 3:
            raise OSError("connection refused by http://u:pw@h:5000")
        stored.append(list(batch))

    def bad():
        raise ValueError("INVALID_PARAMETER_VALUE")

    sender = make_sender(send)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.sender"):
        sender.put_metrics([1], "1 metric")
        sender.put_call("bad call", bad, cleanup=cleaned.set)
        sender.put_metrics([2], "1 metric")
        assert sender.flush(5.0)
    assert attempts == [[1], [1], [1], [1], [2]] and stored == [[1], [2]]  # [1] stored once, after 3 failures
    assert cleaned.is_set()  # a dropped request is cleaned up too
    text = caplog.text
    assert "unavailable (connection refused by http://***@h:5000)" in text and "pw" not in text
    assert "is back after" in text and "rejected bad call: INVALID_PARAMETER_VALUE" in text
    assert sender.close(1.0)


def test_flush_and_close_are_bounded_when_the_store_stays_down(caplog):
    def down(batch):
        raise OSError("down")

    cleaned = threading.Event()
    sender = make_sender(down)
    sender.put_metrics([1, 2, 3], "3 metrics")
    sender.put_call("artifact", lambda: down([]), cleanup=cleaned.set)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="pipeline.tracking.sender"):
        assert not sender.flush(0.3)
        assert time.monotonic() - started < 2.0
        assert "not stored after 0.3 s" in caplog.text
        assert not sender.close(0.2)  # gives up what is left
    assert "gave up on" in caplog.text and cleaned.is_set()
    assert time.monotonic() - started < 5.0
    with pytest.raises(RuntimeError, match="tracker for run r is closed"):
        sender.put_metrics([4], "1 metric")
    assert sender.close(1.0)  # closing twice is fine


def test_pending_metrics_lists_the_queued_and_in_flight_metrics_not_the_sent_ones_nor_calls():
    entered: queue.Queue[list[int]] = queue.Queue()  # one entry per request the store has started on
    release = threading.Semaphore(0)  # the store finishes one request per release
    sent: list[list[int]] = []

    def blocking_store(batch):
        entered.put(list(batch))
        assert release.acquire(timeout=5)
        sent.append(list(batch))

    sender = make_sender(blocking_store)
    assert sender.pending_metrics() == []
    sender.put_metrics([1, 2], "2 metrics")
    assert entered.get(timeout=5) == [1, 2]  # in flight, not stored yet
    sender.put_metrics([3], "1 metric")
    sender.put_call("params", lambda: None)  # a call is not a metric: never listed
    sender.put_metrics([4, 5], "2 metrics")
    assert sender.pending_metrics() == [1, 2, 3, 4, 5]
    assert sender.pending_metrics(limit=2) == [4, 5]  # bounded: the newest kept
    release.release()
    assert entered.get(timeout=5) == [3]  # [1, 2] stored; [3] in flight (the call follows it)
    assert sent == [[1, 2]] and sender.pending_metrics() == [3, 4, 5]
    release.release()
    assert entered.get(timeout=5) == [4, 5]
    assert sender.pending_metrics() == [4, 5]
    release.release()
    assert sender.flush(5.0) and sent == [[1, 2], [3], [4, 5]]
    assert sender.pending_metrics() == []
    sender.close(1.0)
