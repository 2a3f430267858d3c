"""What the model file gets from a checkpoint for each ``train.final_weights``, and the refusals."""

from __future__ import annotations

import pytest
import torch

from pipeline.training.watch import final_weights

LAST, EMA, BEST = ({"w": torch.full((1,), v)} for v in (1.0, 2.0, 3.0))


def test_each_choice_picks_its_weights_and_step():
    state = {
        "step": 40,
        "model": LAST,
        "ema": {"weights": EMA},
        "selection": {"best_weights": BEST, "best_step": 20},
    }
    assert final_weights(state, "last") == (LAST, 40)
    assert final_weights(state, "ema") == (EMA, 40)
    assert final_weights(state, "best") == (BEST, 20)


def test_a_checkpoint_without_those_weights_is_refused():
    state = {"step": 4, "model": LAST, "ema": None, "selection": None}
    with pytest.raises(ValueError, match="no EMA"):
        final_weights(state, "ema")
    with pytest.raises(ValueError, match="no validated weights"):
        final_weights(state, "best")
