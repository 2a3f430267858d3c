"""A trained model published to a real ``mlflow server`` and served by a real ``mlflow models serve``.

One server for the module: the model file is published (``publish_model``: a LoggedModel of the run, a
registered version with the alias ``challenger`` and the provenance tags), promoted to ``champion``, and
served from ``models:/<name>@champion`` with ``--env-manager local``. A POST of a JPEG's bytes must return
exactly the detections ``python -m pipeline predict`` writes for the same file, and bad requests must get a
4xx with a reason instead of a traceback. ``predict`` and ``export`` read the same registered model.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.config import TrackingConfig, load_params, params_to_dict
from pipeline.serving.publish import params_digest, publish_model
from pipeline.serving.registry import CHALLENGER, CHAMPION, alias_version, promote
from pipeline.tracking import MODEL_DIGEST_TAG, MlflowTracker, file_sha256, git_commit
from pipeline.tracking.runs import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT
from tests.pipeline.fixtures import image_with_box, png_header_only, save_jpeg
from tests.pipeline.mlflow_server import MlflowServer, free_port
from tests.pipeline.serving.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
NAME = "ssd-serve"
SERVE_STARTUP_S = 180.0


class Published:
    def __init__(self, server, cfg, run_id, result, params):
        self.server, self.cfg, self.run_id, self.result, self.params = server, cfg, run_id, result, params


@pytest.fixture(scope="module")
def published(tmp_path_factory, random_file):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start(timeout_s=240)  # a busy machine is slow
    try:
        cfg = TrackingConfig(uri=server.url, experiment="serve-test", model_name=NAME)
        tracker = MlflowTracker(cfg, run_id=None, run_name="train", repo_root=REPO)
        tracker.log_model_file(random_file, register=False)
        assert tracker.close()
        params = params_to_dict(load_params(None))
        result = publish_model(
            cfg, repo_root=REPO, run_id=tracker.run_id, model_file=random_file, params=params, data_digest="d" * 64
        )
        yield Published(server, cfg, tracker.run_id, result, params)
    finally:
        server.stop()


def test_the_model_is_logged_to_the_run_and_registered_as_the_challenger(published, random_file):
    client = MlflowClient(published.server.url)
    logged = client.get_logged_model(published.result.model_id)
    assert logged.source_run_id == published.run_id and logged.status.to_int() == logged.status.READY.to_int()
    outputs = client.get_run(published.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [published.result.model_id]
    version = alias_version(client, NAME, CHALLENGER)
    assert str(version.version) == published.result.version == "1"
    assert version.source == f"models:/{published.result.model_id}" and version.run_id == published.run_id
    assert version.tags["data_digest"] == "d" * 64
    assert version.tags["params_digest"] == params_digest(published.params)
    assert version.tags[MODEL_DIGEST_TAG] == file_sha256(random_file)
    assert version.tags["git_commit"] == git_commit(REPO)[0]
    experiment = client.get_experiment_by_name("serve-test")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT


def test_the_runs_model_folder_holds_only_the_model_file(published, random_file):
    """MLflow 3 lists ``runs:/<run>/<name>`` as the run's folder plus the run's logged model of that name: the
    logged model must not share the name of the folder that holds ``ssd.pt``."""
    client = MlflowClient(published.server.url)
    assert client.get_logged_model(published.result.model_id).name != "model"
    assert {a.path for a in client.list_artifacts(published.run_id, "model")} == {f"model/{random_file.name}"}


def test_params_digest_ignores_key_order():
    assert params_digest({"a": 1, "b": {"c": 2, "d": 3}}) == params_digest({"b": {"d": 3, "c": 2}, "a": 1})
    assert params_digest({"a": 1}) != params_digest({"a": 2})


@pytest.fixture(scope="module")
def served(published, tmp_path_factory):
    """``mlflow models serve -m models:/ssd-serve@champion --env-manager local`` on a free loopback port."""
    client = MlflowClient(published.server.url)
    promote(client, NAME, published.result.version, user="test", reason="serve it")
    port = free_port()
    cwd = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": published.server.url,
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # serve execs uvicorn
    }
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        *("models", "serve", "-m", f"models:/{NAME}@{CHAMPION}", "--env-manager", "local"),
        *("-h", "127.0.0.1", "-p", str(port), "--workers", "1"),
    ]
    log = cwd / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_STARTUP_S
        while True:
            assert process.poll() is None, f"mlflow models serve exited: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /ping answer in {SERVE_STARTUP_S} s: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the group this test started (start_new_session), by its PID
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def images_request(*images: bytes, column: str = "image", **params) -> bytes:
    data = [[base64.b64encode(image).decode()] for image in images]
    body = {"dataframe_split": {"columns": [column], "data": data}}
    if params:
        body["params"] = params
    return json.dumps(body).encode()


def predict_cli(tmp_path: Path, model: str, image: Path, *extra: str) -> dict:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    assert cli.main(["predict", "--model", model, str(image), "--out", str(out), "--no-draw", *extra]) == 0
    return json.loads((out / "detections.json").read_text())


def test_a_posted_jpeg_gets_exactly_predicts_detections(served, published, random_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = save_jpeg(tmp_path / "photo.jpg", image_with_box((120, 80), (20, 10, 70, 60), seed=7))
    status, text = post(served, images_request(image.read_bytes()))
    assert status == 200, text
    rows = json.loads(text)["predictions"]
    document = predict_cli(tmp_path, str(random_file), image)
    annotations = document["annotations"]
    assert len(rows) == len(annotations) > 0
    names = {c["id"]: c["name"] for c in document["categories"]}
    for row, annotation in zip(rows, annotations, strict=True):
        assert row["image"] == 0 and row["label"] == annotation["category_id"] == annotation["category_id"]
        assert row["class_name"] == names[row["label"]]
        # detections.json's rounding (pipeline.stages.predict_outputs), applied to the served floats
        xywh = [row["x1"], row["y1"], row["x2"] - row["x1"], row["y2"] - row["y1"]]
        assert [round(v, 2) for v in xywh] == annotation["bbox"]
        assert round(row["score"], 5) == annotation["score"]
    # predict reads the same registered model
    registered = predict_cli(tmp_path, f"models:/{NAME}@{CHAMPION}", image, f"tracking.uri={published.server.url}")
    assert registered["annotations"] == annotations
    high_status, high = post(served, images_request(image.read_bytes(), min_score=0.75))  # the params of the request
    kept = json.loads(high)["predictions"]
    assert high_status == 200 and kept == [r for r in rows if r["score"] >= 0.75] and 0 < len(kept) < len(rows)


def test_export_reads_the_registered_model(published, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "served.onnx"
    code = cli.main(
        ["export", "--model", f"models:/{NAME}@{CHAMPION}", "--out", str(out), f"tracking.uri={published.server.url}"]
    )
    assert code == 0 and out.stat().st_size > 0
    assert (
        cli.main(["predict", "--model", f"models:/{NAME}@nobody", str(out), f"tracking.uri={published.server.url}"])
        == 2
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (images_request(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 truncated"), "row 0: image_"),
        (images_request(png_header_only(20_000, 20_000)), "row 0: image_too_large"),
        (b"", ""),
        (images_request(b"abc", column="picture"), "image"),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["not base64!"]]}}).encode(), ""),
    ],
    ids=["corrupt_jpeg", "png_bomb", "empty_body", "wrong_column", "not_base64"],
)
def test_bad_requests_get_a_4xx_with_a_reason(served, body, reason):
    status, text = post(served, body)
    assert 400 <= status < 500, (status, text)
    assert "Traceback" not in text and "stack_trace" not in text, text
    assert reason in json.loads(text)["message"]
