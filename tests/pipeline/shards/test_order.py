"""The sample order: equal batch counts across ranks, once-per-epoch coverage, a fresh order per epoch and seed."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.shards.order import batches_per_epoch, rank_batches


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 60), st.integers(1, 4), st.integers(1, 8), st.integers(0, 3))
def test_every_rank_gets_the_same_batch_count_and_every_sample_is_used(n, world, batch, epoch):
    plans = [rank_batches(n, seed=1, epoch=epoch, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    assert {len(p) for p in plans} == {batches_per_epoch(n, world_size=world, batch_size=batch)}
    assert len({tuple(len(b) for b in p) for p in plans}) == 1  # batch sizes agree rank by rank
    used = Counter(int(i) for p in plans for b in p for i in b)
    assert set(used) == set(range(n))  # every sample, once ...
    assert sum(used.values()) == math.ceil(n / world) * world  # ... plus at most world - 1 repeats
    assert max(used.values()) - min(used.values()) <= 1  # cyclic padding: repeats spread evenly


def test_epochs_reorder_and_seeds_differ():
    plan = [list(b) for b in rank_batches(40, seed=0, epoch=0, rank=0, world_size=1, batch_size=40)]
    assert plan == [list(b) for b in rank_batches(40, seed=0, epoch=0, rank=0, world_size=1, batch_size=40)]
    assert plan != [list(b) for b in rank_batches(40, seed=0, epoch=1, rank=0, world_size=1, batch_size=40)]
    assert plan != [list(b) for b in rank_batches(40, seed=1, epoch=0, rank=0, world_size=1, batch_size=40)]
