"""Stopping on a signal, without Ray: the driver's handlers around ``fit``, and the agreement without a group.

A real run stopped by a real SIGTERM is in ``test_elastic.py``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pipeline.training.preemption import STOP_SIGNALS, Decision, _any_rank, fit_until_signalled


class _Requests:
    """Stands in for the ``StopRequests`` actor handle: ``requests.request.remote(reason)`` records the reason."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.request = self
        self.asked = threading.Event()

    def remote(self, reason: str) -> None:
        self.reasons.append(reason)
        self.asked.set()


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_signal_during_fit_asks_for_a_stop_and_fit_runs_to_its_end(signum):
    requests = _Requests()
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def fit() -> str:
        os.kill(os.getpid(), signum)  # a real signal to this process, while "training" runs on this thread
        assert requests.asked.wait(10), "the handler never asked for a stop"
        time.sleep(0.3)  # the rest of the step and the checkpoint: fit is not interrupted
        return "fitted"

    result = fit_until_signalled(fit, requests)
    assert result.result == "fitted" and result.signum == signum
    assert requests.reasons == [signal.Signals(signum).name]
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before  # the handlers are put back


def test_without_a_signal_nothing_is_requested_and_errors_come_through():
    requests = _Requests()
    assert fit_until_signalled(lambda: 7, requests) == (7, None) and requests.reasons == []

    def failing() -> None:
        raise RuntimeError("worker group failed")

    with pytest.raises(RuntimeError, match="worker group failed"):
        fit_until_signalled(failing, requests)


def test_off_the_main_thread_fit_just_runs():
    requests, out = _Requests(), []
    thread = threading.Thread(target=lambda: out.append(fit_until_signalled(lambda: "ran", requests)))
    thread.start()
    thread.join(10)
    assert out == [("ran", None)]


def test_without_a_process_group_this_rank_decides_alone():
    assert _any_rank(True, None) is True and _any_rank(False, None) is False
    assert Decision(stop=True, checkpoint=True).stop
