"""The joint non-finite guard: skip counting, and one all-reduce that makes every rank decide the same."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.training.guard import SkipGuard, reduce_step


def test_skip_guard_counts_and_stops_after_max_consecutive():
    guard = SkipGuard(max_consecutive=3)
    decisions = [guard.record(f) for f in (True, False, False, True, False, False, False)]
    # two in a row, reset by a finite step, then three in a row: stop on the third
    assert decisions == [False, False, False, False, False, False, True]
    assert (guard.skipped_total, guard.consecutive) == (5, 3)
    restored = SkipGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == {"skipped_total": 5, "consecutive": 3}
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        SkipGuard(0)


def _stats(loss: float, finite: bool, images: int, bad: int):
    t = torch.tensor
    return reduce_step(
        local_finite=t(finite),
        loss=t(loss),
        loss_loc=t(loss / 4),
        loss_conf=t(3 * loss / 4),
        positives=t(5.0),
        images=images,
        bad_samples=bad,
    ).read()


def test_single_process_reduction_is_the_identity():
    stats = _stats(8.0, True, images=4, bad=1)
    assert stats == (True, 8.0, 2.0, 6.0, 5.0, 4.0, 1.0)
    assert not _stats(float("nan"), False, images=4, bad=0).finite


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # Rank 1 has a NaN loss at the second step; rank 0 is fine at both steps.
        results = []
        for step in range(2):
            bad = rank == 1 and step == 1
            loss = float("nan") if bad else 2.0 + rank
            stats = _stats(loss, not bad, images=3 + rank, bad=rank)
            results.append(stats._asdict())
        with open(f"{out}.{rank}", "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_reach_the_same_decision(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1))
    for a, b in zip(rank0, rank1, strict=True):
        assert a["finite"] == b["finite"]
        assert a["images"] == b["images"] == 7.0  # 3 + 4 images in the global batch
        assert a["bad_samples"] == 1.0  # rank 1 reported one corrupt sample
    assert rank0[0]["finite"] and rank0[0]["loss"] == pytest.approx(2.5)  # mean of 2.0 and 3.0
    assert rank0[0]["loss_loc"] == pytest.approx(2.5 / 4) and rank0[0]["positives"] == 10.0
    assert not rank0[1]["finite"] and not rank1[1]["finite"]  # rank 0 skips rank 1's NaN step too
    assert math.isnan(rank0[1]["loss"])
