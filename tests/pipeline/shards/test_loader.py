"""The streaming loader: equal batch counts across ranks, once-per-epoch coverage, determinism, resume,
corrupt members skipped and counted, evaluation order, and reduced-size (draft) JPEG decoding."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.shards.jpeg import decode_reduction
from pipeline.shards.loader import (
    EvalBatch,
    ShardError,
    TrainBatch,
    _ShardReader,
    batches_per_epoch,
    collate_train,
    decode_sample,
    eval_loader,
    load_manifest,
    rank_batches,
    sample_seed,
    train_loader,
    train_sample,
    train_samples,
)
from pipeline.sources.records import write_index
from pipeline.stages.prepare import prepare
from pipeline.stages.shard import shard
from ssd_core.augment import AugmentOptions, plan_augmentation, train_transform
from ssd_core.reference import canvas_window
from tests.pipeline.fixtures import Obj, image_with_box, make_params, prepare_and_shard, save_jpeg, voc_xml

FULL = AugmentOptions()
NONE = AugmentOptions(photometric=False, expand=False, crop=False, flip=False)
SIZE = 48  # the fixture's image side: without augmentation a batch image is the decoded image itself


def _train(shards, **overrides):
    kwargs = dict(rank=0, world_size=1, batch_size=4, image_size=SIZE, augment=FULL, seed=0, epoch=0, num_workers=0)
    kwargs.update(overrides)
    return train_loader(str(shards), **kwargs)


def _same(a: list[TrainBatch], b: list[TrainBatch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images) and torch.equal(x.boxes, y.boxes) and torch.equal(x.labels, y.labels)
        and torch.equal(x.mask, y.mask) for x, y in zip(a, b, strict=True))


def _keys_by_image(shards) -> dict[bytes, str]:
    """Decoded training images -> source id, through the eval loader (which returns ids)."""
    out = {}
    for batch in eval_loader(str(shards), split="train", batch_size=5, image_size=SIZE, num_workers=0):
        out.update({image.numpy().tobytes(): key for image, key in zip(batch.images, batch.keys, strict=True)})
    return out


# ------------------------------------------------------------------------------------------ the plan
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


# ------------------------------------------------------------------------------------ real loaders
def test_two_ranks_equal_batch_counts_with_uneven_shards(uneven_shards):
    manifest = load_manifest(str(uneven_shards))
    assert [s.count for s in manifest.split_shards("train")] == [5, 5, 3]
    keys = _keys_by_image(uneven_shards)
    seen, lengths = Counter(), []
    for rank in (0, 1):
        loader = _train(uneven_shards, rank=rank, world_size=2, augment=NONE, num_workers=2)
        batches = list(loader)
        lengths.append((len(loader), len(batches), [len(b.images) for b in batches]))
        seen.update(keys[image.numpy().tobytes()] for b in batches for image in b.images)
    # 13 samples over 2 ranks: ceil(13 / 2) = 7 each -> batches of 4 and 3 on both ranks.
    assert lengths == [(2, 2, [4, 3]), (2, 2, [4, 3])]
    assert set(seen) == set(keys.values()) and sum(seen.values()) == 14  # all 13, one used twice


def test_batches_are_padded_uint8_with_a_mask(uneven_shards):
    batch = next(iter(_train(uneven_shards, batch_size=5)))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (5, 3, SIZE, SIZE)
    b, g = batch.labels.shape
    assert batch.boxes.shape == (b, g, 4) and batch.boxes.dtype == torch.float32
    assert batch.difficult.dtype == torch.bool and batch.mask.dtype == torch.bool and batch.num_bad == 0
    assert torch.equal(batch.mask, batch.labels > 0)
    real = batch.boxes[batch.mask]
    assert ((real >= 0) & (real <= 1)).all() and (real[:, 2:] > real[:, :2]).all()
    assert (batch.boxes[~batch.mask] == 0).all() and (batch.labels[batch.mask] <= 5).all()


def test_same_seed_and_epoch_same_batches_whatever_the_workers(uneven_shards):
    reference = list(_train(uneven_shards, num_workers=0))
    assert len(reference) == 4  # 13 samples in batches of 4: 4, 4, 4, 1
    assert _same(reference, list(_train(uneven_shards, num_workers=2)))
    assert _same(reference, list(_train(uneven_shards, num_workers=0)))
    other_epoch = list(_train(uneven_shards, epoch=1))
    assert not any(torch.equal(a.images, b.images) for a, b in zip(reference, other_epoch, strict=True))


def test_skip_batches_equals_the_tail_of_a_full_run(uneven_shards):
    full = list(_train(uneven_shards, rank=1, world_size=2, batch_size=2, epoch=3))
    resumed = _train(uneven_shards, rank=1, world_size=2, batch_size=2, epoch=3, skip_batches=2, num_workers=2)
    assert (len(resumed), resumed.remaining) == (len(full), len(full) - 2)
    assert _same(full[2:], list(resumed))
    with pytest.raises(ValueError, match="skip_batches"):
        _train(uneven_shards, skip_batches=5)
    with pytest.raises(ValueError, match="rank"):
        _train(uneven_shards, rank=2, world_size=2)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_a_multi_epoch_stream_is_the_per_epoch_loaders_concatenated(uneven_shards, workers):
    # rank 1 of 2, batches of 3: 7 samples per rank -> 3 batches per epoch (3, 3, 1).
    args = dict(rank=1, world_size=2, batch_size=3)
    per_epoch = [list(_train(uneven_shards, **args, epoch=e)) for e in (2, 3, 4)]
    assert [len(batches) for batches in per_epoch] == [3, 3, 3]
    expected = per_epoch[0][1:] + per_epoch[1] + per_epoch[2][:2]  # from batch 1 of epoch 2, 7 batches
    stream = _train(uneven_shards, **args, epoch=2, skip_batches=1, epochs=3, max_batches=7, num_workers=workers)
    assert (len(stream), stream.remaining) == (3, 7)
    got = list(stream)
    assert len(got) == 7 and _same(expected, got)
    # Without a cap it runs to the end of the last epoch; epochs differ from each other.
    whole = list(_train(uneven_shards, **args, epoch=2, epochs=3, num_workers=workers))
    assert _same(per_epoch[0] + per_epoch[1] + per_epoch[2], whole)
    assert not torch.equal(whole[0].images, whole[3].images)
    with pytest.raises(ValueError, match="epochs >= 1"):
        _train(uneven_shards, epochs=0)


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
        batches = list(_train(tmp_path / "shards", num_workers=workers))
        assert len(batches) == 4  # the epoch keeps its length ...
        assert sum(b.num_bad for b in batches) == 1  # ... the bad sample is counted in its batch ...
        assert sum(len(b.images) for b in batches) == 12  # ... and skipped
        assert [len(b.images) + b.num_bad for b in batches] == [4, 4, 4, 1]


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


# ----------------------------------------------------------------------- reduced-size (draft) decoding
@pytest.fixture(scope="module")
def large_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training samples of 160 x 160 synthetic images: at a 24-pixel output most windows allow 1/2 .. 1/8."""
    params = make_params(**{"data.synthetic.num_train": 8, "data.synthetic.num_val": 1,
                            "data.synthetic.image_size": 160})
    _, shards = prepare_and_shard(params, tmp_path_factory.mktemp("large"))
    return shards


def _members(shards: Path) -> list[tuple[str, bytes, bytes]]:
    manifest = load_manifest(str(shards))
    reader = _ShardReader(manifest.root, manifest.split_shards("train"))
    try:
        return [(reader.locations[i][1].key, *reader.read(i)) for i in range(len(reader))]
    finally:
        reader.close()


def test_draft_decoding_gives_the_same_boxes_and_a_close_image(large_shards):
    # Reference: decode at full size, then the same augmentation with the same generator seed. Boxes are the
    # same (planned before decoding). Images: identical when nothing was reduced; otherwise no farther than
    # the full-size result from a properly filtered (antialiased) resize of the window: the full-size bilinear
    # resize reads 2 x 2 pixels per output pixel and aliases the noisy synthetic backgrounds, DCT scaling
    # averages whole blocks.
    size, reductions, geometry = 40, [], AugmentOptions(photometric=False)
    for key, jpg, meta in _members(large_shards):
        for epoch in range(4):
            seed = sample_seed(0, epoch, key)
            decoded = decode_sample(jpg, meta, 5)
            h, w = decoded.image.shape[1:]
            boxes = (decoded.boxes_px / torch.tensor([w, h, w, h])).clamp(0, 1)
            for options in (FULL, geometry):
                fast = train_sample(jpg, meta, 5, image_size=size, augment=options,
                                    generator=torch.Generator().manual_seed(seed))
                slow = train_transform(decoded.image, boxes, decoded.labels, decoded.difficult, size=size,
                                       options=options, generator=torch.Generator().manual_seed(seed))
                assert torch.equal(fast.boxes, slow.boxes) and torch.equal(fast.labels, slow.labels)
                assert torch.equal(fast.difficult, slow.difficult)
                plan = plan_augmentation(w, h, boxes, decoded.labels, decoded.difficult, options=options,
                                         generator=torch.Generator().manual_seed(seed))
                reductions.append(decode_reduction(plan, size))
                if reductions[-1] == 1:
                    assert torch.equal(fast.image, slow.image)  # nothing reduced: the very same computation
                elif options is geometry:
                    window = canvas_window(decoded.image, plan.expansion, plan.window)
                    ideal = F.interpolate(window[None], size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
                    ideal = ideal.flip(-1) if plan.flip else ideal
                    assert (fast.image - ideal).abs().mean() <= (slow.image - ideal).abs().mean() + 0.5
    assert set(reductions) >= {1, 2, 4}


def test_training_sample_is_a_function_of_its_seed(large_shards):
    key, jpg, meta = _members(large_shards)[3]
    a, b, c = (train_sample(jpg, meta, 5, image_size=24, augment=FULL, generator=torch.Generator().manual_seed(s))
               for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.image, c.image)


def test_a_batch_of_samples_is_each_sample_alone_and_a_corrupt_member_stays_in_its_place(large_shards):
    # Planned together (one vectorised plan for the batch), made one by one: the same samples. A member that
    # cannot be used (bad JSON, bad JPEG) is reported at its position and changes nothing for the others.
    from pipeline.shards.loader import _Corrupt

    members = [(jpg, meta) for _, jpg, meta in _members(large_shards)]
    members[2] = (members[2][0], b"{not json")
    members[5] = (b"\xff\xd8 not a jpeg", members[5][1])
    seeds = [sample_seed(0, 1, str(i)) for i in range(len(members))]
    made = train_samples(members, 5, image_size=40, augment=FULL,
                         generators=[torch.Generator().manual_seed(s) for s in seeds])
    assert len(made) == len(members)
    for i, ((jpg, meta), seed) in enumerate(zip(members, seeds, strict=True)):
        if i in (2, 5):
            assert isinstance(made[i], _Corrupt)
            with pytest.raises(_Corrupt, match="JSON" if i == 2 else "JPEG"):
                train_sample(jpg, meta, 5, image_size=40, augment=FULL, generator=torch.Generator().manual_seed(seed))
            continue
        alone = train_sample(jpg, meta, 5, image_size=40, augment=FULL, generator=torch.Generator().manual_seed(seed))
        assert all(torch.equal(x, y) for x, y in zip(made[i], alone, strict=True))
    assert train_samples([], 5, image_size=40, augment=FULL, generators=[]) == []


def test_exif_rotated_image_is_upright_with_draft_decoding(tmp_path):
    # A 160 x 120 stored image with EXIF orientation 6 (display = rotated 90 degrees clockwise): the shard
    # stage stores it upright (120 x 160), where the red box (20, 10)-(60, 50) of the stored image lands at
    # x = H - y: (120 - 50, 20)-(120 - 10, 60) = (70, 20)-(110, 60). At a 32-pixel output the whole image
    # (no augmentation) is decoded at 1/2 (min side 120 >= 2 * 32); the box centre (90, 40) -> (24, 8).
    root = tmp_path / "VOC"
    save_jpeg(root / "JPEGImages" / "r0.jpg", image_with_box((160, 120), (20, 10, 60, 50)), orientation=6)
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "r0.xml").write_text(voc_xml("r0.jpg", (160, 120), [Obj("cat", 21, 11, 60, 50)]))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    save_jpeg(root / "JPEGImages" / "v0.jpg", image_with_box((40, 30), (5, 5, 20, 20)))
    (root / "Annotations" / "v0.xml").write_text(voc_xml("v0.jpg", (40, 30), [Obj("cat", 6, 6, 20, 20)]))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("r0\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("v0\n")
    params = make_params(**{"data.source": "voc", "data.root": str(root)})
    result = prepare(params, tmp_path / "index", progress=False)
    write_index(tmp_path / "index", result.records, result.classes)
    shard(tmp_path / "index", tmp_path / "shards", params.shard, progress=False)
    (key, jpg, meta), = _members(tmp_path / "shards")
    sample = train_sample(jpg, meta, 1, image_size=32, augment=NONE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample.boxes, torch.tensor([[70 / 120, 20 / 160, 110 / 120, 60 / 160]]))
    red = sample.image[:, 8, 24].int()
    assert red[0] > 150 and red[2] < 100, red  # red at the box centre
    assert sample.image[2, 28, 4] > 150  # blue elsewhere: upright (15, 140), stored (140, 105)
    plan = plan_augmentation(120, 160, sample.boxes, sample.labels, sample.difficult, options=NONE,
                             generator=torch.Generator().manual_seed(0))
    assert decode_reduction(plan, 32) == 2  # the draft path was taken
    batch = next(iter(train_loader(str(tmp_path / "shards"), rank=0, world_size=1, batch_size=1, image_size=32,
                                   augment=NONE, seed=0, epoch=0, num_workers=0)))
    assert torch.equal(batch.images[0], sample.image)


def test_collate_in_a_worker_builds_the_batch_in_shared_memory(uneven_shards):
    batch = next(iter(_train(uneven_shards, num_workers=1)))
    local = collate_train([], SIZE)
    assert local.images.shape == (0, 3, SIZE, SIZE)
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.images.is_shared()


GOOD_RECORD = {"id": "x", "width": 4, "height": 3, "boxes": [[0, 0, 2, 2]], "labels": [1], "difficult": [False]}


@pytest.mark.parametrize("change", [
    {"boxes": [[0, 0, 2]]},  # not 4 numbers
    {"boxes": [[0, 0, 2, "2"]]},  # a string
    {"boxes": None},
    {"boxes": [[0, 0, 2, 2], [1, 1]]},  # ragged
    {"boxes": [[0, 0, 2, float("inf")]]},
    {"labels": ["1"]},
    {"labels": [9]},  # outside 1..5
    {"labels": [0]},  # background is not a label
    {"difficult": [False, True]},  # length differs
    {"width": "wide"},
    # Each of these used to pass the check and then raise out of the loader, or to allocate or mislabel.
    {"width": 0},
    {"height": -3},
    {"width": True},
    {"width": 4.5},
    {"width": 65_536},  # more than a JPEG can have
    {"width": 65_535, "height": 65_535},  # 4.3e9 pixels > MAX_SAMPLE_PIXELS
    {"id": 7},
    {"id": None},
    {"difficult": [2]},
    {"boxes": [[0, 0, 5, 2]]},  # x2 beyond the 4-pixel width
    {"boxes": [[0, -1, 2, 2]]},
    {"boxes": [[3, 0, 1, 2]]},  # inverted
    {"boxes": [[0, 0, 2, 1e39]]},  # finite in JSON, infinite as float32
    {"labels": [2**63]},
    {"labels": [10**30]},
])
def test_bad_json_records_are_corrupt(change):
    from pipeline.shards.loader import _Corrupt, _parse_record

    _parse_record(json.dumps(GOOD_RECORD).encode(), 5)  # the unchanged record is fine
    with pytest.raises(_Corrupt, match="JSON record"):
        _parse_record(json.dumps({**GOOD_RECORD, **change}).encode(), 5)


@pytest.mark.parametrize("text", [b"[1, 2]", b'"a string"', b"[" * 100_000 + b"]" * 100_000])
def test_a_json_member_that_is_not_an_object_is_corrupt(text):
    from pipeline.shards.loader import _Corrupt, _parse_record

    with pytest.raises(_Corrupt, match="bad JSON record"):
        _parse_record(text, 5)


def test_the_record_bounds_admit_a_box_on_the_far_edges_of_the_largest_image():
    from pipeline.shards.loader import MAX_SAMPLE_PIXELS, _parse_record

    side = 16_384  # 16384 * 16384 = 2**28 = MAX_SAMPLE_PIXELS
    record = {"id": "x", "width": side, "height": side, "boxes": [[0, 0, side, side]], "labels": [5],
              "difficult": [1]}
    parsed = _parse_record(json.dumps(record).encode(), 5)
    assert side * side == MAX_SAMPLE_PIXELS and parsed.difficult.tolist() == [True]


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


@pytest.mark.parametrize("edit", [
    lambda r: r.update(width=0),
    lambda r: r.update(width=1, height=1),  # the boxes no longer fit
    lambda r: r.update(id=1),
    lambda r: r.update(labels=[9] * len(r["labels"])),
    lambda r: r["boxes"][0].__setitem__(2, 1e6),
    lambda r: r.update(difficult=[7] * len(r["difficult"])),
], ids=["width-0", "tiny-image", "int-id", "label-9", "box-outside", "difficult-7"])
def test_a_record_out_of_bounds_is_a_counted_corrupt_sample(uneven_shards, tmp_path, edit):
    """Like a corrupt JPEG: skipped and counted in its batch during training, named by evaluation. A record
    with width 0 used to raise out of the loader (the whole batch's plan failed)."""
    shutil.copytree(uneven_shards, tmp_path / "shards")
    key = _rewrite_record(tmp_path / "shards", "train", edit)
    for workers in (0, 2):
        batches = list(_train(tmp_path / "shards", num_workers=workers))
        assert [len(b.images) + b.num_bad for b in batches] == [4, 4, 4, 1]
        assert sum(b.num_bad for b in batches) == 1
    with pytest.raises(ShardError, match=rf"train-000001\.tar sample {key}: JSON record"):
        list(eval_loader(str(tmp_path / "shards"), split="train", batch_size=4, image_size=32, num_workers=0))
