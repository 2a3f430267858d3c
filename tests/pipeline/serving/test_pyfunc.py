"""The pyfunc loaded back through ``mlflow.pyfunc.load_model``: hand-derived detections, exactly predict's
detections for the same files, uint8 arrays equal to their lossless encoding, and bad rows refused by name."""

from __future__ import annotations

import io

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline.config import load_params
from pipeline.serving.pyfunc import OUTPUT_COLUMNS
from pipeline.stages.predict import predict_images
from tests.pipeline.fixtures import image_with_box, png_header_only, save_jpeg
from tests.pipeline.stages.test_predict import CLASSES, expected_detections

pytestmark = pytest.mark.slow  # each module-scoped MLflow model folder takes a few seconds to write


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def crafted(crafted_pyfunc):
    return mlflow.pyfunc.load_model(str(crafted_pyfunc))


@pytest.fixture(scope="module")
def random(random_pyfunc):
    return mlflow.pyfunc.load_model(str(random_pyfunc))


def _as_annotations(frame: pd.DataFrame, image: int) -> list[tuple[int, list[float], float]]:
    rows = frame[frame["image"] == image]
    return [
        (int(r.label), [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1], float(r.score)) for r in rows.itertuples(index=False)
    ]


def test_hand_derived_detections_of_the_crafted_model(crafted):
    sizes = [(64, 48), (30, 90)]
    frame = crafted.predict(pd.DataFrame({"image": [encoded(image_with_box(s)) for s in sizes]}))
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert set(frame["class_name"]) == set(CLASSES)
    for index, (w, h) in enumerate(sizes):
        for min_score, got in ((0.3, frame), (0.1, None)):
            if got is None:
                got = crafted.predict(
                    pd.DataFrame({"image": [encoded(image_with_box((w, h)))]}), params={"min_score": min_score}
                )
                index_here = 0
            else:
                index_here = index
            want = expected_detections(w, h, min_score)
            found = _as_annotations(got, index_here)
            assert [c for c, _, _ in found] == [c for c, _, _ in want]
            for (_, box, score), (_, box_want, score_want) in zip(found, want, strict=True):
                assert score == pytest.approx(score_want, abs=1e-6)
                assert box == pytest.approx(box_want, abs=1e-3)


def test_no_detection_gives_an_empty_table_with_the_columns(crafted):
    frame = crafted.predict(pd.DataFrame({"image": [encoded(image_with_box((20, 20)))]}), params={"min_score": 1.0})
    assert frame.empty and list(frame.columns) == list(OUTPUT_COLUMNS)
    assert str(frame["score"].dtype) == "float64" and str(frame["image"].dtype) == "int64"


def test_exactly_predicts_detections_for_the_same_files(random, random_file, tmp_path):
    from pipeline.artifacts.model_file import load_model_file

    files = [
        save_jpeg(tmp_path / "a.jpg", image_with_box((96, 64), (10, 10, 50, 40), seed=2)),
        save_jpeg(tmp_path / "rot.jpg", image_with_box((60, 30), (0, 0, 20, 10), seed=3), orientation=6),
    ]
    image_with_box((40, 72), (5, 5, 20, 30), seed=4).save(tmp_path / "c.png")
    files.append(tmp_path / "c.png")
    params = load_params(None)
    loaded = load_model_file(random_file)
    want = list(
        predict_images(
            loaded.model,
            files,
            params.eval,
            min_score=0.05,
            batch_size=1,
            device=loaded.model.priors().device,
            max_pixels=params.prepare.max_image_pixels,
        )
    )
    frame = random.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}), params={"min_score": 0.05})
    assert len(frame) == sum(len(p.scores) for p in want) > 0
    for index, prediction in enumerate(want):
        rows = frame[frame["image"] == index]
        assert np.array_equal(rows[["x1", "y1", "x2", "y2"]].to_numpy(), prediction.boxes)  # bit for bit
        assert np.array_equal(rows["score"].to_numpy(), prediction.scores)
        assert np.array_equal(rows["label"].to_numpy(), prediction.labels)
    assert frame[frame["image"] == 1]["x2"].max() <= 30  # the EXIF-rotated image is read upright (30 x 60)


def test_uint8_arrays_equal_their_lossless_encoding(random):
    pixels = np.asarray(image_with_box((72, 50), (8, 8, 40, 30), seed=6))  # uint8 [50, 72, 3]
    from_array = random.predict(pd.DataFrame({"image": [pixels]}), params={"min_score": 0.05})
    from_png = random.predict(pd.DataFrame({"image": [encoded(Image.fromarray(pixels))]}), params={"min_score": 0.05})
    assert len(from_array) > 0
    pd.testing.assert_frame_equal(from_array, from_png)
    direct = random.unwrap_python_model().predict_arrays([pixels], min_score=0.05)
    pd.testing.assert_frame_equal(direct, from_array)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty bytes"),
        (b"\xff\xd8\xff\xe0 not really a jpeg", "row 1: image_"),
        (png_header_only(10_000, 10_000), "row 1: image_too_large: 10000x10000 pixels"),
        (np.zeros((4, 4), dtype=np.uint8), "row 1: expected a uint8 array [H, W, 3], got uint8 [4, 4]"),
        (np.zeros((4, 4, 3), dtype=np.float32), "expected a uint8 array [H, W, 3], got float32"),
        (np.zeros((10_000, 10_000, 3), dtype=np.uint8), "row 1: image_too_large: 10000x10000 pixels"),
    ],
    ids=["empty", "corrupt", "png_bomb", "array_2d", "array_float", "array_too_large"],
)
def test_a_bad_row_is_refused_by_its_number_and_reason(random, value, reason):
    good = encoded(image_with_box((20, 20)))
    with pytest.raises(MlflowException) as caught:
        random.unwrap_python_model().predict(None, pd.DataFrame({"image": [good, value]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert reason in caught.value.message and "row 1" in caught.value.message


def test_bad_params_and_a_missing_column(random):
    image = encoded(image_with_box((20, 20)))
    with pytest.raises(MlflowException, match=r"min_score: expected a number in \[0, 1\], got 2.0"):
        random.predict(pd.DataFrame({"image": [image]}), params={"min_score": 2.0})
    with pytest.raises(MlflowException) as caught:
        random.predict(pd.DataFrame({"picture": [image]}))
    assert "image" in caught.value.message
