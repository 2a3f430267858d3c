"""A model file and shards on the real S3 server: ``evaluate`` and ``predict`` read them as they read local
ones, and give the same results (no Ray; the training side is in test_object_store_workflow.py)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import storage
from pipeline.artifacts.model_file import load_model_file, save_model_file
from pipeline.cli import main as cli_main
from pipeline.config import params_to_dict
from tests.pipeline.fixtures import image_with_box, make_params, random_tiny_ssd, save_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture
def models(uneven_shards, tmp_path, s3_env):
    """The same random model as a local file and at an ``s3://`` URL."""
    classes = json.loads((uneven_shards / "manifest.json").read_text())["classes"]
    model = random_tiny_ssd(len(classes) + 1)
    params = params_to_dict(make_params(**{"train.max_steps": 3}))
    local, remote = tmp_path / "ssd.pt", s3_env.fresh_url("models", "ssd.pt")
    save_model_file(local, model, classes=classes, params=params)
    save_model_file(remote, model, classes=classes, params=params)
    return local, remote


def test_the_model_file_round_trips_through_s3(models):
    local, remote = models
    assert storage.read_bytes(remote) == local.read_bytes()  # the same bytes, published as one object
    a, b = load_model_file(local), load_model_file(remote)
    assert a.classes == b.classes and a.preset == b.preset
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_foreign_object_is_refused_with_its_url(s3_env):
    url = s3_env.fresh_url("models", "not-a-model.pt")
    storage.put_bytes(url, b"not a torch file")
    with pytest.raises(ValueError, match=f"{url}.*not a readable model file"):
        load_model_file(url)


def test_evaluate_reads_model_and_shards_from_s3_and_scores_like_local(models, uneven_shards, tmp_path, s3_env):
    local, remote = models
    shards = s3_env.fresh_url("shards")
    assert cli_main(["upload", "shards", str(uneven_shards), shards]) == 0
    results = {}
    for name, model, data in [("local", str(local), str(uneven_shards)), ("s3", remote, shards)]:
        out = tmp_path / name
        argv = ["evaluate", "--model", model, "--shards", data, "--metrics", str(out / "eval.json")]
        argv += ["--plots", str(out / "plots"), "--out", str(out / "eval"), "eval.batch_size=2"]
        argv += ["eval.num_sample_images=2", "tracking.enabled=false", "train.loader_workers=0"]
        assert cli_main(argv) == 0
        results[name] = json.loads((out / "eval.json").read_text())
    keys = ("map_voc07", "map_voc", "map_coco", "num_images", "num_detections")
    assert {k: results["s3"][k] for k in keys} == {k: results["local"][k] for k in keys}


def test_predict_reads_the_model_from_s3(models, tmp_path):
    local, remote = models
    photo = save_jpeg(tmp_path / "photos" / "a.jpg", image_with_box((64, 48), (8, 8, 40, 30)))
    for name, model in [("local", str(local)), ("s3", remote)]:
        argv = ["predict", "--model", model, str(photo), "--out", str(tmp_path / name), "--no-draw"]
        assert cli_main([*argv, "--min-score", "0.0"]) == 0
    local_doc = json.loads((tmp_path / "local" / "detections.json").read_text())
    s3_doc = json.loads((tmp_path / "s3" / "detections.json").read_text())
    assert s3_doc["annotations"] == local_doc["annotations"] and s3_doc["annotations"]
