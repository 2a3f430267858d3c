"""``detect``: one forward pass and ``postprocess`` per batch, then ``min_score``; batching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.serving.detect import DetectSettings, detect, model_input
from ssd_core.augment import eval_transform, normalize_images
from ssd_core.postprocess import postprocess
from tests.pipeline.fixtures import image_with_box, random_tiny_ssd

SETTINGS = DetectSettings(score_threshold=0.01, top_k=400, nms_iou=0.45, max_detections=200, min_score=0.0)


@pytest.fixture(scope="module")
def model():
    return random_tiny_ssd(3, seed=2)


def _inputs(sizes):
    images = [image_with_box(s, (2, 2, s[0] // 2, s[1] // 2), seed=i) for i, s in enumerate(sizes)]
    return images, torch.stack([model_input(image, 160) for image in images])


def test_model_input_is_the_eval_transform_of_the_pixels():
    image = image_with_box((50, 30), (5, 5, 20, 20))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, H, W]
    assert torch.equal(model_input(image, 160), eval_transform(pixels, 160))
    with pytest.raises(ValueError, match="expected an RGB image, got mode 'L'"):
        model_input(image.convert("L"), 160)


def test_equals_forward_and_postprocess_then_the_min_score(model):
    images, batch = _inputs([(64, 48), (40, 90)])
    sizes = [image.size for image in images]
    with torch.no_grad():
        out = model(normalize_images(batch))
        reference = postprocess(out.loc, out.cls_logits, model.priors(), sizes)  # the original settings
    min_score = float(np.median(reference[0].scores.numpy()))  # keeps about half of image 0's detections
    found = detect(model, batch, sizes, SETTINGS._replace(min_score=min_score))
    for det, ref in zip(found, reference, strict=True):
        keep = ref.scores.numpy().astype(np.float64) >= min_score
        assert np.array_equal(det.scores, ref.scores.numpy().astype(np.float64)[keep])
        assert np.array_equal(det.boxes, ref.boxes.numpy().astype(np.float64).reshape(-1, 4)[keep])
        assert np.array_equal(det.labels, ref.labels.numpy()[keep]) and det.labels.dtype == np.int64
    assert 0 < len(found[0].scores) < len(reference[0].scores)


def test_a_batch_gives_each_image_its_own_detections(model):
    images, batch = _inputs([(64, 48), (40, 90), (33, 33)])
    together = detect(model, batch, [i.size for i in images], SETTINGS)
    for k, image in enumerate(images):
        alone = detect(model, batch[k : k + 1], [image.size], SETTINGS)[0]
        assert np.array_equal(alone.labels, together[k].labels)
        np.testing.assert_allclose(alone.scores, together[k].scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose(alone.boxes, together[k].boxes, rtol=0, atol=1e-3)


def test_refuses_what_is_not_a_uint8_batch_with_its_sizes(model):
    _, batch = _inputs([(20, 20)])
    with pytest.raises(ValueError, match="expected uint8 images"):
        detect(model, batch.float(), [(20, 20)], SETTINGS)
    with pytest.raises(ValueError, match="and 2 sizes"):
        detect(model, batch, [(20, 20), (10, 10)], SETTINGS)
