"""SSD augmentation: output contract, determinism, the geometry of each step checked directly, and the fast
rendering (window-only photometric, separable resize, reduced-resolution sources) against the literal chain."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssd_core.boxes import box_iou
from ssd_core.photometric import (
    PHOTOMETRIC_DRAWS,
    apply_photometric,
    colour_matrix,
    photometric_distort,
    photometric_from_uniforms,
    sample_photometric,
)
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
    decode_reduction,
    eval_transform,
    normalize_images,
    plan_augmentation,
    plan_augmentations,
    reduced_size,
    render_augmentation,
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


# ------------------------------------------------------------------- fast rendering vs the literal chain
def literal_train_transform(image, boxes, labels, difficult, *, size, options, generator):
    """The chain written out literally (the slow reference): photometric on the whole image in float, the whole
    zoom-out canvas built, the crop window cut out of it and resized with ``interpolate``, then the flip.
    Draws the same numbers in the same order as the module docstring says."""
    height, width = image.shape[1:]
    x = image.float()
    if options.photometric:
        x = photometric_distort(x, generator, channel_swap=options.channel_swap)
    e = Expansion(width, height, 0, 0)
    if options.expand:
        e = sample_expansion(width, height, options.expand_max_ratio, generator)
    boxes_px = boxes.double() * torch.tensor([width, height] * 2) + torch.tensor([e.left, e.top] * 2)
    window, keep = (0, 0, e.canvas_width, e.canvas_height), torch.ones(len(boxes), dtype=torch.bool)
    if options.crop:
        choice = sample_crop(boxes_px, e.canvas_width, e.canvas_height, generator)
        if choice.window is not None:
            window, keep = choice.window, choice.keep
    x0, y0, x1, y1 = window
    out = _resize(canvas_window(x, e)[:, y0:y1, x0:x1], size)
    lo, hi = torch.tensor([x0, y0] * 2, dtype=torch.float64), torch.tensor([x1, y1] * 2, dtype=torch.float64)
    out_boxes = ((torch.minimum(torch.maximum(boxes_px[keep], lo), hi) - lo) / (hi - lo)).float()
    if options.flip and float(torch.rand((), generator=generator, dtype=torch.float64)) < 0.5:
        out = out.flip(-1)
        out_boxes = torch.stack((1 - out_boxes[:, 2], out_boxes[:, 1], 1 - out_boxes[:, 0], out_boxes[:, 3]), -1)
    out_boxes = out_boxes.clamp(0, 1)
    good = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
    return Sample(out, out_boxes[good], labels[keep][good], difficult[keep][good])


@pytest.mark.parametrize("seed", range(24))
def test_train_transform_equals_the_literal_chain(seed):
    # Photometric only inside the window and the separable resize read the same pixels with the same weights
    # as the literal chain; only float rounding differs (at most 1 grey level, rarely).
    image, boxes, labels, difficult = random_sample(100 + seed)
    if seed % 2:  # HWC memory, as decoders hand it over
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    options = AugmentOptions(channel_swap=seed % 3 == 0)
    size = 72 if seed % 4 else 160  # down- and upscaling
    fast = train_transform(image, boxes, labels, difficult, size=size, options=options, generator=gen(seed))
    slow = literal_train_transform(image, boxes, labels, difficult, size=size, options=options, generator=gen(seed))
    assert torch.equal(fast.boxes, slow.boxes)
    assert torch.equal(fast.labels, slow.labels) and torch.equal(fast.difficult, slow.difficult)
    diff = (fast.image.int() - slow.image.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert fast.image.is_contiguous()


def test_plan_is_the_geometry_and_render_the_pixels():
    image, boxes, labels, difficult = random_sample(6)
    h, w = image.shape[1:]
    plan = plan_augmentation(w, h, boxes, labels, difficult, options=ALL, generator=gen(5))
    sample = train_transform(image, boxes, labels, difficult, size=40, options=ALL, generator=gen(5))
    assert torch.equal(plan.boxes, sample.boxes) and torch.equal(plan.labels, sample.labels)
    assert torch.equal(render_augmentation(image, plan, 40), sample.image)
    # The plan draws everything: photometric 11, expansion 4, crop 1 + 4 x 50, flip 1.
    g = gen(5)
    plan_augmentation(w, h, boxes, labels, difficult, options=ALL, generator=g)
    reference = gen(5)
    torch.rand(PHOTOMETRIC_DRAWS + 4 + 1 + 4 * 50 + 1, generator=reference, dtype=torch.float64)
    assert torch.equal(g.get_state(), reference.get_state())


def assert_same_plan(a, b):
    assert (a.width, a.height, a.expansion, a.window, a.flip) == (b.width, b.height, b.expansion, b.window, b.flip)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels) and torch.equal(a.difficult, b.difficult)
    assert (a.photometric is None) == (b.photometric is None)
    if a.photometric is not None:
        assert a.photometric[:3] == b.photometric[:3] and a.photometric.channel_order == b.photometric.channel_order
        assert (a.photometric.colour is None) == (b.photometric.colour is None)
        assert a.photometric.colour is None or torch.equal(a.photometric.colour, b.photometric.colour)


def batch_of_targets(seed):
    """Sizes and boxes of 1..40 images: 0..8 boxes each, some tiny, some degenerate or non-finite."""
    g = gen(seed)
    sizes, boxes, labels, difficult = [], [], [], []
    for _ in range(int(torch.randint(1, 41, (), generator=g))):
        sizes.append((int(torch.randint(8, 700, (), generator=g)), int(torch.randint(8, 700, (), generator=g))))
        n = int(torch.randint(0, 9, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.9
        wh = torch.rand(n, 2, generator=g) * (1 - xy) * (0.03 if n % 3 == 0 else 1.0) + 1e-4
        b = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)
        if n and bool(torch.rand((), generator=g) < 0.15):
            b[0, 2] = b[0, 0]  # zero width
        if n > 1 and bool(torch.rand((), generator=g) < 0.1):
            b[1, 3] = float("nan")
        boxes.append(b)
        labels.append(torch.randint(1, 21, (n,), generator=g))
        difficult.append(torch.rand(n, generator=g) < 0.3)
    return sizes, boxes, labels, difficult


@pytest.mark.parametrize("options", [
    ALL, AugmentOptions(channel_swap=True), AugmentOptions(expand_max_ratio=1.0), CROP_ONLY, FLIP_ONLY, NONE,
    AugmentOptions(photometric=False, expand=True, crop=False, flip=False), AugmentOptions(crop=False),
])  # fmt: skip
def test_a_batch_is_planned_exactly_as_one_image_at_a_time(options):
    # The vectorised planner pads the batch's boxes and computes every image's crop trials together; each
    # plan must still be the one-image plan, field for field and bit for bit, whatever else is in the batch.
    for seed in range(12):
        sizes, boxes, labels, difficult = batch_of_targets(seed)
        seeds = [seed * 1000 + i for i in range(len(sizes))]
        together = plan_augmentations(sizes, boxes, labels, difficult, options=options,
                                      generators=[gen(s) for s in seeds])
        for i, plan in enumerate(together):
            alone = plan_augmentation(*sizes[i], boxes[i], labels[i], difficult[i], options=options,
                                      generator=gen(seeds[i]))
            assert_same_plan(plan, alone)
        # and the generators are left where one-image planning leaves them
        g_batch, g_alone = gen(seeds[0]), gen(seeds[0])
        plan_augmentations(sizes[:1], boxes[:1], labels[:1], difficult[:1], options=options, generators=[g_batch])
        plan_augmentation(*sizes[0], boxes[0], labels[0], difficult[0], options=options, generator=g_alone)
        assert torch.equal(g_batch.get_state(), g_alone.get_state())


def test_a_batch_plan_checks_its_inputs():
    sizes, boxes, labels, difficult = batch_of_targets(3)
    generators = [gen(i) for i in range(len(sizes))]
    assert plan_augmentations([], [], [], [], options=ALL, generators=[]) == []
    with pytest.raises(ValueError, match="as many"):
        plan_augmentations(sizes, boxes[:-1], labels, difficult, options=ALL, generators=generators)
    with pytest.raises(TypeError, match="Generator"):
        plan_augmentations(sizes, boxes, labels, difficult, options=ALL, generators=[0] * len(sizes))
    with pytest.raises(ValueError, match="positive ints"):
        plan_augmentations([(0, 5)] + sizes[1:], boxes, labels, difficult, options=ALL, generators=generators)
    with pytest.raises(ValueError, match="labels"):
        plan_augmentations(sizes, boxes, [x[:0] for x in labels], difficult, options=ALL, generators=generators)


def test_window_on_the_fill_only_gives_the_fill_colour():
    image = torch.full((3, 10, 10), 7, dtype=torch.uint8)
    e = Expansion(40, 40, 30, 30)  # image in the bottom-right corner
    out = _resize_window(image, e, (0, 0, 20, 20), 8)
    assert torch.equal(out, torch.tensor(FILL_COLOUR).round().to(torch.uint8).view(3, 1, 1).expand(3, 8, 8))


@pytest.mark.parametrize("seed", range(12))
def test_resize_window_any_input_layout(seed):
    # uint8 or float, contiguous, HWC memory or a strided view: the same result as the literal window.
    g = gen(seed)
    base = torch.randint(0, 256, (3, 30, 45), dtype=torch.uint8, generator=g)
    e = Expansion(90, 60, int(torch.randint(0, 46, (), generator=g)), int(torch.randint(0, 31, (), generator=g)))
    x0, y0 = int(torch.randint(0, 60, (), generator=g)), int(torch.randint(0, 40, (), generator=g))
    window = (x0, y0, x0 + 5 + int(torch.randint(0, 90 - x0 - 4, (), generator=g)),
              y0 + 5 + int(torch.randint(0, 60 - y0 - 4, (), generator=g)))
    want = _resize(canvas_window(base, e, window), 23).int()
    for image in (base, base.float(), base.permute(1, 2, 0).contiguous().permute(2, 0, 1),
                  torch.cat([base, base], 2)[:, :, :45]):
        assert ((_resize_window(image, e, window, 23).int() - want).abs() <= 1).all()


def test_eval_transform_matches_interpolate():
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen(1))
    for size in (8, 32, 64, 100):
        want = F.interpolate(image.float()[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        assert ((eval_transform(image, size).int() - want.round().int()).abs() <= 1).all()


def test_photometric_is_per_pixel_so_any_region_gets_the_same_values():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=gen(2))
    hwc = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for seed in range(20):
        params = sample_photometric(gen(seed), channel_swap=True)
        whole = apply_photometric(image, params)
        torch.testing.assert_close(whole, apply_photometric(image.float(), params), rtol=0, atol=1e-4)
        torch.testing.assert_close(whole[:, 5:31, 7:44], apply_photometric(hwc[:, 5:31, 7:44], params),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(whole, photometric_distort(image.float(), gen(seed), channel_swap=True),
                                   rtol=0, atol=1e-4)


def test_photometric_steps_and_orders_by_hand():
    # Golden values: pixel (R, G, B) = (200, 100, 50); brightness +40 -> (240, 140, 90) ; contrast 1.5 ->
    # (360 -> 255, 210, 135) when first; after: ((240, 140, 90) * 1.5 -> 255, 210, 135) too without colour.
    image = torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1)
    ident = torch.eye(3)
    from ssd_core.photometric import PhotometricParams

    first = apply_photometric(image, PhotometricParams(40.0, 1.5, True, None, None))
    assert first.flatten().tolist() == [255.0, 210.0, 135.0]
    # The two orders differ once a step clamps: grey-out (saturation 0) of (255, 210, 135) gives the luma
    # 0.299 * 255 + 0.587 * 210 + 0.114 * 135 = 214.905 for every channel; with contrast after, the luma of
    # (240, 140, 90) is 164.2, times 1.5 = 246.3.
    grey = colour_matrix(0.0, 0.0)
    a = apply_photometric(image, PhotometricParams(40.0, 1.5, True, grey, None)).flatten()
    b = apply_photometric(image, PhotometricParams(40.0, 1.5, False, grey, None)).flatten()
    torch.testing.assert_close(a, torch.full((3,), 214.905), rtol=0, atol=1e-3)
    torch.testing.assert_close(b, torch.full((3,), 246.3), rtol=0, atol=1e-3)
    swapped = apply_photometric(image, PhotometricParams(None, None, True, ident, (2, 0, 1))).flatten()
    assert swapped.tolist() == [50.0, 200.0, 100.0]


def test_photometric_steps_follow_the_draws():
    # sample_photometric is photometric_from_uniforms of its 11 draws; each step is on when its draw < 1/2.
    for seed in range(10):
        draws = torch.rand(PHOTOMETRIC_DRAWS, generator=gen(seed), dtype=torch.float64).tolist()
        a, b = sample_photometric(gen(seed), channel_swap=True), photometric_from_uniforms(draws, channel_swap=True)
        assert a[:3] == b[:3] and a.channel_order == b.channel_order
        assert (a.colour is None) == (b.colour is None) and (a.colour is None or torch.equal(a.colour, b.colour))
    off = photometric_from_uniforms([0.9] * PHOTOMETRIC_DRAWS, channel_swap=True)
    assert off.is_identity
    on = photometric_from_uniforms([0.25, 1.0, 0.0, 0.25, 0.0, 0.25, 1.0, 0.25, 0.5, 0.25, 0.99], channel_swap=True)
    assert on.brightness == 32.0 and on.contrast == 0.5 and on.contrast_first and on.channel_order == (2, 1, 0)
    torch.testing.assert_close(on.colour, colour_matrix(1.5, 0.0))
    with pytest.raises(ValueError, match="11 numbers"):
        photometric_from_uniforms([0.5] * 3)


# ----------------------------------------------------------------- reduced-resolution sources
def natural_image(seed, height, width):
    """A photo-like test image: a smooth colour field, mild pixel noise (what survives JPEG) and a few flat
    objects with hard edges."""
    g = gen(seed)
    field = F.interpolate(torch.rand(1, 3, 5, 7, generator=g) * 255, size=(height, width), mode="bicubic",
                          align_corners=False)[0]
    image = field + torch.randn(3, height, width, generator=g) * 1.5
    for _ in range(5):
        x0, y0 = (int(torch.randint(0, side - 20, (), generator=g)) for side in (width, height))
        x1 = x0 + int(torch.randint(8, width - x0, (), generator=g))
        y1 = y0 + int(torch.randint(8, height - y0, (), generator=g))
        image[:, y0:y1, x0:x1] = torch.rand(3, 1, 1, generator=g) * 255
    return image.round().clamp(0, 255).to(torch.uint8)


def block_mean(image, r):
    """The image at 1/r as a JPEG decoder's DCT scaling gives it, approximately: each r x r block averaged
    (edge blocks padded by repeating the last row/column, as JPEG pads partial blocks)."""
    h, w = image.shape[1:]
    rw, rh = reduced_size(w, h, r)
    padded = F.pad(image.float()[None], (0, rw * r - w, 0, rh * r - h), mode="replicate")
    return F.avg_pool2d(padded, r)[0].round().to(torch.uint8)


def test_decode_reduction_rule():
    boxes, labels, difficult = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    seen = set()
    for seed in range(200):
        plan = plan_augmentation(500, 400, boxes, labels, difficult, options=ALL, generator=gen(seed))
        r = decode_reduction(plan, 100)
        x0, y0, x1, y1 = plan.window
        side = min(x1 - x0, y1 - y0)
        assert side >= r * 100 and (r == 8 or side < 2 * r * 100)  # the largest power of two that fits, up to 8
        seen.add(r)
    assert seen == {1, 2, 4, 8}
    assert reduced_size(650, 417, 4) == (163, 105) and reduced_size(8, 8, 8) == (1, 1)


def smooth_image(seed, height, width):
    """A smooth colour field only (gradients of ~3 grey levels per pixel): any misplaced sample shows."""
    g = gen(seed)
    field = F.interpolate(torch.rand(1, 3, 5, 7, generator=g) * 255, size=(height, width), mode="bicubic",
                          align_corners=False)[0]
    return field.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_reduced_source_is_aligned_and_close(seed):
    # With a reduced source the output samples the same canvas positions: on a smooth field the result is
    # the full-resolution one up to rounding (a shift of half a reduced pixel would cost ~5 grey levels).
    # On a photo-like image it is close, and closer to a properly filtered (antialiased) resize of the window
    # than the full-resolution bilinear resize, which reads 2 x 2 pixels and skips the rest (aliasing).
    smooth, natural = smooth_image(seed, 330, 470), natural_image(seed, 330, 470)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.45, 0.3, 0.95, 0.9]])
    labels, difficult = torch.tensor([3, 4]), torch.tensor([False, True])
    size, options, reduced = 96, AugmentOptions(photometric=seed % 2 == 0), 0
    for draw in range(6):
        plan = plan_augmentation(470, 330, boxes, labels, difficult, options=options, generator=gen(seed * 100 + draw))
        r = decode_reduction(plan, size)
        if r == 1:
            continue
        reduced += 1
        full = render_augmentation(smooth, plan, size).float()
        assert (full - render_augmentation(block_mean(smooth, r), plan, size, reduction=r).float()).abs().mean() < 0.5
        if plan.photometric is not None:
            continue  # the filtered reference below has no photometric step
        full = render_augmentation(natural, plan, size).float()
        small = render_augmentation(block_mean(natural, r), plan, size, reduction=r).float()
        window = canvas_window(natural, plan.expansion, plan.window)
        ideal = F.interpolate(window[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        ideal = ideal.flip(-1) if plan.flip else ideal
        assert (full - small).abs().mean() < 3.0  # grey levels
        assert (small - ideal).abs().mean() <= (full - ideal).abs().mean() + 0.25
    assert reduced > 0


def test_reduced_render_checks_the_source_size():
    image = natural_image(0, 64, 96)
    empty = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    plan = plan_augmentation(96, 64, *empty, options=NONE, generator=gen(0))
    assert render_augmentation(block_mean(image, 2), plan, 16, reduction=2).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="48x32"):
        render_augmentation(image, plan, 16, reduction=2)
    with pytest.raises(ValueError, match="reduction"):
        render_augmentation(image, plan, 16, reduction=3)
    with pytest.raises(ValueError, match="image size"):
        plan_augmentation(0, 64, *empty, options=NONE, generator=gen(0))
