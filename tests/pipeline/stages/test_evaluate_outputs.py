"""Evaluate's files: PR curves thinned for DVC plots, and the whole-run wall time eval.json records.
Every file is written and read back by the command in ``test_evaluate.py``."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stages.evaluate_outputs import RUN_STARTED_ENV, decimate_curve, run_wall_time_s
from ssd_core.metrics import PRCurve


def test_decimate_curve_keeps_short_curves_and_thins_long_ones_keeping_both_ends():
    short = PRCurve(np.array([0.1, 0.5]), np.array([1.0, 0.5]), np.array([0.9, 0.1]), np.array([True, True]))
    recall, precision = decimate_curve(short, max_points=2)
    assert recall is short.recall and precision is short.precision
    n = 1001
    long = PRCurve(np.arange(n) / (n - 1), np.linspace(1.0, 0.0, n), np.linspace(1.0, 0.0, n), np.ones(n, bool))
    recall, precision = decimate_curve(long, max_points=11)
    # linspace(0, 1000, 11) hits every 100th point exactly: 0, 100, ..., 1000.
    np.testing.assert_array_equal(recall, np.arange(0, n, 100) / (n - 1))
    np.testing.assert_array_equal(precision, long.precision[::100])


@pytest.mark.parametrize(("value", "expected"), [("1000", 234.5), ("", None), ("yesterday", None), ("2000", None)])
def test_run_wall_time_comes_from_the_make_run_start(monkeypatch, value, expected):
    monkeypatch.setenv(RUN_STARTED_ENV, value)
    assert run_wall_time_s(now=1234.5) == expected  # 2000 is after "now": a clock problem, not a duration
