"""ssd_core.augment.render: the output contract of train_transform, and the fast rendering (window-only
photometric, separable resize, reduced-resolution sources) against the literal chain of ssd_core.reference."""

import pytest
import torch
import torch.nn.functional as F

from ssd_core.augment import (
    FILL_COLOUR,
    AugmentOptions,
    Expansion,
    eval_transform,
    plan_augmentation,
    reduced_size,
    render_augmentation,
    sample_expansion,
    train_transform,
)
from ssd_core.augment.render import _resize_window
from ssd_core.reference import canvas_window, reference_resize, reference_train_transform
from tests.ssd_core.augment.helpers import ALL, FLIP_ONLY, NONE, assert_valid, gen, random_sample


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


PALETTE = torch.tensor(
    [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [255, 0, 255],
        [0, 255, 255],
        [255, 255, 255],
        [128, 0, 0],
        [0, 128, 0],
        [0, 0, 128],
        [128, 128, 0],
        [0, 128, 128],
    ],
    dtype=torch.uint8,
)


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


@pytest.mark.parametrize("seed", range(10))
def test_train_transform_expansion_matches_the_literal_canvas(seed):
    # Expansion only: the output is the literal canvas resized, boxes move with the image.
    image, boxes, labels, difficult = random_sample(20 + seed)
    options = AugmentOptions(photometric=False, crop=False, flip=False)
    s = train_transform(image, boxes, labels, difficult, size=64, options=options, generator=gen(seed))
    h, w = image.shape[1:]
    e = sample_expansion(w, h, 4.0, gen(seed))  # the same first draws
    want = reference_resize(canvas_window(image, e), 64).int()
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
        slow = reference_resize(canvas_window(image, e, (x0, y0, x1, y1)), size).int()
        assert (fast - slow).abs().max() <= 1  # the same sample points; only float rounding differs


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
    window = (
        x0,
        y0,
        x0 + 5 + int(torch.randint(0, 90 - x0 - 4, (), generator=g)),
        y0 + 5 + int(torch.randint(0, 60 - y0 - 4, (), generator=g)),
    )
    want = reference_resize(canvas_window(base, e, window), 23).int()
    for image in (
        base,
        base.float(),
        base.permute(1, 2, 0).contiguous().permute(2, 0, 1),
        torch.cat([base, base], 2)[:, :, :45],
    ):
        assert ((_resize_window(image, e, window, 23).int() - want).abs() <= 1).all()


def test_eval_transform_golden_bilinear():
    # Columns [0, 100] -> 4 columns. align_corners=False samples x = (i + 0.5) * 2 / 4 - 0.5 =
    # -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to column 1) -> 0, 25, 75, 100. Rows are constant.
    image = torch.tensor([[0, 100], [0, 100]], dtype=torch.uint8).expand(3, 2, 2).contiguous()
    out = eval_transform(image, 4)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 4)
    assert torch.equal(out, torch.tensor([0, 25, 75, 100], dtype=torch.uint8).expand(3, 4, 4))


def test_eval_transform_matches_interpolate():
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen(1))
    for size in (8, 32, 64, 100):
        want = F.interpolate(image.float()[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        assert ((eval_transform(image, size).int() - want.round().int()).abs() <= 1).all()


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
    slow = reference_train_transform(image, boxes, labels, difficult, size=size, options=options, generator=gen(seed))
    assert torch.equal(fast.boxes, slow.boxes)
    assert torch.equal(fast.labels, slow.labels) and torch.equal(fast.difficult, slow.difficult)
    diff = (fast.image.int() - slow.image.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert fast.image.is_contiguous()


def natural_image(seed, height, width):
    """A photo-like test image: a smooth colour field, mild pixel noise (what survives JPEG) and a few flat
    objects with hard edges."""
    g = gen(seed)
    field = F.interpolate(
        torch.rand(1, 3, 5, 7, generator=g) * 255, size=(height, width), mode="bicubic", align_corners=False
    )[0]
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


def smooth_image(seed, height, width):
    """A smooth colour field only (gradients of ~3 grey levels per pixel): any misplaced sample shows."""
    g = gen(seed)
    field = F.interpolate(
        torch.rand(1, 3, 5, 7, generator=g) * 255, size=(height, width), mode="bicubic", align_corners=False
    )[0]
    return field.round().clamp(0, 255).to(torch.uint8)


def largest_reduction(plan, size):
    """The largest r in 8, 4, 2 with the window at least ``r * size`` on both sides (else 1): the condition for
    rendering from a source reduced by r (``pipeline.shards.jpeg.decode_reduction`` chooses the same way)."""
    x0, y0, x1, y1 = plan.window
    return next((r for r in (8, 4, 2) if min(x1 - x0, y1 - y0) >= r * size), 1)


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
        r = largest_reduction(plan, size)
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
        render_augmentation(image, plan, 16, reduction=0)
    with pytest.raises(ValueError, match="image size"):
        plan_augmentation(0, 64, *empty, options=NONE, generator=gen(0))


def test_any_integer_reduction_samples_the_same_positions():
    # Nothing in the resampler is specific to the powers of two a JPEG decoder offers: a source reduced by 3
    # (ceil(470 / 3) x ceil(330 / 3) = 157 x 110, the last block partial) gives the full-resolution result on
    # a smooth field up to rounding, like 2, 4 and 8 above.
    smooth = smooth_image(3, 330, 470)
    empty = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    plan = plan_augmentation(470, 330, *empty, options=NONE, generator=gen(0))
    source = block_mean(smooth, 3)
    assert source.shape == (3, 110, 157)
    full = render_augmentation(smooth, plan, 96).float()
    assert (full - render_augmentation(source, plan, 96, reduction=3).float()).abs().mean() < 0.5
