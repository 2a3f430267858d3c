"""Validation during training under real Ray Train (2 CPU workers on a local Ray): the gathered mAP equals
``python -m pipeline evaluate`` on the same weights, the EMA and the best step survive a killed worker bit
for bit, and patience stops the run on every rank at once, for good.

The tiny job of ``test_ray.py`` (its fixtures: one local Ray, 64 + 16 synthetic 96x96 images), with
``eval.batch_size=4``: the 16 validation images are 4 batches, 2 per rank.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts.model_file import load_model_file
from pipeline.cli import main as cli_main
from pipeline.training import checkpoint
from tests.pipeline.training import test_ray
from tests.pipeline.training.test_ray import MAX_STEPS, Run

ray_local, shards = test_ray.ray_local, test_ray.shards  # the module-scoped fixtures: one Ray, one shard set

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

VALIDATED = ["eval.batch_size=4", "train.val_every_steps=4", "train.lr=0.02"]


def _final(run: Run) -> checkpoint.LoadedCheckpoint:
    return run.checkpoints()[0]


def _evaluate(run: Run, tmp_path) -> dict:
    metrics = tmp_path / "eval.json"
    code = cli_main(
        [
            "evaluate",
            "--model",
            str(run.model_out),
            "--shards",
            run.shards,
            "--metrics",
            str(metrics),
            "--plots",
            str(tmp_path / "plots"),
            "--out",
            str(tmp_path / "eval"),
            "eval.batch_size=4",
            "eval.num_workers=0",
            "tracking.enabled=false",
        ]
    )
    assert code == 0
    return json.loads(metrics.read_text())


def test_in_training_map_equals_evaluate_on_the_same_weights(ray_local, shards, tmp_path, monkeypatch):
    run = Run(tmp_path, shards, [*VALIDATED, "train.final_weights=last"])
    run.train(monkeypatch)
    selection = _final(run).state["selection"]
    assert selection["last_step"] == MAX_STEPS  # validated at steps 4, 8, 12 and the last
    in_training = selection["last"]
    assert in_training["val/map_voc07"] > 0.0  # a number that can be wrong
    evaluated = _evaluate(run, tmp_path)
    assert evaluated["split"] == "val" and evaluated["num_images"] == 16
    for key in ("map_voc07", "map_voc", "map_coco", "ap50", "ap75"):
        assert abs(in_training[f"val/{key}"] - evaluated[key]) <= 1e-6, key  # eval.json rounds to 6 places
    recorded = load_model_file(run.model_out).selection
    assert recorded["final_weights"] == "last" and recorded["weights_step"] == MAX_STEPS
    assert recorded["best_step"] in (4, 8, 12, 16) and repr(recorded["last"]) == repr(in_training)  # NaN too
    assert evaluated["final_weights"] == "last" and evaluated["best_step"] == recorded["best_step"]
    assert evaluated["last"]["val/map_voc07"] == round(in_training["val/map_voc07"], 6)


def test_ema_and_best_weights_survive_a_killed_worker_bit_for_bit(ray_local, shards, tmp_path, monkeypatch):
    overrides = [*VALIDATED, "train.ema_decay=0.9", "train.final_weights=best"]
    reference = Run(tmp_path / "reference", shards, overrides)
    reference.train(monkeypatch)
    faulty = Run(tmp_path / "faulty", shards, overrides)
    faulty.train(monkeypatch, kill=[{"rank": 1, "step": 6, "marker": str(tmp_path / "killed")}])
    assert (tmp_path / "killed").exists()
    a, b = _final(reference).state, _final(faulty).state
    assert a["ema"]["updates"] == b["ema"]["updates"] == MAX_STEPS
    for key, value in a["ema"]["weights"].items():
        assert torch.equal(value, b["ema"]["weights"][key]), key
    summary_a, summary_b = ({k: v for k, v in s["selection"].items() if k != "best_weights"} for s in (a, b))
    assert repr(summary_a) == repr(summary_b)  # repr: an undefined score (NaN) is equal to itself here
    for key, value in a["selection"]["best_weights"].items():
        assert torch.equal(value, b["selection"]["best_weights"][key]), key
    best_step = a["selection"]["best_step"]
    # The model file holds the best step's EMA weights, which are not the last EMA weights unless best is last.
    model = load_model_file(faulty.model_out)
    assert model.selection["final_weights"] == "best" and model.selection["weights_step"] == best_step
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, a["selection"]["best_weights"][key].to(value.dtype)), key


def test_patience_stops_every_rank_at_the_same_step_and_a_rerun_stays_stopped(ray_local, shards, tmp_path, monkeypatch):
    """Validated every step with patience 1, the run stops at the first validation that does not improve."""
    run = Run(tmp_path, shards, [*VALIDATED, "train.val_every_steps=1", "train.patience=1", "train.final_weights=best"])
    run.train(monkeypatch)
    steps0, steps1 = [r["step"] for r in run.records(0)], [r["step"] for r in run.records(1)]
    stop = steps0[-1]
    assert steps0 == steps1 == list(range(1, stop + 1)) and stop < MAX_STEPS  # both ranks stopped there
    final = _final(run)
    assert final.meta.step == stop
    selection = final.state["selection"]
    assert selection["validations_since_best"] == 1 and selection["best_step"] == stop - 1
    assert load_model_file(run.model_out).selection["status"] == "stopped_early"
    run.train(monkeypatch)  # the same command again: nothing more is trained
    assert len(run.records(0)) == stop
    assert load_model_file(run.model_out).selection["weights_step"] == stop - 1
