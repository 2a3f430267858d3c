"""The evaluate stage end to end: a real (untrained) ssd_tiny model file over real validation shards,
the files it writes, COCO JSON that pycocotools re-scores to the same numbers, and MLflow reporting."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.artifacts.model_file import save_model_file
from pipeline.artifacts.output_folder import claim_output_folder
from pipeline.cli import main as cli_main
from pipeline.config import TrackingConfig, params_to_dict
from pipeline.report.scoring import SUMMARY_KEYS
from pipeline.serving.registry import CHAMPION, CHAMPION_METRIC, VAL_DIGEST_TAG
from pipeline.shards.eval_loader import eval_loader
from pipeline.stages.evaluate import validation_digest
from pipeline.tracking import create_tracker
from ssd_core.model import build_ssd
from tests.pipeline.fixtures import make_params, run_evaluate
from tests.pipeline.mlflow_server import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def classes(uneven_shards):
    return json.loads((uneven_shards / "manifest.json").read_text())["classes"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, classes):
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", len(classes) + 1)
    path = tmp_path_factory.mktemp("model") / "ssd.pt"
    params = make_params(**{"train.max_steps": 7})
    save_model_file(path, model, classes=classes, params=params_to_dict(params))
    return path


def run_cli(tmp_path, model_file, shards, *overrides, expect: int = 0):
    settings = ("eval.batch_size=2", "eval.num_sample_images=3", "train.loader_workers=0")
    code = run_evaluate(model_file, shards, tmp_path, *settings, *overrides, metrics=tmp_path / "metrics" / "eval.json")
    assert code == expect


@pytest.mark.slow
def test_cli_writes_every_output(tmp_path, monkeypatch, model_file, uneven_shards, classes):
    monkeypatch.chdir(tmp_path)
    claim_output_folder(tmp_path / "plots", "evaluate")  # as an earlier run left it, with a class since dropped
    (tmp_path / "plots" / "pr").mkdir()
    (tmp_path / "plots" / "pr" / "99_gone.csv").write_text("recall,precision\n")
    run_cli(tmp_path, model_file, uneven_shards, "tracking.enabled=false")
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert set(SUMMARY_KEYS) <= set(metrics)
    assert metrics["num_images"] == 5  # every validation sample once
    assert metrics["images_per_sec"] > 0 and metrics["wall_time_s"] >= metrics["inference_time_s"] > 0
    for key in SUMMARY_KEYS:
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0

    pr_files = sorted((tmp_path / "plots" / "pr").glob("*.csv"))
    assert len(pr_files) == len(classes)
    with open(pr_files[0]) as handle:
        rows = list(csv.DictReader(handle))
    assert rows and set(rows[0]) == {"recall", "precision"}
    recalls = [float(r["recall"]) for r in rows]
    assert recalls == sorted(recalls)
    with open(tmp_path / "plots" / "per_class_ap.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["class"] for r in table] == classes
    for name in ("pr_curves.png", "detections.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == PNG_MAGIC

    # The ground truth JSON is the validation split as the loader yields it.
    gt = json.loads((tmp_path / "eval" / "coco_gt.json").read_text())
    loader = eval_loader(str(uneven_shards), batch_size=8, image_size=64, num_workers=0)
    keys, boxes = [], 0
    for batch in loader:
        keys += list(batch.keys)
        boxes += sum(len(b) for b in batch.boxes)
    assert [im["file_name"] for im in gt["images"]] == keys and len(gt["annotations"]) == boxes
    assert [c["name"] for c in gt["categories"]] == classes

    # Any COCO tool re-scores the written JSON to the numbers in eval.json.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "eval" / "coco_gt.json"))
        dets = json.loads((tmp_path / "eval" / "coco_detections.json").read_text())
        assert dets and len(dets) == metrics["num_detections"]
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    for key, index in (("map_coco", 0), ("ap50", 1), ("ap75", 2)):
        expected = evaluator.stats[index]
        assert (metrics[key] is None) if expected < 0 else metrics[key] == pytest.approx(expected, abs=1e-6)


def test_folders_it_did_not_make_are_refused_before_any_work(tmp_path, model_file, uneven_shards, caplog):
    (tmp_path / "plots" / "pr").mkdir(parents=True)
    (tmp_path / "plots" / "pr" / "mine.csv").write_text("the user's curve\n")
    run_cli(tmp_path, model_file, uneven_shards, "tracking.enabled=false", expect=2)
    assert f"--plots {tmp_path / 'plots'} is not empty (pr) and was not made by the evaluate stage" in caplog.text
    assert (tmp_path / "plots" / "pr" / "mine.csv").read_text() == "the user's curve\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]  # no metrics, no eval folder

    (tmp_path / "plots").rename(tmp_path / "mine")
    claim_output_folder(tmp_path / "plots", "evaluate")
    claim_output_folder(tmp_path / "eval", "shard")  # another stage's output
    run_cli(tmp_path, model_file, uneven_shards, "tracking.enabled=false", expect=2)
    assert f"--out {tmp_path / 'eval'} holds the output of the shard stage" in caplog.text


@pytest.mark.slow
def test_reports_to_the_training_run_that_logged_the_model(tmp_path, monkeypatch, model_file, uneven_shards):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(experiment="ssd-eval-test", model_name="ssd-eval-test")
    training = create_tracker(cfg, enabled_here=True, run_id=None, run_name="train", repo_root=tmp_path)
    training.log_metrics({"train/loss": 1.5}, 7)
    training.log_model_file(model_file)
    assert training.close()

    overrides = ("tracking.experiment=ssd-eval-test", "tracking.model_name=ssd-eval-test")
    run_cli(tmp_path, model_file, uneven_shards, *overrides)
    run_cli(tmp_path, model_file, uneven_shards, *overrides)  # a re-run stores nothing twice
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ssd-eval-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == training.run_id and run.info.status == "FINISHED"
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    for key in SUMMARY_KEYS:
        history = client.get_metric_history(run.info.run_id, f"val/{key}")
        assert [m.step for m in history] == [7]  # the model's final training step, once
        if metrics[key] is not None:
            assert history[0].value == pytest.approx(metrics[key], abs=1e-6)
    names = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/eval.json",
        "evaluation/per_class_ap.csv",
        "evaluation/pr_curves.png",
        "evaluation/detections.png",
        "evaluation/pr",
    } <= names
    (version,) = client.search_model_versions("name='ssd-eval-test'")
    assert "val/map_voc07" in version.tags and version.tags["train/loss"] == "1.5"
    # the first evaluated version becomes the champion, with the validation data it was scored on
    assert version.tags[VAL_DIGEST_TAG] == validation_digest(str(uneven_shards))
    assert float(version.tags[CHAMPION_METRIC]) == pytest.approx(metrics["map_voc07"], abs=1e-9)
    champion = client.get_model_version_by_alias("ssd-eval-test", CHAMPION)
    assert champion.version == version.version  # the first evaluation made it the champion
    assert version.tags["champion_decision"] == "version 1 is already the champion (val/map_voc07 0.0000)"  # the re-run


def test_the_validation_digest_names_the_validation_shards_only(uneven_shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(uneven_shards, copy)
    assert validation_digest(str(copy)) == validation_digest(str(uneven_shards))  # where they lie does not matter
    manifest = json.loads((copy / "manifest.json").read_text())
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    val["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert validation_digest(str(copy)) != validation_digest(str(uneven_shards))


def test_unreachable_tracking_server_fails_fast_before_any_work(
    tmp_path, monkeypatch, model_file, uneven_shards, caplog
):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = cli_main(
        [
            "evaluate",
            "--model",
            str(model_file),
            "--shards",
            str(uneven_shards),
            "--metrics",
            str(tmp_path / "eval.json"),
            "--plots",
            "plots",
            "--out",
            "eval",
            f"tracking.uri={uri}",
            "tracking.connect_timeout_s=1",
        ]
    )
    assert code == 2 and uri in caplog.text
    assert not (tmp_path / "eval.json").exists()
