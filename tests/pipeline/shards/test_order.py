"""The sample order: global batches of (seed, step) only, shares that cover each global batch at any world
size, once-per-epoch coverage, a fresh order per epoch and seed."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.shards.order import epoch_order, epoch_plan, rank_batch, rank_share, steps_per_epoch


def _reference_global_batch(n: int, seed: int, step: int, batch: int) -> list[int]:
    """Written out: walk the epochs' permutations one sample at a time, wrapping cyclically to fill the last
    batch of each epoch, until ``step`` batches have gone by."""
    per_epoch = math.ceil(n / batch)
    epoch, index = step // per_epoch, step % per_epoch
    order = [int(i) for i in epoch_order(n, seed=seed, epoch=epoch)]
    return [order[(index * batch + j) % n] for j in range(batch)]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 60), st.integers(1, 4), st.integers(0, 9), st.integers(0, 40))
def test_the_ranks_shares_make_up_the_global_batch_whatever_the_world_size(n, world, extra, step):
    batch = world + extra  # every rank gets at least one sample
    expected = _reference_global_batch(n, 3, step, batch)
    shares = [rank_batch(n, seed=3, step=step, global_batch=batch, rank=r, world_size=world) for r in range(world)]
    assert [int(i) for share in shares for i in share] == expected  # rank order = position in the global batch
    sizes = [len(share) for share in shares]
    assert sum(sizes) == batch and max(sizes) - min(sizes) <= 1
    if batch % world == 0:
        assert set(sizes) == {batch // world}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 16), st.integers(0, 3))
def test_every_sample_once_per_epoch_plus_fewer_than_a_batch_of_repeats(n, batch, epoch):
    plan = epoch_plan(n, seed=1, epoch=epoch, global_batch=batch)
    assert plan.shape == (steps_per_epoch(n, global_batch=batch), batch) == (math.ceil(n / batch), batch)
    used = Counter(int(i) for i in plan.reshape(-1))
    assert set(used) == set(range(n))
    repeats = plan.size - n
    assert 0 <= repeats < batch and max(used.values()) <= 1 + math.ceil(repeats / n)
    # The repeats are the first samples of the epoch's permutation (cyclic padding), nothing else.
    order = epoch_order(n, seed=1, epoch=epoch)
    assert np.array_equal(plan.reshape(-1), np.resize(order, plan.size))


def test_epochs_reorder_and_seeds_differ():
    def plan(seed, epoch):
        return epoch_plan(40, seed=seed, epoch=epoch, global_batch=40).tolist()

    assert plan(0, 0) == plan(0, 0)
    assert plan(0, 0) != plan(0, 1) and plan(0, 0) != plan(1, 0)
    # 40 samples in batches of 40: one step per epoch, so step 1 is the whole of epoch 1.
    assert rank_batch(40, seed=0, step=1, global_batch=40, rank=0, world_size=1).tolist() == plan(0, 1)[0]


def test_shares_are_contiguous_floor_bounds():
    # 10 images over 4 ranks: floor(10 r / 4) = 0, 2, 5, 7, 10.
    assert [rank_share(10, rank=r, world_size=4) for r in range(4)] == [
        slice(0, 2),
        slice(2, 5),
        slice(5, 7),
        slice(7, 10),
    ]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        rank_share(8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global batch of 2 cannot give each of 3 ranks a sample"):
        rank_share(2, rank=0, world_size=3)
    with pytest.raises(ValueError, match="at least one sample"):
        steps_per_epoch(0, global_batch=4)
    with pytest.raises(ValueError, match="step >= 0"):
        rank_batch(4, seed=0, step=-1, global_batch=2, rank=0, world_size=1)
