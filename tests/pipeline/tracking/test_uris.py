"""pipeline.tracking.uris: where the store is, credentials split off URIs, redaction, the server probe."""

from __future__ import annotations

import time

import pytest

from pipeline.config import Params, TrackingConfig, params_to_dict
from pipeline.tracking.uris import (
    TrackingError,
    default_tracking_uri,
    detach_credentials,
    probe_server,
    redact_params,
    redact_uri,
    resolve_tracking_uri,
    run_page_url,
    split_credentials,
    tracking_credentials,
)
from pipeline.training.job import TrainJob
from tests.pipeline.mlflow_server import free_port


def test_uri_precedence_and_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert default_tracking_uri(tmp_path) == "http://team:5000"
    assert default_tracking_uri(tmp_path, "sqlite:///runs/x.db") == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("https://h/x", tmp_path) == "https://h/x"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://alice:s3cret@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("https://alice@h/api?x=1", "https://***@h/api?x=1"),  # a user alone is hidden too
        ("http://alice:p@ss/w0rd@h:5000/x", "http://***@h:5000/x"),  # unescaped @ and / in the password
        ("s3://AKIA:abc/def@bucket/runs/ssd-1", "s3://***@bucket/runs/ssd-1"),
        (
            "https://h/shards?token=t0k&n=2&X-Amz-Signature=abc",
            "https://h/shards?token=***&n=2&X-Amz-Signature=***",
        ),
        ("run s3://k:s@b/r failed: 'http://u:p@h' refused", "run s3://***@b/r failed: 'http://***@h' refused"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),  # nothing to hide: unchanged
        ("/data/shards and me@example.com", "/data/shards and me@example.com"),
    ],
)
def test_redact_uri_hides_userinfo_and_secret_query_values(text, shown):
    assert redact_uri(text) == shown


def test_run_page_url_opens_the_training_view_without_userinfo():
    """MLflow 3.17's UI shows its GenAI pages unless the URL (or the browser's remembered toggle) asks for the
    model-training ones; checked in headless Chromium: the experiment tag alone still opened the GenAI overview."""
    assert run_page_url("http://alice:secret@127.0.0.1:5000/", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )


def test_split_credentials_gives_the_clean_uri_and_mlflows_credential_variables():
    assert split_credentials("http://alice:p%40ss%2Fx@h:5000/p?q=1") == (
        "http://h:5000/p?q=1",
        {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss/x"},
    )
    assert split_credentials("https://alice@h") == ("https://h", {"MLFLOW_TRACKING_USERNAME": "alice"})
    assert split_credentials("http://h:5000") == ("http://h:5000", {})
    assert split_credentials("sqlite:////a/b.db") == ("sqlite:////a/b.db", {})
    environ = {"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_USERNAME": ""}
    assert tracking_credentials("http://h", environ) == {"MLFLOW_TRACKING_TOKEN": "t"}
    assert tracking_credentials("http://u:p@h", environ) == {
        "MLFLOW_TRACKING_USERNAME": "u",
        "MLFLOW_TRACKING_PASSWORD": "p",
    }


def test_detach_credentials_moves_them_from_params_and_environment_to_mlflows_variables():
    params = Params(tracking=TrackingConfig(uri="http://alice:pw@h:5000"))
    environ = {"MLFLOW_TRACKING_URI": "http://bob:other@team:5000"}
    clean = detach_credentials(params, environ)
    assert clean.tracking.uri == "http://h:5000" and params.tracking.uri == "http://alice:pw@h:5000"  # a copy
    assert environ == {  # tracking.uri is the one in use
        "MLFLOW_TRACKING_URI": "http://team:5000",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "pw",
    }
    environ = {"MLFLOW_TRACKING_URI": "http://bob:other@team:5000"}
    assert detach_credentials(Params(), environ) == Params()
    assert environ == {
        "MLFLOW_TRACKING_URI": "http://team:5000",
        "MLFLOW_TRACKING_USERNAME": "bob",
        "MLFLOW_TRACKING_PASSWORD": "other",
    }


def test_recorded_params_and_a_jobs_repr_show_no_secret():
    params = Params()
    params.train.storage_path = "s3://AKIA:secret@bucket/runs"
    recorded = redact_params(params_to_dict(params))
    assert recorded["train"]["storage_path"] == "s3://***@bucket/runs"
    assert recorded["train"]["milestones"] == [] and recorded["train"]["lr"] == params.train.lr  # the rest as is
    job = TrainJob(
        params=params,
        shards="https://h/s?token=t0k3n",
        classes=("a",),
        run_uri="s3://AKIA:secret@b/r",
        repo_root="/r",
        data_digest="d",
        tracking_credentials={"MLFLOW_TRACKING_PASSWORD": "pa55"},
    )
    shown = repr(job)  # Ray records str(job) in its run state
    assert "secret" not in shown and "t0k3n" not in shown and "pa55" not in shown
    assert "s3://***@b/r" in shown and "data_digest='d'" in shown


def test_probe_of_a_silent_server_fails_in_time_naming_the_uri_without_its_password():
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as raised:
        probe_server(uri, timeout_s=1.0)
    assert time.monotonic() - started < 1.0 + 1.0
    assert "http://***@127.0.0.1:" in str(raised.value) and "s3cret" not in str(raised.value)
