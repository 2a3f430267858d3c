"""pipeline.storage.preflight against the real S3 server: a clear error naming the URL, within seconds."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline import storage
from pipeline.storage.preflight import PREFLIGHT_TIMEOUT_S
from tests.pipeline.mlflow_server import free_port

BOUND_S = 6.0  # what the tests hold the checks to (PREFLIGHT_TIMEOUT_S is the hard stop for a silent endpoint)


def _refusal(url: str, role: str = "--shards", **kwargs) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as caught:
        storage.check_reachable(url, role, **kwargs)
    return str(caught.value), time.monotonic() - started


def test_a_reachable_store_with_the_right_key_passes(s3_env):
    started = time.monotonic()
    storage.check_reachable(s3_env.fresh_url("shards"), "--shards")
    storage.check_reachable("/local/paths/are/not/probed", "--shards")
    assert time.monotonic() - started < BOUND_S


def test_a_wrong_key_is_named_within_seconds(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")
    url = s3_env.url("voc", "shards")
    message, took = _refusal(url)
    assert took < BOUND_S, took
    assert message.startswith(f"--shards {url} (endpoint {s3_env.endpoint}): credentials refused"), message
    assert "not-the-secret-at-all" not in message


def test_an_unknown_key_is_named(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000")
    message, took = _refusal(s3_env.url("runs"), "train.storage_path")
    assert took < BOUND_S and "train.storage_path" in message and "credentials refused" in message, message


def test_a_closed_port_is_named_within_seconds(s3_env, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    message, took = _refusal(s3_env.url("voc", "shards"))
    assert took < BOUND_S, took
    assert f"(endpoint http://127.0.0.1:{port}): cannot reach the endpoint" in message, message


def test_an_endpoint_that_never_answers_stops_at_the_timeout(s3_env, monkeypatch):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        message, took = _refusal(s3_env.url("x"), timeout_s=1.5)
    assert 1.5 <= took < 1.5 + 3.0, took  # the bound, plus slack for a loaded 2-core machine
    assert "cannot reach the endpoint (no answer within 1.5 s)" in message
    assert PREFLIGHT_TIMEOUT_S <= 10.0  # the default bound the stages use


def test_no_credentials_at_all_says_where_they_are_looked_for(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup on a laptop
    message, took = _refusal(s3_env.url("x"))
    assert took < BOUND_S and "no credentials found" in message and "AWS_PROFILE" in message, message


def test_a_missing_bucket_is_named(s3_env):
    message, _ = _refusal("s3://no-such-bucket-here/shards")
    assert "s3://no-such-bucket-here/shards" in message and "no bucket" in message, message


def test_check_all_probes_each_bucket_once_and_skips_local_paths(s3_env, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "pipeline.storage.preflight.check_reachable", lambda location, role, **_: calls.append((location, role))
    )
    storage.check_all(
        [(s3_env.url("a"), "--shards"), ("/tmp/x", "--model-out"), (s3_env.url("b"), "train.storage_path")]
    )
    assert calls == [(s3_env.url("a"), "--shards")]
