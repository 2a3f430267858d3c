"""Challenger and champion on a real SQLite registry: the champion only improves on the same validation data,
and a promotion by hand says who, why, when and what it replaced."""

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
