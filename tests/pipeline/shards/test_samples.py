"""Shard samples: reduced-size (draft) JPEG decoding against the full-size reference, a batch planned
together equals its samples made alone, EXIF-rotated images upright, and JSON records checked field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.shards.jpeg import decode_reduction
from pipeline.shards.loader import train_loader
from pipeline.shards.manifest import load_manifest
from pipeline.shards.order import sample_seed
from pipeline.shards.reader import CorruptSample, ShardReader
from pipeline.shards.samples import MAX_SAMPLE_PIXELS, decode_sample, parse_record, train_sample, train_samples
from pipeline.sources.records import write_index
from pipeline.stages.prepare import prepare
from pipeline.stages.shard import shard
from ssd_core.augment import AugmentOptions, plan_augmentation, train_transform
from ssd_core.reference import canvas_window
from tests.pipeline.fixtures import Obj, image_with_box, make_params, prepare_and_shard, save_jpeg, voc_xml

FULL = AugmentOptions()
NONE = AugmentOptions(photometric=False, expand=False, crop=False, flip=False)


@pytest.fixture(scope="module")
def large_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training samples of 160 x 160 synthetic images: at a 24-pixel output most windows allow 1/2 .. 1/8."""
    params = make_params(
        **{"data.synthetic.num_train": 8, "data.synthetic.num_val": 1, "data.synthetic.image_size": 160}
    )
    _, shards = prepare_and_shard(params, tmp_path_factory.mktemp("large"))
    return shards


def _members(shards: Path) -> list[tuple[str, bytes, bytes]]:
    manifest = load_manifest(str(shards))
    reader = ShardReader(manifest.root, manifest.split_shards("train"))
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
                fast = train_sample(
                    jpg, meta, 5, image_size=size, augment=options, generator=torch.Generator().manual_seed(seed)
                )
                slow = train_transform(
                    decoded.image,
                    boxes,
                    decoded.labels,
                    decoded.difficult,
                    size=size,
                    options=options,
                    generator=torch.Generator().manual_seed(seed),
                )
                assert torch.equal(fast.boxes, slow.boxes) and torch.equal(fast.labels, slow.labels)
                assert torch.equal(fast.difficult, slow.difficult)
                plan = plan_augmentation(
                    w,
                    h,
                    boxes,
                    decoded.labels,
                    decoded.difficult,
                    options=options,
                    generator=torch.Generator().manual_seed(seed),
                )
                reductions.append(decode_reduction(plan, size))
                if reductions[-1] == 1:
                    assert torch.equal(fast.image, slow.image)  # nothing reduced: the very same computation
                elif options is geometry:
                    window = canvas_window(decoded.image, plan.expansion, plan.window)
                    ideal = F.interpolate(
                        window[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
                    )[0]
                    ideal = ideal.flip(-1) if plan.flip else ideal
                    assert (fast.image - ideal).abs().mean() <= (slow.image - ideal).abs().mean() + 0.5
    assert set(reductions) >= {1, 2, 4}


def test_training_sample_is_a_function_of_its_seed(large_shards):
    key, jpg, meta = _members(large_shards)[3]
    a, b, c = (
        train_sample(jpg, meta, 5, image_size=24, augment=FULL, generator=torch.Generator().manual_seed(s))
        for s in (7, 7, 8)
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.image, c.image)


def test_a_batch_of_samples_is_each_sample_alone_and_a_corrupt_member_stays_in_its_place(large_shards):
    # Planned together (one vectorised plan for the batch), made one by one: the same samples. A member that
    # cannot be used (bad JSON, bad JPEG) is reported at its position and changes nothing for the others.
    members = [(jpg, meta) for _, jpg, meta in _members(large_shards)]
    members[2] = (members[2][0], b"{not json")
    members[5] = (b"\xff\xd8 not a jpeg", members[5][1])
    seeds = [sample_seed(0, 1, str(i)) for i in range(len(members))]
    made = train_samples(
        members, 5, image_size=40, augment=FULL, generators=[torch.Generator().manual_seed(s) for s in seeds]
    )
    assert len(made) == len(members)
    for i, ((jpg, meta), seed) in enumerate(zip(members, seeds, strict=True)):
        if i in (2, 5):
            assert isinstance(made[i], CorruptSample)
            with pytest.raises(CorruptSample, match="JSON" if i == 2 else "JPEG"):
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
    ((key, jpg, meta),) = _members(tmp_path / "shards")
    sample = train_sample(jpg, meta, 1, image_size=32, augment=NONE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample.boxes, torch.tensor([[70 / 120, 20 / 160, 110 / 120, 60 / 160]]))
    red = sample.image[:, 8, 24].int()
    assert red[0] > 150 and red[2] < 100, red  # red at the box centre
    assert sample.image[2, 28, 4] > 150  # blue elsewhere: upright (15, 140), stored (140, 105)
    plan = plan_augmentation(
        120,
        160,
        sample.boxes,
        sample.labels,
        sample.difficult,
        options=NONE,
        generator=torch.Generator().manual_seed(0),
    )
    assert decode_reduction(plan, 32) == 2  # the draft path was taken
    batch = next(
        iter(
            train_loader(
                str(tmp_path / "shards"),
                rank=0,
                world_size=1,
                global_batch=1,
                image_size=32,
                augment=NONE,
                seed=0,
                num_workers=0,
            )
        )
    )
    assert torch.equal(batch.images[0], sample.image)


GOOD_RECORD = {"id": "x", "width": 4, "height": 3, "boxes": [[0, 0, 2, 2]], "labels": [1], "difficult": [False]}


@pytest.mark.parametrize(
    "change",
    [
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
        # Each of these would pass a looser check and then raise out of the loader, allocate or mislabel.
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
    ],
)
def test_bad_json_records_are_corrupt(change):
    parse_record(json.dumps(GOOD_RECORD).encode(), 5)  # the unchanged record is fine
    with pytest.raises(CorruptSample, match="JSON record"):
        parse_record(json.dumps({**GOOD_RECORD, **change}).encode(), 5)


@pytest.mark.parametrize("text", [b"[1, 2]", b'"a string"', b"[" * 100_000 + b"]" * 100_000])
def test_a_json_member_that_is_not_an_object_is_corrupt(text):
    with pytest.raises(CorruptSample, match="bad JSON record"):
        parse_record(text, 5)


def test_the_record_bounds_admit_a_box_on_the_far_edges_of_the_largest_image():
    side = 16_384  # 16384 * 16384 = 2**28 = MAX_SAMPLE_PIXELS
    record = {"id": "x", "width": side, "height": side, "boxes": [[0, 0, side, side]], "labels": [5], "difficult": [1]}
    parsed = parse_record(json.dumps(record).encode(), 5)
    assert side * side == MAX_SAMPLE_PIXELS and parsed.difficult.tolist() == [True]
