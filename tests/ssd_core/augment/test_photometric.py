"""ssd_core.augment.photometric: colour matrix properties, hand-computed steps, and drawing apart from applying."""

import pytest
import torch

from ssd_core.augment import (
    PHOTOMETRIC_DRAWS,
    PhotometricParams,
    apply_photometric,
    colour_matrix,
    photometric_distort,
    photometric_from_uniforms,
    sample_photometric,
)
from tests.ssd_core.augment.helpers import gen


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


def test_photometric_is_per_pixel_so_any_region_gets_the_same_values():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=gen(2))
    hwc = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for seed in range(20):
        params = sample_photometric(gen(seed), channel_swap=True)
        whole = apply_photometric(image, params)
        torch.testing.assert_close(whole, apply_photometric(image.float(), params), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            whole[:, 5:31, 7:44], apply_photometric(hwc[:, 5:31, 7:44], params), rtol=0, atol=1e-4
        )
        torch.testing.assert_close(
            whole, photometric_distort(image.float(), gen(seed), channel_swap=True), rtol=0, atol=1e-4
        )


def test_photometric_steps_and_orders_by_hand():
    # Golden values: pixel (R, G, B) = (200, 100, 50); brightness +40 -> (240, 140, 90) ; contrast 1.5 ->
    # (360 -> 255, 210, 135) when first; after: ((240, 140, 90) * 1.5 -> 255, 210, 135) too without colour.
    image = torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1)
    ident = torch.eye(3)
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
