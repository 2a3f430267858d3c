"""Collation with a fixed box count (``train.max_boxes``), and the loader skipping records with more boxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.shards.batch import collate_train
from pipeline.shards.loader import train_loader
from pipeline.shards.manifest import load_manifest
from pipeline.shards.reader import ShardReader
from ssd_core.augment import AugmentOptions, Sample
from tests.pipeline.fixtures import make_params, prepare_and_shard

NONE = AugmentOptions(photometric=False, expand=False, crop=False, flip=False)


def _sample(boxes: int) -> Sample:
    box = torch.tensor([[0.1, 0.2, 0.5, 0.6]]).repeat(boxes, 1)
    return Sample(
        torch.zeros(3, 8, 8, dtype=torch.uint8), box, torch.arange(1, boxes + 1), torch.zeros(boxes, dtype=torch.bool)
    )


def test_ground_truth_is_padded_to_max_boxes_whatever_the_batch_holds():
    batch = collate_train([_sample(2), _sample(1)], 8, max_boxes=5)
    assert batch.boxes.shape == (2, 5, 4) and batch.labels.shape == batch.mask.shape == (2, 5)
    assert batch.mask.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    assert batch.labels.tolist() == [[1, 2, 0, 0, 0], [1, 0, 0, 0, 0]] and not batch.boxes[:, 2:].any()
    assert collate_train([_sample(2), _sample(1)], 8).boxes.shape == (2, 2, 4)  # None: the batch's largest
    assert collate_train([], 8, max_boxes=3).boxes.shape == (0, 3, 4)
    with pytest.raises(ValueError, match="a sample has 4 boxes, more than max_boxes=3"):
        collate_train([_sample(4)], 8, max_boxes=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = make_params(**{"data.synthetic.num_train": 12, "data.synthetic.num_val": 1})
    return prepare_and_shard(params, tmp_path_factory.mktemp("batch"))[1]


def _record_box_counts(shards: Path) -> list[int]:
    manifest = load_manifest(str(shards))
    reader = ShardReader(manifest.root, manifest.split_shards("train"))
    try:
        return [len(json.loads(reader.read(i)[1])["boxes"]) for i in range(len(reader))]
    finally:
        reader.close()


def test_records_with_more_boxes_than_max_boxes_are_skipped_as_bad_samples(shards):
    counts = _record_box_counts(shards)
    limit = sorted(counts)[len(counts) // 2]  # some records above it, some not
    over = sum(c > limit for c in counts)
    assert 0 < over < len(counts)
    args = dict(rank=0, world_size=1, global_batch=4, image_size=32, augment=NONE, seed=0, num_workers=0)
    batches = list(train_loader(str(shards), max_boxes=limit, **args))
    assert all(b.boxes.shape[1] == limit for b in batches)  # the same G every step
    assert sum(b.num_bad for b in batches) == over
    assert sum(len(b.images) for b in batches) == len(counts) - over
    unlimited = list(train_loader(str(shards), **args))
    assert sum(b.num_bad for b in unlimited) == 0
