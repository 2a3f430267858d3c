"""``TrainState`` without Ray: a run stopped at a checkpoint and rebuilt from it ends bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.training import checkpoint
from pipeline.training.determinism import seed_step
from pipeline.training.faults import Faults
from pipeline.training.job import TrainJob
from pipeline.training.state import TrainState, build_model, build_state, find_resume_checkpoint
from pipeline.training.step import train_step
from tests.pipeline.fixtures import make_params
from tests.pipeline.training.tiny import tiny_batch

MAX_STEPS = 6
NAN_AT = 1  # the second update is poisoned: the guard's counts must survive the checkpoint too


def _job(tmp_path: Path, classes: tuple[str, ...] = ("a", "b", "c")) -> TrainJob:
    params = make_params(
        **{
            "model.preset": "ssd_tiny",
            "train.batch_size": 2,
            "train.lr": 0.01,
            "train.lr_reference_batch": 2,
            "train.max_steps": MAX_STEPS,
            "train.warmup_steps": 2,
            "train.schedule": "cosine",
        }
    )
    return TrainJob(
        params=params,
        shards=str(tmp_path / "shards"),
        classes=classes,
        run_uri=str(tmp_path / "run"),
        repo_root=str(tmp_path),
        data_digest="0" * 64,
    )


def _train(job: TrainJob, state: TrainState, until: int) -> list[float]:
    """The loop's step sequence (seed, hooks, step, end_step) on a different tiny batch at every step."""
    priors, lrs = state.model.priors(), []
    faults = Faults(nan=({"rank": 0, "steps": [NAN_AT]},))
    while state.step < until:
        seed_step(job.params.seed, 0, state.step)
        faults.before_step(0, state.step, state.model)
        batch = tiny_batch(state.model.image_size, seed=state.step)
        stats = train_step(
            state.model, batch, priors, state.optimizer, cfg=job.params.train, scaler=state.scaler
        ).read()
        lr, stop = state.end_step(stats.finite)
        assert stats.finite == (state.step != NAN_AT + 1) and not stop
        lrs.append(lr)
    return lrs


def _save(job: TrainJob, state: TrainState) -> None:
    contents, meta = state.checkpoint(job, epoch=0, world=1, bad_samples=7, tracking_run_id="run-id")
    checkpoint.write_checkpoint(checkpoint.join(job.run_uri, checkpoint.dir_name(state.step)), contents, meta)


def test_a_run_rebuilt_from_its_checkpoint_ends_bit_identical(tmp_path):
    job = _job(tmp_path)
    straight = build_state(job, build_model(job, None), 1, None)
    lrs = _train(job, straight, MAX_STEPS)

    first = build_state(job, build_model(job, None), 1, None)
    assert _train(job, first, 3) == lrs[:3]
    _save(job, first)
    resumed = find_resume_checkpoint(job, None, world=1)
    assert resumed is not None and resumed.meta.step == 3 and resumed.state["bad_samples"] == 7
    torch.manual_seed(1234)  # whatever the RNG did in between, the checkpoint's state is restored
    second = build_state(job, build_model(job, resumed), 1, resumed)
    assert second.step == 3 and second.guard.state_dict() == {"skipped_total": 1, "consecutive": 0}
    assert _train(job, second, MAX_STEPS) == lrs[3:]  # the schedule continues where it stopped

    expected, got = straight.model.state_dict(), second.model.state_dict()  # parameters and BatchNorm buffers
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert second.guard.state_dict() == straight.guard.state_dict()
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warm-up, then cosine decay


def test_resume_passes_over_a_torn_checkpoint_and_refuses_another_class_list(tmp_path):
    job = _job(tmp_path)
    state = build_state(job, build_model(job, None), 1, None)
    _train(job, state, 1)
    _save(job, state)
    _train(job, state, 2)
    _save(job, state)
    newest = Path(checkpoint.join(job.run_uri, checkpoint.dir_name(2)))
    (newest / checkpoint.STATE_FILE).write_bytes(b"torn")
    assert find_resume_checkpoint(job, None, world=1).meta.step == 1
    with pytest.raises(ValueError, match=r"checkpoint_step_000000001: checkpoint of preset ssd_tiny with classes"):
        find_resume_checkpoint(_job(tmp_path, classes=("a", "b", "x")), None, world=1)
    assert find_resume_checkpoint(_job(tmp_path / "elsewhere"), None, world=1) is None
