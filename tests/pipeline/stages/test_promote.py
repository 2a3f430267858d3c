"""``python -m pipeline promote NAME@VERSION``: the champion moves, and who and why are recorded."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.serving.registry import CHAMPION, alias_version, register_version

pytestmark = pytest.mark.slow  # a SQLite store's schema takes a few seconds to create


def test_promote_by_hand(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the project's default store, here in tmp_path
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("e")
    run = client.create_run(experiment).info.run_id
    for _ in range(2):
        logged = client.create_logged_model(experiment, name="model", source_run_id=run)
        register_version(client, "ssd", model_id=logged.model_id, run_id=run, tags={})

    assert cli.main(["promote", "ssd@2", "--reason", "better on night images", "--user", "ana"]) == 0
    assert str(alias_version(client, "ssd", CHAMPION).version) == "2"
    tags = client.get_model_version("ssd", "2").tags
    assert (tags["promoted_by"], tags["promoted_reason"], tags["promoted_from"]) == (
        "ana",
        "better on night images",
        "none",
    )
    assert cli.main(["promote", "ssd@1", "--reason", "roll back"]) == 0
    assert client.get_model_version("ssd", "1").tags["promoted_from"] == "2"

    assert cli.main(["promote", "ssd@7", "--reason", "x"]) == 2 and "ssd has no version 7" in caplog.text
    assert cli.main(["promote", "ssd", "--reason", "x"]) == 2 and "expected NAME@VERSION" in caplog.text
    assert cli.main(["promote", "ssd@1", "--reason", "  "]) == 2 and "--reason must say why" in caplog.text
    assert str(alias_version(client, "ssd", CHAMPION).version) == "1"
