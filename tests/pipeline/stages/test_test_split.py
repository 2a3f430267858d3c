"""The test split: held out by prepare (synthetic ``num_test``, ``data.test_fraction``, VOC ``test_sets``),
sharded, and scored by evaluate in place of the validation split that picks the best step."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts.model_file import save_model_file
from pipeline.cli import main as cli_main
from pipeline.config import params_to_dict
from pipeline.shards.manifest import load_manifest
from pipeline.sources.records import Candidate, read_index
from pipeline.stages.prepare import hold_out_test, prepare
from ssd_core.model import build_ssd
from tests.pipeline.fixtures import make_params, make_voc_tree, prepare_and_shard


def _candidates(n: int) -> list[Candidate]:
    return [Candidate(f"c{i:02d}", "train" if i < n - 2 else "val", None, "", None) for i in range(n)]


def test_hold_out_moves_a_seeded_share_of_the_training_images_only():
    candidates = _candidates(12)  # 10 train, 2 val
    held = hold_out_test(candidates, 0.25, seed=0)
    moved = [c.id for c in held if c.split == "test"]
    assert len(moved) == round(10 * 0.25) == 2  # round(2.5) = 2 (banker's rounding)
    assert all(c.split == "val" for c in held if c.id in ("c10", "c11"))  # validation untouched
    assert moved == [c.id for c in hold_out_test(candidates, 0.25, seed=0) if c.split == "test"]  # seeded
    assert any(
        moved != [c.id for c in hold_out_test(candidates, 0.25, seed=s) if c.split == "test"] for s in range(1, 5)
    )
    assert [c.split for c in hold_out_test(candidates, 0.0, seed=0)] == [c.split for c in candidates]
    assert sum(c.split == "test" for c in hold_out_test(candidates, 0.01, seed=0)) == 1  # at least one


def test_prepare_and_shard_write_a_test_split(tmp_path):
    params = make_params(
        **{
            "data.synthetic.num_train": 10,
            "data.synthetic.num_val": 3,
            "data.synthetic.num_test": 4,
            "data.synthetic.image_size": 48,
            "data.test_fraction": 0.2,  # 2 of the 10 training images join the 4 generated test images
        }
    )
    index, shards = prepare_and_shard(params, tmp_path)
    counts = {split: len(read_index(index, split)) for split in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 3, "test": 6}
    splits = load_manifest(str(shards)).splits
    assert {k: v.samples for k, v in splits.items()} == counts
    without = make_params(
        **{"data.synthetic.num_train": 4, "data.synthetic.num_val": 2, "data.synthetic.image_size": 48}
    )
    assert "test" not in load_manifest(str(prepare_and_shard(without, tmp_path / "none")[1])).splits


def test_voc_test_lists_make_the_test_split_and_leave_the_others(tmp_path):
    make_voc_tree(tmp_path / "VOC", trainval=["a", "b", "c", "d"], test=["e", "f"])
    params = make_params(
        **{
            "data.source": "voc",
            "data.root": str(tmp_path / "VOC"),
            "data.voc.train_sets": ["trainval"],
            "data.voc.val_sets": ["trainval"],
            "data.voc.test_sets": ["test"],
        }
    )
    result = prepare(params, tmp_path / "out", progress=False)
    ids = {split: sorted(r.id.rsplit("/", 1)[-1] for r in found) for split, found in result.records.items()}
    assert ids["test"] == ["e", "f"] and not set(ids["test"]) & set(ids["train"] + ids["val"])


@pytest.mark.slow
def test_evaluate_scores_the_test_split_when_there_is_one(tmp_path):
    params = make_params(
        **{
            "data.synthetic.num_train": 4,
            "data.synthetic.num_val": 2,
            "data.synthetic.num_test": 3,
            "data.synthetic.image_size": 48,
        }
    )
    _, shards = prepare_and_shard(params, tmp_path)
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    torch.manual_seed(0)
    model_path = tmp_path / "ssd.pt"
    save_model_file(model_path, build_ssd("ssd_tiny", len(classes) + 1), classes=classes, params=params_to_dict(params))
    metrics = tmp_path / "eval.json"
    args = ["--model", str(model_path), "--shards", str(shards), "--metrics", str(metrics)]
    outs = ["--plots", str(tmp_path / "plots"), "--out", str(tmp_path / "eval"), "tracking.enabled=false"]
    assert cli_main(["evaluate", *args, *outs]) == 0
    written = json.loads(metrics.read_text())
    assert written["split"] == "test" and written["num_images"] == 3
