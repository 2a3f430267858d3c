"""The streaming loaders: global batches independent of the world size, determinism whatever the workers,
resume, multi-epoch streams, corrupt members skipped and counted, evaluation order, shared-memory collation."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.shards.eval_loader import EvalBatch, eval_loader
from pipeline.shards.loader import TrainBatch, collate_train, train_loader
from pipeline.shards.manifest import ShardError, load_manifest
from pipeline.shards.order import rank_batch
from ssd_core.augment import AugmentOptions

FULL = AugmentOptions()
NONE = AugmentOptions(photometric=False, expand=False, crop=False, flip=False)
SIZE = 48  # the fixture's image side: without augmentation a batch image is the decoded image itself


def _train(shards, **overrides):
    kwargs = dict(rank=0, world_size=1, global_batch=4, image_size=SIZE, augment=FULL, seed=0, num_workers=0)
    kwargs.update(overrides)
    return train_loader(str(shards), **kwargs)


def _same(a: list[TrainBatch], b: list[TrainBatch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images)
        and torch.equal(x.boxes, y.boxes)
        and torch.equal(x.labels, y.labels)
        and torch.equal(x.mask, y.mask)
        and torch.equal(x.sample_ids, y.sample_ids)
        for x, y in zip(a, b, strict=True)
    )


def _keys_by_image(shards) -> dict[bytes, str]:
    """Decoded training images -> source id, through the eval loader (which returns ids)."""
    out = {}
    for batch in eval_loader(str(shards), split="train", batch_size=5, image_size=SIZE, num_workers=0):
        out.update({image.numpy().tobytes(): key for image, key in zip(batch.images, batch.keys, strict=True)})
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_ranks_batches_make_up_the_one_worker_batch_bit_for_bit(uneven_shards, world):
    """The global batch of a step is the same at every world size, augmentation included: rank r of W trains
    on positions floor(r 4 / W) .. floor((r + 1) 4 / W) of it."""
    alone = list(_train(uneven_shards, num_steps=6))  # 13 samples, global batch 4: 4 steps per epoch
    shares = [list(_train(uneven_shards, rank=r, world_size=world, num_steps=6, num_workers=2)) for r in range(world)]
    for step, whole in enumerate(alone):
        parts = [share[step] for share in shares]
        assert [len(p.images) for p in parts] == [(r + 1) * 4 // world - r * 4 // world for r in range(world)]
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
        assert torch.equal(torch.cat([p.sample_ids for p in parts]), whole.sample_ids)


def test_an_epoch_uses_every_sample_once_and_pads_the_last_batch_from_its_start(uneven_shards):
    manifest = load_manifest(str(uneven_shards))
    assert [s.count for s in manifest.split_shards("train")] == [5, 5, 3]
    keys = _keys_by_image(uneven_shards)
    seen, lengths = Counter(), []
    for rank in (0, 1):
        loader = _train(uneven_shards, rank=rank, world_size=2, augment=NONE, num_workers=2)
        batches = list(loader)
        lengths.append((len(loader), len(batches), [len(b.images) for b in batches]))
        seen.update(keys[image.numpy().tobytes()] for b in batches for image in b.images)
    # 13 samples in global batches of 4: 4 steps, 2 images per rank each; 16 - 13 = 3 samples used twice.
    assert lengths == [(4, 4, [2, 2, 2, 2]), (4, 4, [2, 2, 2, 2])]
    assert set(seen) == set(keys.values()) and sum(seen.values()) == 16
    assert sorted(seen.values()) == [1] * 10 + [2] * 3


def test_batches_are_padded_uint8_with_a_mask(uneven_shards):
    batch = next(iter(_train(uneven_shards, global_batch=5)))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (5, 3, SIZE, SIZE)
    b, g = batch.labels.shape
    assert batch.boxes.shape == (b, g, 4) and batch.boxes.dtype == torch.float32
    assert batch.difficult.dtype == torch.bool and batch.mask.dtype == torch.bool and batch.num_bad == 0
    assert torch.equal(batch.mask, batch.labels > 0)
    real = batch.boxes[batch.mask]
    assert ((real >= 0) & (real <= 1)).all() and (real[:, 2:] > real[:, :2]).all()
    assert (batch.boxes[~batch.mask] == 0).all() and (batch.labels[batch.mask] <= 5).all()
    expected = rank_batch(13, seed=0, step=0, global_batch=5, rank=0, world_size=1)
    assert batch.sample_ids.dtype == torch.int64 and batch.sample_ids.tolist() == expected.tolist()


def test_same_seed_and_step_same_batches_whatever_the_workers(uneven_shards):
    reference = list(_train(uneven_shards, num_workers=0))
    assert len(reference) == 4 and [len(b.images) for b in reference] == [4, 4, 4, 4]  # 13 samples padded to 16
    assert _same(reference, list(_train(uneven_shards, num_workers=2)))
    assert _same(reference, list(_train(uneven_shards, num_workers=0)))
    other_epoch = list(_train(uneven_shards, start_step=4))
    assert not any(torch.equal(a.images, b.images) for a, b in zip(reference, other_epoch, strict=True))


def test_start_step_equals_the_tail_of_a_full_run(uneven_shards):
    full = list(_train(uneven_shards, rank=1, world_size=2, start_step=12))  # epoch 3
    resumed = _train(uneven_shards, rank=1, world_size=2, start_step=14, num_workers=2)
    assert (len(resumed), resumed.remaining) == (len(full), len(full) - 2)
    assert _same(full[2:], list(resumed))
    with pytest.raises(ValueError, match="start_step >= 0"):
        _train(uneven_shards, start_step=-1)
    with pytest.raises(ValueError, match="rank"):
        _train(uneven_shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot give each of 5 ranks a sample"):
        _train(uneven_shards, rank=0, world_size=5)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_a_multi_epoch_stream_is_the_per_epoch_loaders_concatenated(uneven_shards, workers):
    # rank 1 of 2 with a global batch of 6: 13 samples -> 3 steps per epoch, 3 images per rank each.
    args = dict(rank=1, world_size=2, global_batch=6)
    per_epoch = [list(_train(uneven_shards, **args, start_step=3 * e)) for e in (2, 3, 4)]
    assert [len(batches) for batches in per_epoch] == [3, 3, 3]
    expected = per_epoch[0][1:] + per_epoch[1] + per_epoch[2][:2]  # from step 7 (epoch 2, batch 1), 7 steps
    stream = _train(uneven_shards, **args, start_step=7, num_steps=7, num_workers=workers)
    assert (len(stream), stream.remaining) == (3, 7)
    got = list(stream)
    assert len(got) == 7 and _same(expected, got)
    whole = list(_train(uneven_shards, **args, start_step=6, num_steps=9, num_workers=workers))
    assert _same(per_epoch[0] + per_epoch[1] + per_epoch[2], whole)
    assert not torch.equal(whole[0].images, whole[3].images)  # epochs differ from each other
    with pytest.raises(ValueError, match="num_steps >= 0"):
        _train(uneven_shards, num_steps=-1)


def _corrupt_copy(source: Path, target: Path, split: str, member: str) -> str:
    """Copy the shards and overwrite one sample's ``member`` ("jpg" or "json") with garbage of the same size.

    The manifest keeps its sizes, so only hashing (verify=True) would notice; the loaders must cope.
    Returns the key of the damaged sample."""
    shutil.copytree(source, target)
    manifest = load_manifest(str(target), verify=False)
    info = manifest.split_shards(split)[1]
    loc = info.samples[2]
    offset, size = (loc.jpg_offset, loc.jpg_size) if member == "jpg" else (loc.json_offset, loc.json_size)
    path = target / info.name
    blob = bytearray(path.read_bytes())
    blob[offset + 20 : offset + size] = b"\x00\x13" * ((size - 20) // 2) + b"\x00" * ((size - 20) % 2)
    path.write_bytes(bytes(blob))
    return loc.key


@pytest.mark.parametrize("member", ["jpg", "json"])
def test_a_corrupt_member_is_skipped_and_counted(uneven_shards, tmp_path, member):
    _corrupt_copy(uneven_shards, tmp_path / "shards", "train", member)
    with pytest.raises(ShardError, match=r"train-000001\.tar: sha256"):
        load_manifest(str(tmp_path / "shards"), verify=True)
    for workers in (0, 2):
        batches = list(_train(tmp_path / "shards", global_batch=13, num_workers=workers))  # one step: every sample
        assert len(batches) == 1  # the epoch keeps its length ...
        assert sum(b.num_bad for b in batches) == 1  # ... the bad sample is counted in its batch ...
        assert sum(len(b.images) for b in batches) == 12  # ... and skipped
        assert [len(b.images) + b.num_bad for b in batches] == [13]
        assert len(batches[0].sample_ids) == 12


def test_eval_loader_sees_every_sample_once_in_order(uneven_shards):
    loader = eval_loader(str(uneven_shards), batch_size=2, image_size=32, num_workers=2)
    batches = list(loader)
    assert len(loader) == 3 and [len(b.keys) for b in batches] == [2, 2, 1]
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"synthetic/val/{i:06d}" for i in range(5)]
    index = {}
    for line in (uneven_shards.parent / "prepared" / "val.jsonl").read_text().splitlines():
        record = json.loads(line)
        index[record["id"]] = record
    for batch in batches:
        assert isinstance(batch, EvalBatch) and batch.images.shape[1:] == (3, 32, 32)
        for i, key in enumerate(batch.keys):
            assert batch.sizes[i].tolist() == [index[key]["width"], index[key]["height"]]
            assert batch.boxes[i].tolist() == index[key]["boxes"]
            assert batch.labels[i].tolist() == index[key]["labels"]
            assert batch.difficult[i].tolist() == index[key]["difficult"]
    again = [k for b in eval_loader(str(uneven_shards), batch_size=2, image_size=32, num_workers=0) for k in b.keys]
    assert again == keys


def test_eval_loader_refuses_a_corrupt_sample_naming_it(uneven_shards, tmp_path):
    shutil.copytree(uneven_shards, tmp_path / "shards")
    key = _corrupt_copy(tmp_path / "shards", tmp_path / "bad", "train", "jpg")
    with pytest.raises(ShardError, match=rf"train-000001\.tar sample {key}"):
        list(eval_loader(str(tmp_path / "bad"), split="train", batch_size=4, image_size=32, num_workers=0))


def test_loaders_refuse_truncated_shards_before_starting(uneven_shards, tmp_path):
    shutil.copytree(uneven_shards, tmp_path / "shards")
    path = tmp_path / "shards" / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:2048])
    with pytest.raises(ShardError, match=r"train-000002\.tar: truncated"):
        _train(tmp_path / "shards")
    with pytest.raises(ShardError, match="no samples in split 'test'"):
        _train(uneven_shards, split="test")


def test_collate_in_a_worker_builds_the_batch_in_shared_memory(uneven_shards):
    batch = next(iter(_train(uneven_shards, num_workers=1)))
    local = collate_train([], SIZE)
    assert local.images.shape == (0, 3, SIZE, SIZE)
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.images.is_shared()


def _rewrite_record(shards: Path, split: str, edit) -> str:
    """Edit one sample's JSON member in place with ``edit(record)`` (``original_size``, which the loaders do
    not read, is dropped to make room; spaces pad it to its size, so the tar and the manifest's sizes still
    agree and only hashing would notice). Returns the sample's key."""
    manifest = load_manifest(str(shards), verify=False)
    info = manifest.split_shards(split)[1]
    loc = info.samples[2]
    path = shards / info.name
    blob = bytearray(path.read_bytes())
    record = json.loads(bytes(blob[loc.json_offset : loc.json_offset + loc.json_size]))
    del record["original_size"]
    edit(record)
    text = json.dumps(record, separators=(",", ":")).encode()
    assert len(text) <= loc.json_size, "the edited record must fit in the member"
    blob[loc.json_offset : loc.json_offset + loc.json_size] = text.ljust(loc.json_size)
    path.write_bytes(bytes(blob))
    return loc.key


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(width=0),
        lambda r: r.update(width=1, height=1),  # the boxes no longer fit
        lambda r: r.update(id=1),
        lambda r: r.update(labels=[9] * len(r["labels"])),
        lambda r: r["boxes"][0].__setitem__(2, 1e6),
        lambda r: r.update(difficult=[7] * len(r["difficult"])),
    ],
    ids=["width-0", "tiny-image", "int-id", "label-9", "box-outside", "difficult-7"],
)
def test_a_record_out_of_bounds_is_a_counted_corrupt_sample(uneven_shards, tmp_path, edit):
    """Like a corrupt JPEG: skipped and counted in its batch during training, named by evaluation. A record
    with width 0, for one, must not raise out of the loader (it would fail the whole batch's plan)."""
    shutil.copytree(uneven_shards, tmp_path / "shards")
    key = _rewrite_record(tmp_path / "shards", "train", edit)
    for workers in (0, 2):
        batches = list(_train(tmp_path / "shards", global_batch=13, num_workers=workers))  # one step: every sample
        assert [len(b.images) + b.num_bad for b in batches] == [13]
        assert sum(b.num_bad for b in batches) == 1
    with pytest.raises(ShardError, match=rf"train-000001\.tar sample {key}: JSON record"):
        list(eval_loader(str(tmp_path / "shards"), split="train", batch_size=4, image_size=32, num_workers=0))
