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
