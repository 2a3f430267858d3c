"""Challenger and champion on a real SQLite registry: the champion only improves on the same validation data,
and a promotion by hand says who, why, when and what it replaced. Then the same rule end to end (#16): two real
training runs on the same data, published to a real ``mlflow server`` and scored by the ``evaluate`` stage."""

from __future__ import annotations

import json

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.serving.registry import (
    CHALLENGER,
    CHAMPION,
    CHAMPION_METRIC,
    DECISION_TAG,
    VAL_DIGEST_TAG,
    alias_version,
    consider_champion,
    promote,
    register_version,
)

NAME = "ssd-registry-test"
DATA_A, DATA_B = "a" * 64, "b" * 64


pytestmark = pytest.mark.slow  # a SQLite store's schema takes ~5 s to create; the module shares one


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def client(store, request, monkeypatch):
    """The shared store, with this test's own registered model name."""
    monkeypatch.setattr(f"{__name__}.NAME", f"ssd-{request.node.name.removeprefix('test_')[:40]}")
    return store


def _new_version(client, tmp_path, value: float | None = None, digest: str = DATA_A) -> str:
    experiment = client.get_experiment_by_name("e") or client.get_experiment(client.create_experiment("e"))
    run = client.create_run(experiment.experiment_id)
    logged = client.create_logged_model(experiment.experiment_id, name="model", source_run_id=run.info.run_id)
    version = register_version(
        client, NAME, model_id=logged.model_id, run_id=run.info.run_id, tags={"data_digest": "d"}
    )
    if value is not None:  # what evaluate records before it decides
        client.set_model_version_tag(NAME, version, VAL_DIGEST_TAG, digest)
        client.set_model_version_tag(NAME, version, CHAMPION_METRIC, str(value))
    return version


def test_every_new_version_is_the_challenger(client, tmp_path):
    first = _new_version(client, tmp_path)
    assert str(alias_version(client, NAME, CHALLENGER).version) == first == "1"
    second = _new_version(client, tmp_path)
    assert str(alias_version(client, NAME, CHALLENGER).version) == second == "2"
    registered = client.get_model_version(NAME, second)
    assert registered.tags["data_digest"] == "d" and registered.source.startswith("models:/m-")
    model_id = registered.source.removeprefix("models:/")  # this store's versions do not return model_id
    links = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert links == [{"name": NAME, "version": 2}]
    assert alias_version(client, NAME, CHAMPION) is None


def test_the_champion_only_improves_on_the_same_validation_data(client, tmp_path):
    v1 = _new_version(client, tmp_path, 0.50)
    first = consider_champion(client, NAME, v1, value=0.50, data_digest=DATA_A)
    assert first.promoted and "first champion" in first.reason
    assert str(alias_version(client, NAME, CHAMPION).version) == v1

    v2 = _new_version(client, tmp_path, 0.40)
    worse = consider_champion(client, NAME, v2, value=0.40, data_digest=DATA_A)
    assert not worse.promoted and "0.4000 does not beat champion version 1's 0.5000" in worse.reason
    assert str(alias_version(client, NAME, CHAMPION).version) == v1
    assert client.get_model_version(NAME, v2).tags[DECISION_TAG] == worse.reason

    v3 = _new_version(client, tmp_path, 0.50)
    tie = consider_champion(client, NAME, v3, value=0.50, data_digest=DATA_A)
    assert not tie.promoted  # equal is not better

    v4 = _new_version(client, tmp_path, 0.90, digest=DATA_B)
    other_data = consider_champion(client, NAME, v4, value=0.90, data_digest=DATA_B)
    assert not other_data.promoted and "different data do not compare" in other_data.reason
    assert str(alias_version(client, NAME, CHAMPION).version) == v1

    v5 = _new_version(client, tmp_path, 0.55)
    better = consider_champion(client, NAME, v5, value=0.55, data_digest=DATA_A)
    assert better.promoted and "0.5500 > 0.5000" in better.reason
    assert str(alias_version(client, NAME, CHAMPION).version) == v5
    again = consider_champion(client, NAME, v5, value=0.55, data_digest=DATA_A)  # evaluate re-run
    assert again.promoted and "already the champion" in again.reason


def test_a_champion_without_recorded_metrics_is_not_replaced_silently(client, tmp_path):
    v1 = _new_version(client, tmp_path)  # promoted by hand, never evaluated
    promote(client, NAME, v1, user="ana", reason="baseline")
    v2 = _new_version(client, tmp_path, 0.9)
    decision = consider_champion(client, NAME, v2, value=0.9, data_digest=DATA_A)
    assert not decision.promoted and f"python -m pipeline promote {NAME}@{v2}" in decision.reason


def test_promote_records_who_why_when_and_the_previous_champion(client, tmp_path):
    v1 = _new_version(client, tmp_path, 0.6)
    consider_champion(client, NAME, v1, value=0.6, data_digest=DATA_A)
    v2 = _new_version(client, tmp_path, 0.1)
    assert promote(client, NAME, v2, user="ana", reason="roll back: v1 fails on night images") == v1
    assert str(alias_version(client, NAME, CHAMPION).version) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promoted_by"] == "ana" and tags["promoted_reason"] == "roll back: v1 fails on night images"
    assert tags["promoted_from"] == v1 and tags["promoted_at"].endswith("+00:00")
    with pytest.raises(MlflowException) as missing:
        promote(client, NAME, "99", user="ana", reason="x")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert str(alias_version(client, NAME, CHAMPION).version) == v2


# ------------------------------------------------------------------------------ two real runs, one data set
TRAINING = {  # the embedded default's data, model and optimiser, shrunk: ssd_tiny on 96 synthetic images, batch 8
    "data.synthetic.num_train": 96,
    "data.synthetic.num_val": 32,
    "data.synthetic.num_test": 0,  # evaluate scores val: the split the champion's metric is named after
    "train.batch_size": 8,
    "train.lr_reference_batch": 8,
    "train.optimizer": "adamw",
    "train.lr": 2e-3,
    "train.weight_decay": 0.05,
    "train.warmup_steps": 5,
    "train.val_every_steps": 0,
}
BETTER_STEPS, WORSE_STEPS = 60, 2  # 60 steps reach VOC07 mAP 0.033 on these 32 images; 2 steps score 0


@pytest.mark.timeout(600)
def test_two_real_runs_the_better_is_champion_and_the_worse_evaluated_after_stays_challenger(
    tmp_path, monkeypatch, caplog
):
    """Two real trainings (the loop's steps without Ray) on the same shards, each published to a real
    ``mlflow server`` as train publishes (model file logged to its run, MLflow model registered as the
    ``challenger``), then scored by the real ``evaluate`` stage, better run first: it becomes the champion;
    the worse run, registered and evaluated after it, stays the challenger and its decision says why."""
    from pipeline.artifacts.model_file import save_model_file
    from pipeline.config import TrackingConfig, params_to_dict
    from pipeline.serving.publish import publish_model
    from pipeline.stages.evaluate import validation_digest
    from pipeline.stages.train import build_job
    from pipeline.tracking import MlflowTracker
    from tests.pipeline.fixtures import make_params, prepare_and_shard, run_evaluate
    from tests.pipeline.mlflow_server import MlflowServer
    from tests.pipeline.serving.conftest import REPO
    from tests.pipeline.training.test_init_from import train_steps

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name, experiment = "ssd-two-runs", "two-runs"
    _, shards = prepare_and_shard(make_params(**TRAINING), tmp_path / "data")
    server = MlflowServer(tmp_path / "mlflow-server").start(timeout_s=240)
    cfg = TrackingConfig(uri=server.url, experiment=experiment, model_name=name)
    tracking = [f"tracking.uri={server.url}", f"tracking.experiment={experiment}", f"tracking.model_name={name}"]
    client = MlflowClient(server.url)
    scores, decisions = {}, {}
    try:
        for run, steps in (("better", BETTER_STEPS), ("worse", WORSE_STEPS)):
            params = make_params(**TRAINING, **{"train.max_steps": steps, "train.run_name": run})
            job = build_job(str(shards), params, tmp_path)
            model_file = tmp_path / run / "ssd.pt"
            recorded = params_to_dict(params)
            save_model_file(model_file, train_steps(job, steps, shards), classes=list(job.classes), params=recorded)
            tracker = MlflowTracker(cfg, run_id=None, run_name=run, repo_root=REPO)
            tracker.log_model_file(model_file, register=False)  # evaluate finds the run by the file's sha256
            assert tracker.close()
            published = publish_model(
                cfg,
                repo_root=REPO,
                run_id=tracker.run_id,
                model_file=model_file,
                params=recorded,
                data_digest=job.data_digest,
            )
            assert str(alias_version(client, name, CHALLENGER).version) == published.version

            out = tmp_path / "evaluate" / run
            code = run_evaluate(
                model_file,
                shards,
                out,
                "eval.batch_size=8",
                "eval.num_workers=0",
                "eval.num_sample_images=2",
                *tracking,
            )
            assert code == 0
            scores[run] = json.loads((out / "eval.json").read_text())["map_voc07"]
            version = client.get_model_version(name, published.version)
            assert float(version.tags[CHAMPION_METRIC]) == pytest.approx(scores[run], abs=1e-6)  # eval.json: 6 places
            assert version.tags[VAL_DIGEST_TAG] == validation_digest(str(shards))  # the same data for both
            decisions[run] = (published.version, version.tags[DECISION_TAG])

        assert scores["better"] > scores["worse"] + 0.01, scores  # training learnt: the comparison means something
        (better, why_better), (worse, why_worse) = decisions["better"], decisions["worse"]
        assert (
            why_better == f"version {better} is the first champion of {name} ({CHAMPION_METRIC} {scores['better']:.4f})"
        )
        assert why_worse == (
            f"not promoted: version {worse}'s {CHAMPION_METRIC} {scores['worse']:.4f} does not beat champion "
            f"version {better}'s {scores['better']:.4f} on the same validation data"
        )
        assert str(alias_version(client, name, CHAMPION).version) == better
        assert str(alias_version(client, name, CHALLENGER).version) == worse
        assert f"champion: {why_worse}" in caplog.text  # evaluate says it, not only the tag
    finally:
        server.stop()
