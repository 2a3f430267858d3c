"""The README's cluster workflow on the real S3 server: upload shards, train with shards, run folder and model
file on ``s3://``, then evaluate and predict with the model from ``s3://`` (local Ray, 2 workers, 2 steps).
The preflight refusals, which need no Ray, are in test_stage_preflight.py.

Ray's workers take the object store's credentials from their environment, as on a cluster: the module sets
the server's variables before Ray starts, so every process of the local instance inherits them.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pipeline import storage
from pipeline.artifacts.model_file import load_model_file
from pipeline.cli import main as cli_main
from pipeline.training import checkpoint
from tests.object_store import point_clients_at
from tests.pipeline.fixtures import image_with_box, run_evaluate, save_jpeg
from tests.private_ray import private_ray

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.timeout(1200),
]  # a loaded 2-core machine: ~3 min per Ray Train fit

TRAIN = [
    "seed=0",
    "model.preset=ssd_tiny",
    "train.num_workers=2",
    "train.threads_per_worker=1",
    "train.loader_workers=0",
    "train.batch_size=4",
    "train.lr_reference_batch=8",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.checkpoint_every_steps=1",
    "train.keep_checkpoints=2",
    "train.log_every_steps=1",
    "augment.expand=false",
    "augment.crop=false",
    "tracking.enabled=false",
    "train.run_name=s3run",
]


@pytest.fixture(scope="module")
def cluster(object_store, tmp_path_factory):
    """The server's client environment for the whole module, and a local Ray started inside it."""
    with pytest.MonkeyPatch.context() as mp:
        point_clients_at(object_store, mp, tmp_path_factory.mktemp("aws"))  # the workers' shard copies there too
        with private_ray(mp, "rs", num_cpus=2):
            yield object_store


def _train(shards: str, runs: str, model_out: str, *extra: str) -> int:
    return cli_main(
        ["train", "--shards", shards, "--model-out", model_out, *TRAIN, f"train.storage_path={runs}", *extra]
    )


def test_train_evaluate_predict_with_everything_on_s3(cluster, uneven_shards, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    shards = cluster.fresh_url("voc", "shards")
    runs, model_out = cluster.fresh_url("runs"), cluster.fresh_url("models", "ssd.pt")
    assert cli_main(["upload", "shards", str(uneven_shards), shards]) == 0

    caplog.set_level(logging.INFO)
    assert _train(shards, runs, model_out) == 0
    [run] = storage.list_folder(runs)
    run_uri = storage.join(runs, run.name)
    assert run.name.startswith("s3run-") and run.is_dir
    names = {e.name for e in storage.list_folder(run_uri)}
    assert {checkpoint.dir_name(1), checkpoint.dir_name(2), checkpoint.OUTCOME_FILE, checkpoint.SNAPSHOT_FILE} <= names
    outcome = json.loads(storage.read_bytes(storage.join(run_uri, checkpoint.OUTCOME_FILE)))
    assert outcome["status"] == "completed" and outcome["step"] == 2
    final = checkpoint.load_checkpoint(storage.join(run_uri, checkpoint.dir_name(2)))  # hash-checked
    loaded = load_model_file(model_out)
    assert loaded.classes == json.loads((uneven_shards / "manifest.json").read_text())["classes"]
    assert all(torch.equal(final.state["model"][k], v) for k, v in loaded.model.state_dict().items())
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())

    # The same command again resumes from the step-2 checkpoint on S3 and ends at once with the same model.
    caplog.clear()
    assert _train(shards, runs, model_out) == 0
    assert f"resuming run {run_uri} from step 2 of 2" in caplog.text
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            load_model_file(model_out).model.state_dict().values(), loaded.model.state_dict().values(), strict=True
        )
    )

    out = tmp_path / "eval"
    settings = ("eval.batch_size=2", "eval.num_sample_images=2", "tracking.enabled=false", "train.loader_workers=0")
    code = run_evaluate(model_out, shards, out, *settings)
    assert code == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 <= metrics["map_voc07"] <= 1.0 and metrics["num_images"] == 5  # the 5 validation images

    photo = save_jpeg(tmp_path / "photos" / "a.jpg", image_with_box((64, 48), (8, 8, 40, 30)))
    assert cli_main(["predict", "--model", model_out, str(photo), "--out", str(tmp_path / "pred"), "--no-draw"]) == 0
    detections = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert [i["file_name"] for i in detections["images"]] == [str(photo)]
