"""The loop's hooks: nothing by default; the test-only faults when ``SSD_TRAIN_TEST_FAULTS`` is set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pipeline.training import faults
from pipeline.training.faults import Faults, TrainHooks, hooks_from_env, model_digest
from pipeline.training.guard import StepStats
from ssd_core.model import SSDOutput


def test_without_the_variable_the_hooks_do_nothing(monkeypatch):
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert type(hooks_from_env()) is TrainHooks
    monkeypatch.setenv(faults.ENV_VAR, json.dumps({"nan": [{"rank": 1, "steps": [3]}]}))
    assert hooks_from_env() == Faults(nan=({"rank": 1, "steps": [3]},))
    monkeypatch.setenv(faults.ENV_VAR, json.dumps({"nan": [], "kil": []}))
    with pytest.raises(ValueError, match=r"SSD_TRAIN_TEST_FAULTS: unknown keys \['kil'\]"):
        hooks_from_env()


class _Head(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> SSDOutput:
        return SSDOutput(x[:, :, :4], x)  # loc [B, P, 4], cls_logits [B, P, C]


def test_a_nan_poisons_exactly_one_forward_of_the_named_rank_and_step():
    head, x = _Head(), torch.ones(1, 3, 5)
    spec = Faults(nan=({"rank": 1, "steps": [2]},))
    spec.before_step(0, 2, head)  # another rank
    spec.before_step(1, 1, head)  # another step
    assert all(torch.isfinite(t).all() for t in head(x))
    spec.before_step(1, 2, head)
    poisoned = head(x)
    assert isinstance(poisoned, SSDOutput) and all(torch.isnan(t).all() for t in poisoned)
    assert all(torch.isfinite(t).all() for t in head(x))  # the hook removed itself


def test_the_checkpoint_kill_is_for_rank_zero_at_its_step_only():
    spec = Faults(kill_in_checkpoint={"step": 8})
    assert spec.before_checkpoint_rename(1, 8) is None and spec.before_checkpoint_rename(0, 4) is None
    assert callable(spec.before_checkpoint_rename(0, 8))


@pytest.mark.slow
def test_a_kill_fires_once_per_marker(tmp_path):
    marker = tmp_path / "killed"
    script = (
        "from pipeline.training.faults import Faults\n"
        f"Faults(kill=({{'rank': 1, 'step': 5, 'marker': {str(marker)!r}}},)).before_step(1, 5, None)\n"
    )
    first = subprocess.run([sys.executable, "-c", script], check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    second = subprocess.run([sys.executable, "-c", script], check=False)
    assert second.returncode == 0  # the marker disarmed it: a restarted worker runs on


def test_digests_are_recorded_after_every_step(tmp_path):
    model = torch.nn.Linear(2, 1)
    spec = Faults(digest_dir=str(tmp_path))
    stats = StepStats(True, 1.5, 0.5, 1.0, 3.0, 2.0, 0.0)
    spec.after_step(1, 7, model, stats)
    with torch.no_grad():
        model.weight += 1
    spec.after_step(1, 8, model, stats._replace(finite=False))
    records = [json.loads(line) for line in (tmp_path / "rank1.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["finite"]) for r in records] == [(7, 1.5, True), (8, 1.5, False)]
    assert records[1]["digest"] == model_digest(model) != records[0]["digest"]
    TrainHooks().after_step(1, 9, model, stats)  # the default records nothing
    assert len((tmp_path / "rank1.jsonl").read_text().splitlines()) == 2


def test_sample_ids_are_recorded_per_worker_process(tmp_path):
    batch = SimpleNamespace(sample_ids=torch.tensor([5, 2, 9]))
    spec = Faults(samples_dir=str(tmp_path))
    spec.on_batch(1, 2, 7, batch)
    spec.on_batch(1, 2, 8, SimpleNamespace(sample_ids=torch.tensor([0])))
    (path,) = tmp_path.glob("*.jsonl")
    assert path.name == f"{os.getpid()}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [
        {"step": 7, "world": 2, "rank": 1, "ids": [5, 2, 9]},
        {"step": 8, "world": 2, "rank": 1, "ids": [0]},
    ]
    TrainHooks().on_batch(1, 2, 9, batch)  # the default records nothing
    assert len(path.read_text().splitlines()) == 2
