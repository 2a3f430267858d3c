"""pipeline.tracking.runs on a real SQLite store: finding, creating and continuing runs at start-up."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.runs import (
    EXPERIMENT_KIND_TAG,
    TRAINING_EXPERIMENT,
    connect,
    continue_run,
    create_run,
    experiment_id,
    find_run_by_tag,
)
from pipeline.tracking.uris import TrackingError


@pytest.fixture
def store(tmp_path, monkeypatch):
    """``(cfg, repo, uri, client)`` for a SQLite store at ``<repo>/mlflow.db`` (created on connect)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(experiment="runs-test")
    uri, client = connect(cfg, tmp_path, None)
    return cfg, tmp_path, uri, client


def test_find_run_by_tag_gives_the_newest_tagged_run_or_none(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(experiment="runs-test")
    assert find_run_by_tag(cfg, tmp_path, "model_sha256", "abc") is None
    assert not (tmp_path / "mlflow.db").exists()  # looking creates no store
    uri, client = connect(cfg, tmp_path, None)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert find_run_by_tag(cfg, tmp_path, "model_sha256", "abc") is None  # no such experiment yet
    experiment = experiment_id(client, cfg.experiment, None)
    runs = []
    for name in ("a", "b", "c"):
        runs.append(create_run(client, experiment, name, tmp_path))
        time.sleep(0.01)  # distinct start times (milliseconds): "newest" is well defined
    first, second, other = runs
    for run, value in ((first, "abc"), (second, "abc"), (other, "xyz")):
        client.set_tag(run, "model_sha256", value)
    assert find_run_by_tag(cfg, tmp_path, "model_sha256", "abc") == second
    assert find_run_by_tag(cfg, tmp_path, "model_sha256", "none") is None


def test_continue_run_reads_back_the_last_steps_and_params_and_sets_the_status(store):
    cfg, repo, uri, client = store
    experiment = experiment_id(client, cfg.experiment, None)
    assert experiment_id(client, cfg.experiment, None) == experiment  # found, not created twice
    run_id = create_run(client, experiment, "job", repo)
    for step in (1, 5, 3):
        client.log_metric(run_id, "train/loss", 1.0, step=step)
    client.log_param(run_id, "train.lr", "0.01")
    client.set_terminated(run_id, "FAILED")
    stored = continue_run(client, uri, run_id, "RUNNING")
    assert stored.run_id == run_id and stored.last_step == {"train/loss": 5} and stored.params == {"train.lr": "0.01"}
    assert client.get_run(run_id).info.status == "RUNNING"
    assert continue_run(client, uri, run_id, None).last_step == {"train/loss": 5}


def test_a_deleted_run_or_experiment(store):
    cfg, repo, uri, client = store
    experiment = experiment_id(client, cfg.experiment, None)
    run_id = create_run(client, experiment, "job", repo)
    client.delete_run(run_id)
    with pytest.raises(TrackingError, match=f"run {run_id} in sqlite:///.* is deleted"):
        continue_run(client, uri, run_id, "RUNNING")
    with pytest.raises(TrackingError, match="is not in sqlite:///"):
        continue_run(client, uri, "0" * 32, "RUNNING")
    client.delete_experiment(experiment)
    assert experiment_id(client, cfg.experiment, None) == experiment  # restored, not replaced
    assert MlflowClient(uri).get_experiment(experiment).lifecycle_stage == "active"


def test_experiments_are_marked_as_model_training_for_the_ui(store):
    """MLflow 3's UI opens an experiment without ``mlflow.experimentKind`` in a view it guesses (often GenAI);
    a new experiment and an old unmarked one get the training kind; a kind a person chose is kept."""
    cfg, _, _, client = store
    new = experiment_id(client, cfg.experiment, None)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert experiment_id(client, "made-elsewhere", None) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    experiment_id(client, "chosen", None)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
