"""``python -m pipeline predict --ray``: the same detections as ``predict``, on Ray Data actors.

The reference is the single-process ``predict`` over the same 50 small images (varied sizes, PNG and JPEG,
one EXIF-rotated) and one corrupt file, with an untrained ``ssd_tiny`` (its scores vary with the image). The
Ray runs use 2 actors of a local Ray on 127.0.0.1 started here (stopped with ``ray.shutdown``); one reads the
images from and writes its results to the S3 server (``tests/object_store.py``). The Ray processes get the
server's variables when Ray starts, as every node of a cluster has its own credentials.

Equality is exact: ``detections.json`` (all but ``info``) and ``results.json`` byte for byte, and the Parquet
table's float64 values against ``predict_images`` (what ``predict`` runs) called here. The references run torch
on one thread, as each actor (1 CPU) does: the convolutions' float sums depend on the thread count.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import cli, storage
from pipeline.artifacts.model_file import load_model_file, save_model_file
from pipeline.artifacts.output_folder import MARKER_NAME, marker_stage
from pipeline.config import load_params, params_to_dict
from pipeline.stages import predict_ray
from pipeline.stages.predict import predict_images
from pipeline.stages.predict_inputs import InputError
from pipeline.stages.predict_outputs import TABLE_COLUMNS, Failure, Prediction, detections_table
from ssd_core.model import build_ssd
from tests.object_store import point_clients_at
from tests.pipeline.fixtures import save_jpeg
from tests.private_ray import private_ray

NUM_IMAGES = 50
MIN_SCORE = "0.3"
BATCH = "4"  # 13 chunks (the last of 2 images) over 2 actors


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """Untrained ``ssd_tiny`` (seed 1): top scores ~0.7-0.8, different for every image."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_model_file(
        path, build_ssd("ssd_tiny", num_classes=3), classes=["cat", "dog"], params=params_to_dict(load_params(None))
    )
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """50 images 24..80 px (every third a PNG, one JPEG stored 60x30 with EXIF orientation 6) and a corrupt file."""
    folder = tmp_path_factory.mktemp("input") / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        width, height = (int(v) for v in rng.integers(24, 81, 2))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
        if i % 3 == 0:
            image.save(folder / f"{i:03d}.png")
        else:
            save_jpeg(folder / f"{i:03d}.jpg", image, orientation=6 if i == 7 else None)
    (folder / "zz-corrupt.jpg").write_bytes((folder / "001.jpg").read_bytes()[:200])
    return folder


@contextmanager
def torch_threads(count: int):
    """Run torch on ``count`` threads, as ``OMP_NUM_THREADS=count`` would (each actor has 1 CPU, so 1 thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single(model_file, photos, tmp_path_factory) -> Path:
    """The reference: single-process ``predict`` (no Ray) over ``photos``, on one thread as each actor."""
    out = tmp_path_factory.mktemp("single") / "out"
    argv = ["predict", "--model", str(model_file), str(photos), "--out", str(out), "--no-draw"]
    with torch_threads(1):
        assert cli.main([*argv, "--min-score", MIN_SCORE, "--batch-size", BATCH]) == 0
    return out


@pytest.fixture(scope="module")
def ray_local(object_store, tmp_path_factory):
    """A local Ray on 127.0.0.1 whose processes hold the S3 server's variables (``predict --ray`` reuses it)."""
    with pytest.MonkeyPatch.context() as mp:
        point_clients_at(object_store, mp, tmp_path_factory.mktemp("aws"))
        with private_ray(mp, "rp", num_cpus=2, dashboard=False):
            yield


def _predict_ray(model_file: Path, *inputs: str, out: str) -> int:
    argv = ["predict", "--ray", "--ray-workers", "2", "--model", str(model_file), *inputs, "--out", out]
    return cli.main([*argv, "--min-score", MIN_SCORE, "--batch-size", BATCH])


def _document(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))


def _reference(model_file: Path, paths: list) -> list:
    """What ``predict`` computes for ``paths``: ``predict_images`` on CPU, in this process."""
    params = load_params(None)
    model = load_model_file(model_file).model
    with torch_threads(1):
        return list(
            predict_images(
                model,
                paths,
                params.eval,
                min_score=float(MIN_SCORE),
                batch_size=int(BATCH),
                device=torch.device("cpu"),
                max_pixels=params.prepare.max_image_pixels,
            )
        )


def _assert_table_is(table, reference: list) -> None:
    """The Parquet rows are the reference's detections, exactly, image by image in input order."""
    from pipeline.serving.pyfunc import OUTPUT_COLUMNS

    assert tuple(table.column_names) == TABLE_COLUMNS == (*OUTPUT_COLUMNS, "image_id")
    read = [r for r in reference if isinstance(r, Prediction)]
    columns = table.to_pydict()
    assert columns["image"] == [str(p.path) for p in read for _ in range(len(p.scores))]
    assert columns["image_id"] == [i + 1 for i, p in enumerate(read) for _ in range(len(p.scores))]
    assert columns["score"] == [s for p in read for s in p.scores.tolist()]
    assert columns["label"] == [int(v) for p in read for v in p.labels.tolist()]
    assert columns["class_name"] == [["cat", "dog"][v - 1] for v in columns["label"]]
    boxes = np.array([columns[k] for k in ("x1", "y1", "x2", "y2")]).T  # [N, 4]
    np.testing.assert_array_equal(boxes, np.concatenate([p.boxes for p in read]))
    assert len(columns["score"]) > NUM_IMAGES  # several detections per image: a real comparison


# ---------------------------------------------------------------------------------------- Ray runs
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_ray_predict_equals_single_process_predict(ray_local, model_file, photos, single, tmp_path):
    out = tmp_path / "ray-out"
    assert _predict_ray(model_file, str(photos), out=str(out)) == 0

    want, got = _document((single / "detections.json").read_bytes()), _document((out / "detections.json").read_bytes())
    assert len(want["images"]) == NUM_IMAGES and [f["file"] for f in want["failed"]] == [str(photos / "zz-corrupt.jpg")]
    assert {k: v for k, v in got.items() if k != "info"} == {k: v for k, v in want.items() if k != "info"}
    assert got["info"] == {**want["info"], "ray_workers": 2}
    assert (out / "results.json").read_bytes() == (single / "results.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER_NAME, "detections.json", "detections.parquet", "results.json"]
    )

    paths = sorted(photos.iterdir(), key=lambda p: p.name)
    _assert_table_is(pq.read_table(out / "detections.parquet"), _reference(model_file, paths))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_ray_predict_reads_and_writes_the_object_store(ray_local, s3_env, model_file, photos, single):
    prefix = s3_env.fresh_url("photos")
    for path in sorted(photos.iterdir()):
        storage.put_bytes(storage.join(prefix, path.name), path.read_bytes())
    storage.put_bytes(storage.join(prefix, "notes.txt"), b"not an image extension: never read")
    out = s3_env.fresh_url("predictions")

    assert _predict_ray(model_file, prefix, out=out) == 0
    assert storage.read_bytes(storage.join(out, "results.json")) == (single / "results.json").read_bytes()
    want, got = (
        _document((single / "detections.json").read_bytes()),
        _document(storage.read_bytes(storage.join(out, "detections.json"))),
    )
    as_urls = [{**i, "file_name": storage.join(prefix, Path(i["file_name"]).name)} for i in want["images"]]
    assert got["images"] == as_urls
    assert got["annotations"] == want["annotations"] and got["categories"] == want["categories"]
    assert [(f["file"], f["reason"]) for f in got["failed"]] == [
        (storage.join(prefix, "zz-corrupt.jpg"), want["failed"][0]["reason"])
    ]
    assert marker_stage(out) == "predict"
    urls = [storage.join(prefix, p.name) for p in sorted(photos.iterdir())]
    with storage.open_read(storage.join(out, "detections.parquet")) as handle:
        _assert_table_is(pq.read_table(handle), _reference(model_file, urls))

    # A prefix holding the user's results.json (no marker) is refused before Ray runs, and left as it was.
    theirs = s3_env.fresh_url("theirs")
    storage.put_bytes(storage.join(theirs, "results.json"), b"mine")
    assert _predict_ray(model_file, prefix, out=theirs) == 2
    assert storage.read_bytes(storage.join(theirs, "results.json")) == b"mine"
    assert [e.name for e in storage.list_folder(theirs)] == ["results.json"]


# ------------------------------------------------------------------ refusals, before Ray starts
@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if ``predict --ray`` tries to join or start Ray."""

    def refuse(**kwargs):
        raise AssertionError(f"Ray was started for a run that should have been refused: {kwargs}")

    monkeypatch.setattr("pipeline.training.ray_runtime.connect_ray", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ray-workers", "0"], "--ray-workers: expected a positive number, got 0"),
        (["--ray-cpus-per-worker", "0"], "--ray-cpus-per-worker: expected a positive number"),
        (["--device", "cuda:1"], "--device: expected one of auto, cpu, cuda"),
        (["--min-score", "2"], "--min-score: expected a score in [0, 1], got 2.0"),
        (["--out", "{photos}"], "is the input folder"),
        (["--out", "{photos}/sub"], "lies inside the input folder"),
    ],
)
def test_bad_options_are_refused_before_ray(no_ray, model_file, photos, tmp_path, caplog, extra, message):
    extra = [e.format(photos=photos) for e in extra]
    argv = ["predict", "--ray", "--model", str(model_file), str(photos), "--out", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 2
    assert message in caplog.text
    assert not (photos / "sub").exists() and not (tmp_path / "out").exists()


def test_a_missing_model_or_input_is_refused_before_ray(no_ray, model_file, photos, tmp_path, caplog):
    assert (
        cli.main(["predict", "--ray", "--model", str(tmp_path / "none.pt"), str(photos), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "model file" in caplog.text and "not found" in caplog.text
    assert (
        cli.main(["predict", "--ray", "--model", str(model_file), str(tmp_path / "gone"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "gone: no such file or folder" in caplog.text


def test_object_store_locations_need_ray(model_file, photos, tmp_path, caplog):
    assert cli.main(["predict", "--model", str(model_file), "s3://bucket/photos", "--out", str(tmp_path / "o")]) == 2
    assert "object-store inputs need --ray" in caplog.text
    assert cli.main(["predict", "--model", str(model_file), str(photos), "--out", "s3://bucket/out"]) == 2
    assert "object-store outputs need --ray" in caplog.text


# ------------------------------------------------------------------------------------- the parts
def test_chunks_are_the_batches_predict_forms():
    paths = [Path(f"{i}.jpg") for i in range(10)]
    chunks = predict_ray.chunk_rows(paths, 4)
    assert [c["first"] for c in chunks] == [0, 4, 8]
    assert [c["sources"] for c in chunks] == [
        ["0.jpg", "1.jpg", "2.jpg", "3.jpg"],
        ["4.jpg", "5.jpg", "6.jpg", "7.jpg"],
        ["8.jpg", "9.jpg"],
    ]


def test_a_result_row_round_trips_exactly():
    rng = np.random.default_rng(3)
    boxes = rng.random((5, 4)) * 100  # float64 [5, 4]
    pred = Prediction(Path("a/b.jpg"), 120, 80, boxes, rng.random(5), np.array([1, 2, 2, 1, 2]), None)
    back = predict_ray.from_row(predict_ray.result_row(3, pred), pred.path)
    assert back.path == pred.path and (back.width, back.height) == (120, 80)
    np.testing.assert_array_equal(back.boxes, pred.boxes)
    np.testing.assert_array_equal(back.scores, pred.scores)
    assert back.labels.dtype == np.int64 and back.labels.tolist() == [1, 2, 2, 1, 2]
    empty = Prediction("s3://b/x.png", 9, 9, np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), None)
    assert predict_ray.from_row(predict_ray.result_row(0, empty), empty.path).boxes.shape == (0, 4)
    failed = predict_ray.from_row(predict_ray.result_row(1, Failure("c.jpg", "image_truncated: x")), "c.jpg")
    assert failed == Failure("c.jpg", "image_truncated: x")


def test_the_table_has_one_row_per_detection():
    import io

    a = Prediction(
        Path("a.jpg"),
        10,
        10,
        np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 9.5, 9.5]]),
        np.array([0.9, 0.4]),
        np.array([2, 1]),
        None,
    )
    none = Prediction(Path("b.jpg"), 10, 10, np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), None)
    c = Prediction(
        "s3://b/c.png", 5, 5, np.array([[0.0, 0.0, 5.0, 5.0]]), np.array([0.333333333333]), np.array([1]), None
    )
    table = pq.read_table(io.BytesIO(detections_table([a, none, c], ["cat", "dog"]))).to_pydict()
    assert table == {
        "image": ["a.jpg", "a.jpg", "s3://b/c.png"],
        "label": [2, 1, 1],
        "class_name": ["dog", "cat", "cat"],
        "score": [0.9, 0.4, 0.333333333333],  # unrounded (detections.json keeps 5 decimals)
        "x1": [1.0, 0.5, 0.0],
        "y1": [2.0, 0.5, 0.0],
        "x2": [3.0, 9.5, 5.0],
        "y2": [4.0, 9.5, 5.0],
        "image_id": [1, 1, 3],
    }
    assert pq.read_table(io.BytesIO(detections_table([], ["cat"]))).num_rows == 0


def test_ray_device_options():
    import argparse

    good = argparse.Namespace(ray_workers=1, ray_cpus_per_worker=0.5, device="AUTO")
    predict_ray.check_ray_options(good)
    with pytest.raises(InputError, match="Ray gives each worker its GPU"):
        predict_ray.check_ray_options(argparse.Namespace(ray_workers=1, ray_cpus_per_worker=1, device="cuda:0"))
