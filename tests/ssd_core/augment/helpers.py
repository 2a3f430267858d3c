"""Shared inputs and checks of the augmentation tests."""

import torch

from ssd_core.augment import AugmentOptions, Sample

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


def crop_at_exactly_half_iou(monkeypatch):
    """A 128 x 128 image and draws (through ``torch.rand``, the planners' only source of numbers) whose first crop
    trial sits exactly on the crop rules' boundaries; the crop option is the only step on (``CROP_ONLY``).

    Draws: the option 0.5 -> index int(0.5 * 7) = 3, min IoU 0.5. Trial 0: width 128 (0.3 + 0.7 * 0.2915) =
    64.52, height 128 (0.3 + 0.7 * 0.999) = 127.91, corner (0, 0): window [0, 0, 64, 127] after flooring.
    The other 49 trials are [0, 0, 38, 38], far below IoU 0.5 with box 0 and away from its centre.
    Box 0, [0, 0, 127, 128] px: intersection 64 x 127 = 8128 = the window's area, union its own 16256, IoU
    exactly 0.5 = the option's minimum; centre (63.5, 64) strictly inside. Box 1, [60, 10, 68, 20] px: centre
    (64, 15) exactly on the window's right edge, so not inside. Expected with ">= min IoU" and "strictly
    inside": window (0, 0, 64, 127), box 0 kept and clipped to the whole output [0, 0, 1, 1], box 1 dropped.

    Returns (width, height, boxes, labels, difficult).
    """
    draws = torch.zeros(1 + 4 * 50, dtype=torch.float64)
    draws[0] = 0.5
    draws[1:5] = torch.tensor([0.2915, 0.999, 0.0, 0.0])

    def rand(*size, generator=None, dtype=None):
        (n,) = size
        return draws[:n].clone()

    monkeypatch.setattr(torch, "rand", rand)
    boxes = torch.tensor([[0.0, 0.0, 127.0, 128.0], [60.0, 10.0, 68.0, 20.0]]) / 128
    return 128, 128, boxes, torch.tensor([3, 4]), torch.tensor([False, True])
