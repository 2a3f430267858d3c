"""The stages refuse an object store they cannot use before any work, within seconds, naming the URL: train
before Ray starts, evaluate and predict before reading the model (against the real S3 server)."""

from __future__ import annotations

import logging
import time

import pytest
import ray

from pipeline.cli import main as cli_main
from tests.pipeline.fixtures import image_with_box, save_jpeg
from tests.pipeline.mlflow_server import free_port

pytestmark = pytest.mark.slow


def _train(shards: str, runs: str, model_out: str) -> int:
    argv = ["train", "--shards", shards, "--model-out", model_out, "model.preset=ssd_tiny", "tracking.enabled=false"]
    return cli_main([*argv, f"train.storage_path={runs}"])


def test_a_wrong_key_stops_train_before_ray_starts_any_work(s3_env, uneven_shards, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    shards = s3_env.fresh_url("shards")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        assert _train(shards, s3_env.fresh_url("runs"), str(tmp_path / "m.pt")) == 2
    assert time.monotonic() - started < 10 and not ray.is_initialized()
    assert f"--shards {shards} (endpoint {s3_env.endpoint}): credentials refused" in caplog.text
    assert "not-the-key" not in caplog.text


def test_evaluate_and_predict_name_an_unreachable_model_url(s3_env, uneven_shards, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    model = s3_env.fresh_url("models", "ssd.pt")
    photo = save_jpeg(tmp_path / "photos" / "a.jpg", image_with_box((64, 48), (8, 8, 40, 30)))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        assert cli_main(["predict", "--model", model, str(photo), "--out", str(tmp_path / "p")]) == 2
        code = cli_main(
            [
                "evaluate",
                "--model",
                model,
                "--shards",
                str(uneven_shards),
                "--metrics",
                str(tmp_path / "e.json"),
                "--plots",
                str(tmp_path / "plots"),
                "--out",
                str(tmp_path / "eval"),
                "tracking.enabled=false",
            ]
        )
    assert code == 2 and time.monotonic() - started < 20
    assert caplog.text.count(f"--model {model} (endpoint http://127.0.0.1:") == 2
    assert "cannot reach the endpoint" in caplog.text
