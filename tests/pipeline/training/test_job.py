"""The run identity (run folder name) and the driver's handling of the run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray

from pipeline.cli import main as cli_main
from pipeline.config import load_params
from pipeline.stages.train import build_job
from pipeline.training import checkpoint
from pipeline.training.job import TRAINING_CODE, code_digest, identity_digest
from pipeline.training.launcher import SNAPSHOT_FILE, prepare_run_folder
from tests.pipeline.fixtures import make_params, prepare_and_shard

DATA = "a" * 64
REPO = Path(__file__).resolve().parents[3]


def _digest(*overrides: str, data: str = DATA, code: str = "c0de") -> str:
    return identity_digest(load_params(None, list(overrides)), data, code)


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=0.002",
        "seed=1",
        "model.preset=ssd300_vgg16",
        "augment.flip=false",
        "train.max_steps=7",
        "train.batch_size=3",
        "train.milestones=[5]",
        "train.precision=bf16",
    ],
)
def test_what_a_run_computes_changes_its_folder(override):
    assert _digest(override) != _digest()


@pytest.mark.parametrize(
    "override",
    [
        "train.num_workers=5",
        "train.threads_per_worker=4",
        "train.log_every_steps=1",
        "train.storage_path=s3://b/r",
        "train.checkpoint_every_steps=9",
        "train.keep_checkpoints=5",
        "train.max_failures=0",
        "train.resume=false",
        "train.loader_workers=3",
        "train.run_name=other",
        "tracking.experiment=x",
        "eval.batch_size=2",
        "data.synthetic.num_train=5",
    ],
)
def test_how_a_run_is_executed_does_not(override):
    assert _digest(override) == _digest()


def test_data_and_code_are_part_of_the_identity():
    assert _digest(data="b" * 64) != _digest()
    assert _digest(code="other") != _digest()
    assert code_digest() == code_digest() and len(code_digest()) == 64


def test_code_digest_covers_training_code_only(tmp_path, monkeypatch):
    import pipeline

    for entry in TRAINING_CODE:  # a copy of the tree, to edit
        source = REPO / entry
        target = tmp_path / entry
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    (tmp_path / "pipeline" / "stages").mkdir(parents=True)
    (tmp_path / "pipeline" / "stages" / "evaluate.py").write_text("x = 1\n")
    monkeypatch.setattr(pipeline, "__file__", str(tmp_path / "pipeline" / "__init__.py"))
    before = code_digest()
    (tmp_path / "pipeline" / "stages" / "evaluate.py").write_text("x = 2\n")  # evaluation code: same run
    assert code_digest() == before
    loss = tmp_path / "ssd_core" / "loss.py"
    loss.write_text(loss.read_text() + "\n# changed\n")  # training code: a new run
    assert code_digest() != before


def _checkpoint(run, step: int) -> None:
    uri = checkpoint.join(str(run), checkpoint.dir_name(step))
    checkpoint.write_checkpoint(uri, {"step": step}, {"step": step, "epoch": 0, "params": {}, "world_size": 2})


def _snapshot(run, names: list[str], version: str = ray.__version__) -> None:
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    state = {
        "ray_version": version,
        "checkpoint_results": results,
        "latest_checkpoint_result": results[-1] if results else None,
    }
    (run / SNAPSHOT_FILE).write_text(json.dumps(state))


def test_a_missing_run_folder_starts_fresh(tmp_path):
    assert prepare_run_folder(str(tmp_path / "run"), resume=True) is None
    assert not (tmp_path / "run").exists()


def test_resume_false_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 4)
    assert prepare_run_folder(str(run), resume=False) is None
    assert not run.exists()
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / checkpoint.dir_name(4) / checkpoint.STATE_FILE).exists()  # nothing deleted


def test_resume_finds_the_newest_valid_checkpoint_and_keeps_a_good_snapshot(tmp_path):
    run = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run, step)
    _snapshot(run, [checkpoint.dir_name(4), checkpoint.dir_name(8)])
    meta, uri = prepare_run_folder(str(run), resume=True)
    assert meta.step == 8 and uri == checkpoint.join(str(run), checkpoint.dir_name(8))
    assert (run / SNAPSHOT_FILE).exists()


@pytest.mark.parametrize(
    "write",
    [
        lambda run: (run / SNAPSHOT_FILE).write_text("{not json"),
        lambda run: _snapshot(run, [checkpoint.dir_name(8)], version="2.0.0"),
        lambda run: _snapshot(run, [checkpoint.dir_name(4), checkpoint.dir_name(12)]),  # 12 was deleted
    ],
    ids=["unparsable", "other-ray-version", "names-a-missing-checkpoint"],
)
def test_a_snapshot_ray_would_refuse_is_moved_aside(tmp_path, write):
    run = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run, step)
    write(run)
    meta, _ = prepare_run_folder(str(run), resume=True)
    assert meta.step == 8
    assert not (run / SNAPSHOT_FILE).exists() and len(list(run.glob(f"{SNAPSHOT_FILE}.invalid-*"))) == 1


def _tiny_shards(root) -> Path:
    params = make_params(
        **{"data.synthetic.num_train": 8, "data.synthetic.num_val": 4, "data.synthetic.image_size": 64}
    )
    return prepare_and_shard(params, root)[1]


def test_train_validates_shards_and_params_before_starting_ray(tmp_path, caplog):
    empty = tmp_path / "params.yaml"
    empty.write_text("seed: 0\n")
    train = ["train", "--params", str(empty), "--model-out", str(tmp_path / "m.pt")]
    assert cli_main([*train, "--shards", str(tmp_path / "missing")]) == 2
    assert "no manifest" in caplog.text
    shards = _tiny_shards(tmp_path)
    assert cli_main([*train, "--shards", str(shards), "train.precision=fp16"]) == 2
    assert "fp16 needs train.use_gpu=true" in caplog.text
    assert cli_main([*train, "--shards", str(shards), "model.pretrained_backbone=nowhere/vgg16.pth"]) == 2
    assert "model.pretrained_backbone: no file at" in caplog.text
    # A global batch of 3 on 2 workers: shares of 1 and 2 images; ssd_tiny's BN cannot train on 1
    assert cli_main([*train, "--shards", str(shards), "train.batch_size=3"]) == 2
    assert "leaves a worker 1 image per step" in caplog.text and "use at least 4" in caplog.text
    assert cli_main([*train, "--shards", str(shards), "train.batch_size=5", "train.num_workers=[1,3]"]) == 2
    assert "global batch of 5 images on up to 3 workers" in caplog.text and "use at least 6" in caplog.text
    (tar,) = shards.glob("train-*.tar")
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    tar.write_bytes(bytes(data))
    assert cli_main([*train, "--shards", str(shards)]) == 2
    assert tar.name in caplog.text
    assert not ray.is_initialized() and not (tmp_path / "m.pt").exists()


def test_build_job_makes_every_location_absolute(tmp_path):
    shards = _tiny_shards(tmp_path)
    params = load_params(None, ["train.storage_path=rel/runs", "tracking.uri=sqlite:///rel/mlflow.db"])
    job = build_job(str(shards.relative_to(tmp_path)), params, tmp_path)
    assert job.shards == str(shards)
    assert job.params.train.storage_path == str(tmp_path / "rel" / "runs")
    assert job.params.tracking.uri == f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"
    assert job.run_uri.startswith(str(tmp_path / "rel" / "runs" / "ssd-")) and len(job.classes) >= 1
    assert params.train.storage_path == "rel/runs"  # the caller's params are not edited in place


def test_build_job_reads_the_fine_tuning_source_first_and_names_its_digest(tmp_path, caplog):
    """model.init_from: resolved to an absolute path, its sha256 in the run folder's digest, refused before Ray
    when it is missing or of another preset."""
    from pipeline.artifacts.model_file import save_model_file
    from tests.pipeline.fixtures import random_tiny_ssd

    shards = _tiny_shards(tmp_path)
    source = tmp_path / "models" / "source.pt"
    save_model_file(source, random_tiny_ssd(3, seed=1), classes=["a", "b"], params={})
    params = load_params(None, ["model.init_from=models/source.pt"])
    job = build_job(str(shards), params, tmp_path)
    assert job.params.model.init_from == str(source)
    first = job.run_uri
    save_model_file(source, random_tiny_ssd(3, seed=2), classes=["a", "b"], params={})
    assert build_job(str(shards), params, tmp_path).run_uri != first  # same path, other weights
    assert build_job(str(shards), load_params(None, []), tmp_path).run_uri != first
    train = ["train", "--shards", str(shards), "--model-out", str(tmp_path / "m.pt")]
    assert cli_main([*train, f"model.init_from={tmp_path / 'nothing.pt'}"]) == 2
    assert "model.init_from: no model file or checkpoint folder at" in caplog.text
    assert cli_main([*train, f"model.init_from={source}", "model.preset=ssd300_vgg16"]) == 2
    assert "is a ssd_tiny model, but model.preset is ssd300_vgg16" in caplog.text
    assert not ray.is_initialized()


def test_a_fresh_run_logs_the_boxes_report_where_dvc_yaml_puts_it(tmp_path):
    """The driver's MLflow run gets reports/boxes.json, sizes.png and data/prior_recall (when the stage ran)."""
    from pipeline.stages.train import _log_data_report

    class Recorder:  # the two tracker calls the driver makes here
        def __init__(self):
            self.calls = []

        def log_artifact(self, path, artifact_path=None):
            self.calls.append((Path(path).relative_to(tmp_path).as_posix(), artifact_path))

        def log_metrics(self, metrics, step):
            self.calls.append((metrics, step))

    shutil.copy(Path(__file__).resolve().parents[3] / "dvc.yaml", tmp_path / "dvc.yaml")
    recorder = Recorder()
    _log_data_report(recorder, tmp_path)
    assert recorder.calls == []  # the boxes stage has not run
    (tmp_path / "reports" / "boxes").mkdir(parents=True)
    (tmp_path / "reports" / "boxes.json").write_text(json.dumps({"prior_recall": 0.75}))
    (tmp_path / "reports" / "boxes" / "sizes.png").write_bytes(b"png")
    _log_data_report(recorder, tmp_path)
    assert recorder.calls == [
        ("reports/boxes.json", "data_report"),
        ("reports/boxes/sizes.png", "data_report"),
        ({"data/prior_recall": 0.75}, 0),
    ]
