"""The run-folder lease on local disk and on a real S3 server: refusal naming the holder, heartbeat, release,
waiting, stale takeover (exactly one of several takers wins) and a holder that learns it lost the lease."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time

import pytest

from pipeline.training.lease import STALE_AFTER_S, Holder, LeaseHeld, LeaseLost, RunLease, lease_uri
from pipeline.training.lease_store import open_store

BEAT_S = 1.0  # fast heartbeats keep these tests short (stale after 3 beats), yet slow enough for a busy machine


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "ssd-default-0badf00d")
    return request.getfixturevalue("s3_env").fresh_url("runs", "ssd-default-0badf00d")


def _document(run_uri: str) -> Holder | None:
    stored = open_store(lease_uri(run_uri)).read()
    return Holder.from_bytes(stored.data) if stored else None


def _lease(run_uri: str, job_id: str, **kwargs) -> RunLease:
    """A lease whose loss is only recorded: the default interrupts the main thread, here pytest's."""
    kwargs.setdefault("on_lost", lambda error: None)
    return RunLease(run_uri, job_id=job_id, heartbeat_s=kwargs.pop("heartbeat_s", BEAT_S), **kwargs)


def _die(lease: RunLease) -> None:
    """What a killed job leaves: its document, no heartbeat, no release."""
    lease._stop.set()
    lease._beat.join()


def test_defaults_survive_a_missed_beat_and_take_over_a_dead_job_within_a_minute():
    assert STALE_AFTER_S == 3 * RunLease("/tmp/x").heartbeat_s and STALE_AFTER_S <= 60


def test_a_second_job_is_refused_with_the_holder_named(run_uri):
    with _lease(run_uri, "job-one").acquire():
        held = _document(run_uri)
        assert held.job_id == "job-one" and "@" in held.owner and held.pid > 0
        started = time.monotonic()
        with pytest.raises(LeaseHeld) as refused:
            _lease(run_uri, "job-two").acquire()
        assert time.monotonic() - started < 5  # at once, not after a timeout
        message = str(refused.value)
        assert "job job-one" in message and held.owner in message and f"pid {held.pid}" in message
        assert "since " + time.strftime("%Y-%m-%dT", time.gmtime(held.acquired_at)) in message
        assert "--wait" in message and run_uri.split("://")[-1] in message
        assert refused.value.holder.job_id == "job-one"
    assert _document(run_uri) is None  # released at exit
    with _lease(run_uri, "job-two").acquire():  # and the next job gets it
        assert _document(run_uri).job_id == "job-two"


def test_released_on_an_error_too(run_uri):
    with pytest.raises(KeyboardInterrupt), _lease(run_uri, "job-one").acquire():
        raise KeyboardInterrupt
    assert _document(run_uri) is None


@pytest.mark.slow  # 6 s of real heartbeats
def test_the_heartbeat_keeps_a_live_holder_from_going_stale(run_uri):
    with _lease(run_uri, "job-one").acquire():
        first = _document(run_uri)
        time.sleep(6 * BEAT_S)  # twice the stale age: only renewals keep it fresh
        later = _document(run_uri)
        assert later.heartbeat_at > first.heartbeat_at and later.acquired_at == first.acquired_at
        with pytest.raises(LeaseHeld):
            _lease(run_uri, "job-two").acquire()
        assert _document(run_uri).job_id == "job-one"


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it(run_uri, caplog):
    lost: list[LeaseLost] = []
    first = _lease(run_uri, "job-one", on_lost=lost.append).acquire()
    _die(first)
    with pytest.raises(LeaseHeld):
        _lease(run_uri, "job-two").acquire()  # not stale yet
    stale_age_later = 3 * BEAT_S + 0.1  # job-two's clock has moved past the stale age
    with caplog.at_level(logging.WARNING, logger="pipeline.training.lease"):
        second = _lease(run_uri, "job-two", clock=lambda: time.time() + stale_age_later).acquire()
    assert "took over" in caplog.text and "job job-one" in caplog.text and "presumed dead" in caplog.text
    assert _document(run_uri).job_id == "job-two"
    with pytest.raises(LeaseLost, match="taken over by job job-two"):
        first.renew()  # the first job wakes up: its next heartbeat tells it
    first.release()  # and its release leaves the new holder's lease alone
    assert _document(run_uri).job_id == "job-two"
    second.release()
    assert _document(run_uri) is None


def test_the_heartbeat_thread_calls_on_lost(run_uri):
    """A holder paused longer than the stale age (its clock says so) is taken over while it runs."""
    lost = threading.Event()
    first = _lease(run_uri, "job-one", on_lost=lambda error: lost.set()).acquire()
    second = _lease(run_uri, "job-two", clock=lambda: time.time() + 10).acquire()  # sees job-one as stale
    assert lost.wait(10 * BEAT_S) and isinstance(first.lost, LeaseLost)
    assert not first.held and second.held
    first.release()
    second.release()


def test_an_unreadable_lease_document_counts_as_stale(run_uri, caplog):
    open_store(lease_uri(run_uri)).create(b"not json")
    with caplog.at_level(logging.WARNING, logger="pipeline.training.lease"):
        with _lease(run_uri, "job-one").acquire():
            assert _document(run_uri).job_id == "job-one"
    assert "unreadable lease document" in caplog.text


def test_wait_takes_the_lease_when_the_holder_releases(run_uri, caplog):
    holder = _lease(run_uri, "job-one").acquire()
    threading.Timer(1.0, holder.release).start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="pipeline.training.lease"):
        with _lease(run_uri, "job-two").acquire(wait_s=30):
            assert _document(run_uri).job_id == "job-two"
    assert 1.0 <= time.monotonic() - started < 10
    assert "waiting for" in caplog.text and "job job-one" in caplog.text  # never waits silently


def test_wait_is_bounded(run_uri):
    with _lease(run_uri, "job-one").acquire():
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match="still, after waiting"):
            _lease(run_uri, "job-two").acquire(wait_s=1.0)
        assert 1.0 <= time.monotonic() - started < 5


@pytest.mark.slow
def test_of_several_takers_of_a_stale_lease_exactly_one_wins(run_uri):
    """A dead holder's lease and six jobs that find it stale at the same instant: one takes it, five are
    refused naming the winner, and the document is the winner's."""
    _die(_lease(run_uri, "dead-job").acquire())
    takers = [_lease(run_uri, f"taker-{i}", clock=lambda: time.time() + 10) for i in range(6)]
    for taker in takers:
        taker.store.read()  # warm clients, so the race is the writes
    barrier = threading.Barrier(len(takers))

    def take(lease: RunLease) -> str | None:
        barrier.wait()
        try:
            lease.acquire()
        except LeaseHeld as refused:
            return refused.holder.job_id if refused.holder else "?"
        return None

    with concurrent.futures.ThreadPoolExecutor(len(takers)) as pool:
        outcomes = list(pool.map(take, takers))
    winners = [t for t, o in zip(takers, outcomes, strict=True) if o is None]
    assert len(winners) == 1, outcomes
    assert set(outcomes) == {None, winners[0].job_id}
    assert _document(run_uri).job_id == winners[0].job_id
    winners[0].release()


def test_bad_timing_is_refused():
    with pytest.raises(ValueError, match="heartbeat_s < stale_after_s"):
        RunLease("/tmp/x", heartbeat_s=10, stale_after_s=5)


def test_the_document_round_trips():
    holder = Holder("ana@gpu-3", 42, "abc", 1.5, 2.5, "t")
    assert Holder.from_bytes(holder.to_bytes()) == holder
    assert json.loads(holder.to_bytes())["owner"] == "ana@gpu-3"
    assert Holder.from_bytes(b'{"owner": "x"}') is None and Holder.from_bytes(b"\xff") is None


def test_by_default_a_lost_lease_interrupts_the_main_thread_past_signal_handlers(tmp_path):
    """The driver's SIGINT handler would stop after one more checkpoint; a lost lease must stop at once."""
    import signal

    run_uri = str(tmp_path / "runs" / "ssd-default-0badf00d")
    handled: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handled.append(signum))
    first = RunLease(run_uri, job_id="job-one", heartbeat_s=0.1).acquire()
    try:
        with pytest.raises(KeyboardInterrupt):
            _lease(run_uri, "job-two", clock=lambda: time.time() + 10).acquire()  # takes it over
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the driver's main thread, waiting on fit()
                time.sleep(0.01)
        assert isinstance(first.lost, LeaseLost) and handled == []
    finally:
        signal.signal(signal.SIGINT, previous)
        first.release()
    assert _document(run_uri).job_id == "job-two"
