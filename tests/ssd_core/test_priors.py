"""ssd_core.priors: counts, hand-derived values, the Caffe PriorBox layer as reference, the paper's formula."""

import math

import numpy as np
import pytest
import torch

from ssd_core.priors import (
    PRIOR_PRESETS,
    SSD300_COCO,
    SSD300_VOC,
    SSD512_COCO,
    SSD512_VOC,
    PriorSpec,
    generate_priors,
)


def caffe_prior_box(spec: PriorSpec) -> np.ndarray:
    """The original Caffe ``PriorBoxLayer::Forward_cpu`` (weiliu89/caffe, ssd branch), transcribed loop for loop.

    Caffe works in float32 and writes corners (xmin, ymin, xmax, ymax) normalised by the image size; its
    aspect-ratio list is [1, ar1, 1/ar1, ar2, 1/ar2, ...] (flip=true) and ratio 1 is skipped in the loop
    because the min and max squares cover it. Offset 0.5, no clipping in the SSD models.
    """
    f32 = np.float32
    out = []
    img = f32(spec.image_size)
    for fmap, step, min_size, max_size, ratios in zip(
        spec.feature_maps, spec.steps, spec.min_sizes, spec.max_sizes, spec.aspect_ratios, strict=True
    ):
        aspect_ratios = [1.0]
        for ar in ratios:
            aspect_ratios += [ar, 1.0 / ar]
        min_size, max_size, step = f32(min_size), f32(max_size), f32(step)
        for h in range(fmap):
            for w in range(fmap):
                center_x = (f32(w) + f32(0.5)) * step
                center_y = (f32(h) + f32(0.5)) * step
                sides = [(min_size, min_size)]
                side = f32(math.sqrt(min_size * max_size))
                sides.append((side, side))
                for ar in aspect_ratios:
                    if abs(ar - 1.0) < 1e-6:
                        continue
                    sides.append((min_size * f32(math.sqrt(ar)), min_size / f32(math.sqrt(ar))))
                for box_width, box_height in sides:
                    out.append(
                        [
                            (center_x - box_width / f32(2)) / img,
                            (center_y - box_height / f32(2)) / img,
                            (center_x + box_width / f32(2)) / img,
                            (center_y + box_height / f32(2)) / img,
                        ]
                    )
    return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize(
    ("spec", "count"),
    [
        # 38*38*4 + 19*19*6 + 10*10*6 + 5*5*6 + 3*3*4 + 1*1*4 = 5776 + 2166 + 600 + 150 + 36 + 4
        (SSD300_VOC, 8732),
        (SSD300_COCO, 8732),
        # 64*64*4 + 32*32*6 + 16*16*6 + 8*8*6 + 4*4*6 + 2*2*4 + 1*1*4 = 16384 + 6144 + 1536 + 384 + 96 + 16 + 4
        (SSD512_VOC, 24564),
        (SSD512_COCO, 24564),
    ],
)
def test_prior_counts(spec, count):
    priors = generate_priors(spec)
    assert priors.shape == (count, 4)
    assert spec.num_priors == count
    assert priors.dtype == torch.float32


def test_presets_are_registered():
    assert PRIOR_PRESETS == {
        "ssd300_voc": SSD300_VOC,
        "ssd300_coco": SSD300_COCO,
        "ssd512_voc": SSD512_VOC,
        "ssd512_coco": SSD512_COCO,
    }


def test_ssd300_voc_values_derived_by_hand():
    priors = generate_priors(SSD300_VOC).double()
    r2 = math.sqrt(2)
    expected = {
        # Level 1 (38x38, step 8, min 30, max 60), cell (row 0, col 0): centre 0.5 * 8 / 300 = 0.013333.
        # Order at a location: min square 30/300; sqrt(30*60)/300 = 0.141421; ar 2: (30*sqrt2, 30/sqrt2)/300; flip.
        0: (0.5 * 8 / 300, 0.5 * 8 / 300, 0.1, 0.1),
        1: (0.5 * 8 / 300, 0.5 * 8 / 300, math.sqrt(30 * 60) / 300, math.sqrt(30 * 60) / 300),
        2: (0.5 * 8 / 300, 0.5 * 8 / 300, 30 * r2 / 300, 30 / r2 / 300),
        3: (0.5 * 8 / 300, 0.5 * 8 / 300, 30 / r2 / 300, 30 * r2 / 300),
        # 4 boxes per location, columns vary fastest: prior 4 is (row 0, col 1), cx = 1.5 * 8 / 300 = 0.04.
        4: (1.5 * 8 / 300, 0.5 * 8 / 300, 0.1, 0.1),
        # Prior 4 * 38 = 152 starts row 1: cx back to 0.013333, cy = 0.04.
        152: (0.5 * 8 / 300, 1.5 * 8 / 300, 0.1, 0.1),
        # Level 3 (10x10, step 32 - not 300/10 = 30) starts after 5776 + 2166 = 7942: centre 16/300 = 0.053333,
        # min 111 -> 0.37; its ratios are (2, 3), so after the two squares come ar 2, 1/2, then ar 3:
        7942: (16 / 300, 16 / 300, 111 / 300, 111 / 300),
        7946: (16 / 300, 16 / 300, 111 * math.sqrt(3) / 300, 111 / math.sqrt(3) / 300),
        # Level 5 (3x3, step 100, min 213, max 264) starts after 7942 + 600 + 150 = 8692: centre 50/300 = 1/6.
        8692: (50 / 300, 50 / 300, 213 / 300, 213 / 300),
        8693: (50 / 300, 50 / 300, math.sqrt(213 * 264) / 300, math.sqrt(213 * 264) / 300),  # 0.790443
        8694: (50 / 300, 50 / 300, 213 * r2 / 300, 213 / r2 / 300),  # 1.004092 wide: not clipped in Caffe
        # Next location (row 0, col 1) of the 3x3 map: cx = 150/300 = 0.5.
        8696: (150 / 300, 50 / 300, 213 / 300, 213 / 300),
        # Last location (row 2, col 2) of the 3x3 map: 8692 + 8 * 4 = 8724, centre 250/300.
        8724: (250 / 300, 250 / 300, 213 / 300, 213 / 300),
        # Level 6 (1x1, step 300, min 264, max 315): centre 0.5; 264/300 = 0.88; sqrt(264*315)/300 = 0.961249.
        8728: (0.5, 0.5, 0.88, 0.88),
        8729: (0.5, 0.5, math.sqrt(264 * 315) / 300, math.sqrt(264 * 315) / 300),
    }
    for index, values in expected.items():
        torch.testing.assert_close(priors[index], torch.tensor(values, dtype=torch.float64), atol=1e-6, rtol=0)


def test_ssd512_values_derived_by_hand():
    priors = generate_priors(SSD512_VOC).double()
    expected = {
        # Level 1 (64x64, step 8, min 35.84 = 7% of 512, max 76.8): centre 4/512, side 35.84/512 = 0.07.
        0: (4 / 512, 4 / 512, 0.07, 0.07),
        1: (4 / 512, 4 / 512, math.sqrt(35.84 * 76.8) / 512, math.sqrt(35.84 * 76.8) / 512),  # 0.102470
        # Level 6 (2x2, step 256, min 384, max 460.8, ratio 2) starts at 24564 - 4 - 16 = 24544: centre 128/512.
        24544: (0.25, 0.25, 0.75, 0.75),
        24545: (0.25, 0.25, math.sqrt(384 * 460.8) / 512, math.sqrt(384 * 460.8) / 512),  # 0.821584
        # Level 7 (1x1, step 512, min 460.8, max 537.6): the last 4 priors, centre 0.5, side 0.9 and 0.972111.
        24560: (0.5, 0.5, 0.9, 0.9),
        24561: (0.5, 0.5, math.sqrt(460.8 * 537.6) / 512, math.sqrt(460.8 * 537.6) / 512),
    }
    for index, values in expected.items():
        torch.testing.assert_close(priors[index], torch.tensor(values, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", [SSD300_VOC, SSD300_COCO, SSD512_VOC, SSD512_COCO], ids=lambda s: str(s.image_size))
def test_presets_equal_the_caffe_prior_box_layer(spec):
    priors = generate_priors(spec)
    x1y1 = priors[:, :2] - priors[:, 2:] / 2
    x2y2 = priors[:, :2] + priors[:, 2:] / 2
    ours = torch.cat((x1y1, x2y2), dim=1).numpy()
    np.testing.assert_allclose(ours, caffe_prior_box(spec), atol=2e-6, rtol=0)


def test_from_scales_reproduces_the_papers_formula():
    # s_k = 0.2 + (0.9 - 0.2)(k - 1)/(6 - 1): 0.2, 0.34, 0.48, 0.62, 0.76, 0.9, and one step on: 1.04.
    spec = PriorSpec.from_scales(300, (38, 19, 10, 5, 3, 1), ((2,),) * 6)
    scales = [0.2, 0.34, 0.48, 0.62, 0.76, 0.9, 1.04]
    np.testing.assert_allclose(spec.min_sizes, [s * 300 for s in scales[:6]], rtol=1e-12)
    np.testing.assert_allclose(spec.max_sizes, [s * 300 for s in scales[1:]], rtol=1e-12)
    np.testing.assert_allclose(spec.steps, [300 / f for f in (38, 19, 10, 5, 3, 1)], rtol=1e-12)
    # The generated priors carry those scales: level 3's first prior is a 0.48 square at (0.5/10, 0.5/10).
    priors = generate_priors(spec).double()
    first_of_level_3 = 38 * 38 * 4 + 19 * 19 * 4
    torch.testing.assert_close(priors[first_of_level_3], torch.tensor([0.05, 0.05, 0.48, 0.48], dtype=torch.float64))


def test_from_scales_with_a_smaller_first_scale():
    # conv4_3 gets 0.1 (paired with s_min = 0.2); the rule spreads 0.2..0.9 over the other 5 levels:
    # 0.2 + 0.7 (k - 1) / 4 = 0.2, 0.375, 0.55, 0.725, 0.9, next 1.075.
    spec = PriorSpec.from_scales(300, (38, 19, 10, 5, 3, 1), ((2,),) * 6, first_scale=0.1)
    np.testing.assert_allclose(spec.min_sizes, [30, 60, 112.5, 165, 217.5, 270], rtol=1e-12)
    np.testing.assert_allclose(spec.max_sizes, [60, 112.5, 165, 217.5, 270, 322.5], rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2 levels"):
        PriorSpec.from_scales(300, (38, 19), ((2,),) * 2, first_scale=0.1)


def test_clip_keeps_values_in_unit_interval():
    clipped = generate_priors(PriorSpec(300, (3, 1), (100, 300), (213, 264), (264, 315), ((2,), (2,)), clip=True))
    assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0
    assert float(generate_priors(SSD300_VOC).max()) > 1.0  # the Caffe model does not clip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": (8,)}, "PriorSpec.steps: expected one entry per feature map"),
        ({"min_sizes": (0, 60)}, "level 0: feature map, step and min size must be positive"),
        ({"max_sizes": (20, 111)}, "level 0: max_size 20 is smaller than min_size 30"),
        ({"aspect_ratios": ((2,), (0.5,))}, r"aspect_ratios\[1\] = \(0.5,\): give ratios > 1 only"),
        ({"image_size": 0}, "image_size: expected a positive size"),
    ],
)
def test_prior_spec_rejects_bad_values(kwargs, message):
    base = dict(
        image_size=300,
        feature_maps=(38, 19),
        steps=(8, 16),
        min_sizes=(30, 60),
        max_sizes=(60, 111),
        aspect_ratios=((2,), (2, 3)),
    )
    with pytest.raises(ValueError, match=message):
        PriorSpec(**{**base, **kwargs})
