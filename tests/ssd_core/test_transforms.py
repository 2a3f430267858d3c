"""SSD augmentation: output contract, determinism, and the geometry of each step checked directly."""

import math

import pytest
import torch

from ssd_core.boxes import box_iou
from ssd_core.photometric import colour_matrix, photometric_distort
from ssd_core.transforms import (
    CROP_MIN_IOUS,
    FILL_COLOUR,
    IMAGE_MEAN,
    IMAGE_STD,
    AugmentOptions,
    Expansion,
    Sample,
    _resize,
    _resize_window,
    canvas_window,
    eval_transform,
    normalize_images,
    sample_crop,
    sample_expansion,
    train_transform,
)

ALL = AugmentOptions()
NONE = AugmentOptions(photometric=False, expand=False, crop=False, flip=False)
FLIP_ONLY = AugmentOptions(photometric=False, expand=False, crop=False, flip=True)
CROP_ONLY = AugmentOptions(photometric=False, expand=False, crop=True, flip=False)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_sample(seed):
    """A random image (size varies) with 0..8 boxes, some tiny, some touching the border."""
    g = gen(seed)
    h, w = int(torch.randint(20, 140, (), generator=g)), int(torch.randint(20, 140, (), generator=g))
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    n = 0 if seed % 7 == 0 else int(torch.randint(1, 9, (), generator=g))
    xy = torch.rand(n, 2, generator=g) * 0.9
    wh = torch.rand(n, 2, generator=g) * (1 - xy) * (0.02 if seed % 5 == 0 else 1.0) + 1e-3
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)
    labels = torch.randint(1, 21, (n,), generator=g)
    difficult = torch.rand(n, generator=g) < 0.3
    return image, boxes, labels, difficult


def assert_valid(sample, size, num_in):
    assert isinstance(sample, Sample)
    assert sample.image.shape == (3, size, size) and sample.image.dtype == torch.uint8
    boxes = sample.boxes
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert sample.labels.shape == sample.difficult.shape == (boxes.shape[0],)
    assert sample.labels.dtype == torch.int64 and sample.difficult.dtype == torch.bool
    assert boxes.shape[0] <= num_in
    assert torch.isfinite(boxes).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


# -------------------------------------------------------------------------------- output contract
@pytest.mark.parametrize("seed", range(40))
def test_train_transform_output_is_valid(seed):
    image, boxes, labels, difficult = random_sample(seed)
    size = 160 if seed % 2 else 300
    options = ALL if seed % 3 else AugmentOptions(channel_swap=True, expand_max_ratio=2.0)
    sample = train_transform(image, boxes, labels, difficult, size=size, options=options, generator=gen(seed))
    assert_valid(sample, size, boxes.shape[0])


def test_same_seed_same_output_and_global_rng_untouched():
    image, boxes, labels, difficult = random_sample(3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = train_transform(image, boxes, labels, difficult, size=96, options=ALL, generator=gen(11))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not used
    torch.manual_seed(12345)
    b = train_transform(image, boxes, labels, difficult, size=96, options=ALL, generator=gen(11))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_different_seeds_give_different_outputs():
    image, boxes, labels, difficult = random_sample(3)
    outs = [train_transform(image, boxes, labels, difficult, size=64, options=ALL, generator=gen(s)) for s in range(8)]
    distinct = {bytes(o.image.flatten().tolist()) for o in outs}
    assert len(distinct) == len(outs)


def test_no_augmentation_is_eval_transform_and_keeps_boxes():
    image, boxes, labels, difficult = random_sample(4)
    sample = train_transform(image, boxes, labels, difficult, size=64, options=NONE, generator=gen(0))
    assert torch.equal(sample.image, eval_transform(image, 64))
    assert torch.equal(sample.boxes, boxes) and torch.equal(sample.labels, labels)


def test_image_without_boxes():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=gen(0))
    empty = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    cropped = 0
    for seed in range(30):
        sample = train_transform(image, *empty, size=32, options=ALL, generator=gen(seed))
        assert_valid(sample, 32, 0)
        # Without boxes there is nothing to satisfy: every option but "whole image" yields a crop.
        choice = sample_crop(torch.zeros(0, 4), 70, 50, gen(seed))
        assert (choice.window is None) == (choice.min_iou is None)
        cropped += choice.window is not None
    assert cropped > 0


# ---------------------------------------------------------------------------------- alignment
PALETTE = torch.tensor(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
     [255, 255, 255], [128, 0, 0], [0, 128, 0], [0, 0, 128], [128, 128, 0], [0, 128, 128]],
    dtype=torch.uint8,
)  # fmt: skip


def colour_coded_sample():
    """12 disjoint boxes on a 3 x 4 grid of a 120 x 160 image, box i painted PALETTE[i], label i + 1."""
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)
    boxes = []
    for i in range(12):
        r, c = divmod(i, 4)
        x0, y0, x1, y1 = c * 40 + 4, r * 40 + 4, c * 40 + 36, r * 40 + 36
        image[:, y0:y1, x0:x1] = PALETTE[i].view(3, 1, 1)
        boxes.append([x0 / 160, y0 / 120, x1 / 160, y1 / 120])
    labels = torch.arange(1, 13)
    return image, torch.tensor(boxes), labels, labels % 2 == 0


@pytest.mark.parametrize("seed", range(25))
def test_labels_and_difficult_follow_their_boxes(seed):
    # A clipped output box lies inside its original box, which is uniformly PALETTE[label - 1]. Bilinear
    # resizing reads the two source pixels nearest each sample point, so a box at least 8 output pixels
    # wide and tall shows exactly its own colour at its centre pixel (box edges are whole source pixels:
    # integer boxes, expansion offsets and crop windows). A box carrying the wrong label would not.
    image, boxes, labels, difficult = colour_coded_sample()
    options = AugmentOptions(photometric=False, expand_max_ratio=2.0)
    size = 96
    s = train_transform(image, boxes, labels, difficult, size=size, options=options, generator=gen(seed))
    assert torch.equal(s.difficult, s.labels % 2 == 0)
    checked = 0
    for box, label in zip(s.boxes * size, s.labels, strict=True):
        x0, y0, x1, y1 = box.tolist()
        if x1 - x0 < 8 or y1 - y0 < 8:
            continue
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        got = s.image[:, cy, cx].int()
        assert (got - PALETTE[label - 1].int()).abs().max() <= 1, (label, got)
        checked += 1
    assert checked > 0 or s.boxes.shape[0] == 0


# ----------------------------------------------------------------------------------------- flip
def test_flip_mirrors_image_and_boxes_exactly():
    image, boxes, labels, difficult = random_sample(8)
    plain = eval_transform(image, 48)
    mirrored_boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=-1)
    seen = set()
    for seed in range(12):
        s = train_transform(image, boxes, labels, difficult, size=48, options=FLIP_ONLY, generator=gen(seed))
        flipped = bool(torch.rand((), generator=gen(seed), dtype=torch.float64) < 0.5)  # the one draw: flip
        seen.add(flipped)
        if flipped:
            assert torch.equal(s.image, plain.flip(-1))
            assert torch.equal(s.boxes, mirrored_boxes)
        else:
            assert torch.equal(s.image, plain) and torch.equal(s.boxes, boxes)
        assert torch.equal(s.labels, labels)
    assert seen == {True, False}


# ------------------------------------------------------------------------------------- expansion
def test_sample_expansion_ranges():
    ratios = []
    for seed in range(200):
        e = sample_expansion(50, 30, 4.0, gen(seed))
        assert 0 <= e.left <= e.canvas_width - 50 and 0 <= e.top <= e.canvas_height - 30
        assert e.canvas_width <= 200 and e.canvas_height <= 120
        ratios.append(e.canvas_width / 50)
    expanded = sum(r > 1 for r in ratios)
    assert 60 < expanded < 140  # probability 1/2
    assert max(ratios) > 3.0
    assert sample_expansion(50, 30, 1.0, gen(0)) == Expansion(50, 30, 0, 0)


@pytest.mark.parametrize("seed", range(10))
def test_expansion_keeps_box_contents(seed):
    # Integer-pixel boxes: after expansion the canvas pixels inside each moved box are exactly the
    # original pixels inside the box, and everything outside the placed image is the mean colour.
    g = gen(seed)
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=g)
    boxes_px = torch.tensor([[3, 4, 20, 25], [10, 0, 40, 30], [0, 12, 7, 13]])
    e = Expansion(40, 30, 0, 0)
    while e.canvas_width == 40:  # a seed that expands
        e = sample_expansion(40, 30, 4.0, g)
    canvas = canvas_window(image, e)
    assert canvas.shape == (3, e.canvas_height, e.canvas_width)
    for x0, y0, x1, y1 in boxes_px.tolist():
        moved = canvas[:, y0 + e.top : y1 + e.top, x0 + e.left : x1 + e.left]
        assert torch.equal(moved, image[:, y0:y1, x0:x1].float())
    outside = torch.ones(e.canvas_height, e.canvas_width, dtype=torch.bool)
    outside[e.top : e.top + 30, e.left : e.left + 40] = False
    fill = torch.tensor(FILL_COLOUR).view(3, 1)
    assert torch.equal(canvas[:, outside], fill.expand(3, int(outside.sum())))


@pytest.mark.parametrize("seed", range(10))
def test_train_transform_expansion_matches_the_literal_canvas(seed):
    # Expansion only: the output is the literal canvas resized, boxes move with the image.
    image, boxes, labels, difficult = random_sample(20 + seed)
    options = AugmentOptions(photometric=False, crop=False, flip=False)
    s = train_transform(image, boxes, labels, difficult, size=64, options=options, generator=gen(seed))
    h, w = image.shape[1:]
    e = sample_expansion(w, h, 4.0, gen(seed))  # the same first draws
    want = _resize(canvas_window(image, e), 64).int()
    assert (s.image.int() - want).abs().max() <= 1
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    offset, canvas = torch.tensor([e.left, e.top] * 2), torch.tensor([e.canvas_width, e.canvas_height] * 2)
    moved = (boxes.double() * scale + offset) / canvas
    torch.testing.assert_close(s.boxes, moved.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(30))
def test_resize_window_equals_resizing_the_literal_window(seed):
    g = gen(seed)
    image = torch.rand(3, 37, 50, generator=g) * 255
    cw, ch = 50 + int(torch.randint(0, 150, (), generator=g)), 37 + int(torch.randint(0, 110, (), generator=g))
    left, top = int(torch.randint(0, cw - 49, (), generator=g)), int(torch.randint(0, ch - 36, (), generator=g))
    e = Expansion(cw, ch, left, top)
    x0, y0 = int(torch.randint(0, cw - 1, (), generator=g)), int(torch.randint(0, ch - 1, (), generator=g))
    x1, y1 = int(torch.randint(x0 + 1, cw + 1, (), generator=g)), int(torch.randint(y0 + 1, ch + 1, (), generator=g))
    for size in (16, 61):
        fast = _resize_window(image, e, (x0, y0, x1, y1), size).int()
        slow = _resize(canvas_window(image, e, (x0, y0, x1, y1)), size).int()
        assert (fast - slow).abs().max() <= 1  # the same sample points; only float rounding differs


# ------------------------------------------------------------------------------------------ crop
def test_crop_geometry_and_kept_boxes():
    options_seen = set()
    for seed in range(150):
        g = gen(seed)
        w, h = int(torch.randint(30, 400, (), generator=g)), int(torch.randint(30, 400, (), generator=g))
        n = int(torch.randint(1, 6, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.5 + 1
        boxes_px = torch.cat([xy, xy + wh], dim=-1)
        choice = sample_crop(boxes_px, w, h, gen(seed))
        options_seen.add(choice.min_iou)
        if choice.window is None:
            assert choice.keep.all()
            continue
        x0, y0, x1, y1 = choice.window
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 >= math.floor(0.3 * w) - 1 and y1 - y0 >= math.floor(0.3 * h) - 1
        centres = (boxes_px[:, :2] + boxes_px[:, 2:]) / 2
        inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
        assert torch.equal(choice.keep, inside)
        assert choice.keep.any()
        window = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float64)
        assert box_iou(window, boxes_px.double()).max() >= choice.min_iou
    assert options_seen == set(CROP_MIN_IOUS)


def test_crop_gives_up_uncropped_when_no_trial_fits():
    # A 2 x 2 box in a 400 x 400 image: any crop of side >= 120 has IoU <= 4 / 14400 with it, so the
    # min-IoU options (0.1 .. 0.9) can never be met and the image must stay whole.
    boxes_px = torch.tensor([[100.0, 100.0, 102.0, 102.0]])
    constrained = 0
    for seed in range(40):
        choice = sample_crop(boxes_px, 400, 400, gen(seed))
        if choice.min_iou is not None and choice.min_iou > 0:
            assert choice.window is None and choice.keep.all()
            constrained += 1
    assert constrained > 0


@pytest.mark.parametrize("seed", range(15))
def test_train_transform_crop_keeps_centre_boxes_clipped(seed):
    image, boxes, labels, difficult = random_sample(40 + seed)
    if boxes.shape[0] == 0:
        return
    s = train_transform(image, boxes, labels, difficult, size=50, options=CROP_ONLY, generator=gen(seed))
    h, w = image.shape[1:]
    boxes_px = boxes.double() * torch.tensor([w, h, w, h])
    choice = sample_crop(boxes_px, w, h, gen(seed))  # the same draws
    x0, y0, x1, y1 = choice.window or (0, 0, w, h)
    kept = boxes_px[choice.keep]
    lo, hi = torch.tensor([x0, y0, x0, y0], dtype=torch.float64), torch.tensor([x1, y1, x1, y1], dtype=torch.float64)
    want = (torch.maximum(torch.minimum(kept, hi), lo) - lo) / (hi - lo)
    assert torch.equal(s.labels, labels[choice.keep]) and torch.equal(s.difficult, difficult[choice.keep])
    torch.testing.assert_close(s.boxes, want.float(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- photometric
def test_colour_matrix_properties():
    eye = torch.eye(3)
    torch.testing.assert_close(colour_matrix(1.0, 0.0), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(colour_matrix(1.0, 360.0), eye, atol=1e-5, rtol=0)
    luma = torch.tensor([[0.299, 0.587, 0.114]])
    grey = torch.ones(3, 1)
    for s, t in [(0.5, 0.0), (1.5, 18.0), (0.7, -12.0), (1.0, 90.0)]:
        m = colour_matrix(s, t)
        torch.testing.assert_close(luma @ m, luma, atol=1e-5, rtol=0)  # brightness (luma) preserved
        torch.testing.assert_close(m @ grey, grey, atol=1e-5, rtol=0)  # grey stays grey
        # Saturations multiply and hue angles add.
        torch.testing.assert_close(m @ colour_matrix(2.0, 10.0), colour_matrix(2 * s, t + 10), atol=1e-5, rtol=0)
    # Saturation 0 gives the greyscale image Y for every channel.
    torch.testing.assert_close(colour_matrix(0.0, 0.0), luma.expand(3, 3), atol=1e-5, rtol=0)


def test_photometric_distort_range_determinism_and_grey():
    g = gen(0)
    image = torch.randint(0, 256, (3, 20, 30), generator=g).float()
    before = image.clone()
    grey = torch.randint(0, 256, (1, 20, 30), generator=g).float().expand(3, -1, -1)
    changed = 0
    for seed in range(30):
        out = photometric_distort(image, gen(seed))
        assert torch.equal(image, before)  # input untouched
        assert out.shape == image.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 255
        assert torch.equal(out, photometric_distort(image, gen(seed)))
        changed += not torch.equal(out, image)
        g_out = photometric_distort(grey, gen(seed))  # saturation and hue leave grey pixels grey
        assert (g_out - g_out[:1]).abs().max() < 1e-3
    assert changed > 20  # all four steps skipped has probability 1/16


# ------------------------------------------------------------------------------- resize, normalise
def test_eval_transform_golden_bilinear():
    # Columns [0, 100] -> 4 columns. align_corners=False samples x = (i + 0.5) * 2 / 4 - 0.5 =
    # -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to column 1) -> 0, 25, 75, 100. Rows are constant.
    image = torch.tensor([[0, 100], [0, 100]], dtype=torch.uint8).expand(3, 2, 2).contiguous()
    out = eval_transform(image, 4)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 4)
    assert torch.equal(out, torch.tensor([0, 25, 75, 100], dtype=torch.uint8).expand(3, 4, 4))


def test_normalize_images():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=gen(0))
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    want = (images.float() / 255 - mean) / std
    got = normalize_images(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize_images(images.contiguous(memory_format=torch.channels_last)), want,
                               atol=1e-5, rtol=0)  # fmt: skip
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(images.float())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        normalize_images(images[0])


# ------------------------------------------------------------------------------------ validation
def test_bad_inputs_are_rejected():
    image, boxes, labels, difficult = random_sample(1)
    with pytest.raises(TypeError, match="uint8"):
        train_transform(image.float(), boxes, labels, difficult, size=32, options=ALL, generator=gen(0))
    with pytest.raises(ValueError, match="labels"):
        train_transform(image, boxes, labels[:0], difficult, size=32, options=ALL, generator=gen(0))
    with pytest.raises(TypeError, match="Generator"):
        train_transform(image, boxes, labels, difficult, size=32, options=ALL, generator=0)
    with pytest.raises(ValueError, match="size"):
        eval_transform(image, 0)
    with pytest.raises(ValueError, match="expand_max_ratio"):
        AugmentOptions(expand_max_ratio=0.5)
