"""ssd_core.augment.normalize: the model input normalisation."""

import pytest
import torch

from ssd_core.augment import IMAGE_MEAN, IMAGE_STD, normalize_images
from tests.ssd_core.augment.helpers import gen


def test_normalize_images():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=gen(0))
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    want = (images.float() / 255 - mean) / std
    got = normalize_images(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        normalize_images(images.contiguous(memory_format=torch.channels_last)), want, atol=1e-5, rtol=0
    )
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(images.float())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        normalize_images(images[0])
