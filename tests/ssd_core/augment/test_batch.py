"""ssd_core.augment.batch: a batch planned at once gives exactly the plans of ssd_core.augment.plan, one by one."""

import pytest
import torch

from ssd_core.augment import AugmentOptions, plan_augmentation, plan_augmentations
from tests.ssd_core.augment.helpers import ALL, CROP_ONLY, FLIP_ONLY, NONE, crop_at_exactly_half_iou, gen


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


@pytest.mark.parametrize(
    "options",
    [
        ALL,
        AugmentOptions(channel_swap=True),
        AugmentOptions(expand_max_ratio=1.0),
        CROP_ONLY,
        FLIP_ONLY,
        NONE,
        AugmentOptions(photometric=False, expand=True, crop=False, flip=False),
        AugmentOptions(crop=False),
    ],
)
def test_a_batch_is_planned_exactly_as_one_image_at_a_time(options):
    # The vectorised planner pads the batch's boxes and computes every image's crop trials together; each
    # plan must still be the one-image plan, field for field and bit for bit, whatever else is in the batch.
    for seed in range(12):
        sizes, boxes, labels, difficult = batch_of_targets(seed)
        seeds = [seed * 1000 + i for i in range(len(sizes))]
        together = plan_augmentations(
            sizes, boxes, labels, difficult, options=options, generators=[gen(s) for s in seeds]
        )
        for i, plan in enumerate(together):
            alone = plan_augmentation(
                *sizes[i], boxes[i], labels[i], difficult[i], options=options, generator=gen(seeds[i])
            )
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


def test_crop_rules_at_exactly_their_boundaries(monkeypatch):
    # The case of test_plan.py's test of the same name, planned as a batch (random batches almost never land
    # exactly on a boundary, so the equality test above would not notice a ">" for a ">=").
    width, height, boxes, labels, difficult = crop_at_exactly_half_iou(monkeypatch)
    plan, empty = plan_augmentations(
        [(width, height)] * 2,
        [boxes, boxes[:0]],
        [labels, labels[:0]],
        [difficult, difficult[:0]],
        options=CROP_ONLY,
        generators=[gen(0), gen(1)],
    )
    assert plan.window == (0, 0, 64, 127)
    assert plan.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]] and plan.labels.tolist() == [3]
    assert empty.window == (0, 0, 64, 127)  # without boxes, no IoU or centre constraint: the first trial
