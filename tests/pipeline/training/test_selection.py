"""The best step and patience: which validations improve, when the run stops, and a restored record."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.selection import BestStep


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value)}


def _run(best: BestStep, scores: list[float], metric: str) -> list[bool]:
    return [best.record(10 * (i + 1), {metric: s}, lambda s=s: _weights(s)) for i, s in enumerate(scores)]


def test_a_map_improves_when_strictly_higher_and_patience_counts_validations_since_the_best():
    best = BestStep("val/map_voc07", patience=2)
    assert _run(best, [0.1, 0.3, 0.3, 0.2], "val/map_voc07") == [True, True, False, False]
    assert best.best_step == 20 and best.best_scores == {"val/map_voc07": 0.3}
    assert torch.equal(best.best_weights["w"], _weights(0.3)["w"])
    assert best.last_step == 40 and best.since_best == 2 and best.should_stop


def test_the_loss_improves_when_lower_and_nan_never_beats_a_number():
    best = BestStep("val/loss", patience=0)
    assert _run(best, [float("nan"), 2.0, 1.5, float("nan"), 1.6], "val/loss") == [True, True, True, False, False]
    assert best.best_step == 30 and not best.should_stop  # patience 0: never stops


def test_a_rank_without_weights_keeps_the_same_record():
    kept, bare = BestStep("val/map_coco", 1), BestStep("val/map_coco", 1)
    for step, score in ((5, 0.2), (10, 0.1)):
        kept.record(step, {"val/map_coco": score}, lambda: _weights(1.0))
        bare.record(step, {"val/map_coco": score}, None)
    assert kept.summary() == bare.summary() and bare.best_weights is None and bare.should_stop


def test_restored_record_goes_on_as_the_original():
    original = BestStep("val/map_voc07", 3)
    _run(original, [0.5, 0.4], "val/map_voc07")
    restored = BestStep("val/map_voc07", 3)
    restored.load_state_dict(original.state_dict())
    for best in (original, restored):
        best.record(30, {"val/map_voc07": 0.45}, None)
    assert restored.summary() == original.summary() and restored.since_best == 2
    assert math.isclose(restored.best_scores["val/map_voc07"], 0.5)


def test_steps_must_increase():
    best = BestStep("val/map_voc07", 0)
    best.record(10, {"val/map_voc07": 0.1}, None)
    with pytest.raises(ValueError, match="increase"):
        best.record(10, {"val/map_voc07": 0.2}, None)
