"""pipeline.storage.filesystem: locations to (fs, path), credentials only from the environment, Ray's wrapper."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage
from pipeline.storage.filesystem import describe, endpoint


def test_local_locations_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_local("runs") and storage.is_local("file:///x") and not storage.is_local("s3://b/k")
    assert storage.is_url("file:///x") and not storage.is_url("/a/b")
    assert storage.absolute("runs") == str(tmp_path / "runs")
    assert storage.absolute("runs", "/elsewhere") == "/elsewhere/runs"
    assert storage.absolute("s3://b/runs", "/elsewhere") == "s3://b/runs"
    fs, path = storage.filesystem("runs")
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "runs")
    fs, path = storage.filesystem(f"file://{tmp_path}/x")
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "x")


def test_join_never_doubles_a_slash():
    assert storage.join("s3://b/runs/", "r-1", "/checkpoint_step_1") == "s3://b/runs/r-1/checkpoint_step_1"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"


@pytest.mark.parametrize("url", ["s3://AKIAX:hunter2secret@bucket/shards", "s3://AKIAX@bucket/shards"])
def test_a_key_in_the_url_is_refused_without_showing_it(url):
    with pytest.raises(storage.StorageError, match="credentials in a storage URL are not accepted") as caught:
        storage.filesystem(url)
    assert "hunter2secret" not in str(caught.value) and "AKIAX" not in str(caught.value)


def test_an_unknown_protocol_is_named():
    with pytest.raises(storage.StorageError, match="nosuchproto://"):
        storage.filesystem("nosuchproto://bucket/x")


def test_the_endpoint_comes_from_the_environment_s3_specific_first(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert endpoint() is None
    assert describe("s3://b/k") == "s3://b/k (endpoint AWS default)"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert endpoint() == "http://127.0.0.1:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")
    assert endpoint() == "http://127.0.0.1:9001"
    assert describe("s3://b/k") == "s3://b/k (endpoint http://127.0.0.1:9001)"
    assert describe("/local/path") == "/local/path"


def test_the_s3_filesystem_follows_the_environment(s3_env, monkeypatch):
    fs, path = storage.filesystem(s3_env.url("a", "b"))
    assert path == f"{s3_env.bucket}/a/b"
    assert storage.filesystem(s3_env.url("c"))[0] is fs  # same environment: the same client
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another")
    assert storage.filesystem(s3_env.url("c"))[0] is not fs  # another key: never the stale client
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    assert storage.filesystem(s3_env.url("c"))[0] is fs


def test_the_s3_filesystem_pickles_without_the_secret(s3_env):
    fs, _ = storage.filesystem(s3_env.url())
    blob = pickle.dumps(fs)
    assert s3_env.secret_key.encode() not in blob and s3_env.access_key.encode() not in blob
    assert pickle.loads(blob).endpoint_url == s3_env.endpoint


def test_rays_filesystem_is_the_same_implementation(s3_env, tmp_path):
    url = s3_env.fresh_url("runs")
    storage.put_bytes(storage.join(url, "r", "x.json"), b"{}")
    arrow, path = storage.arrow_filesystem(url)
    assert isinstance(arrow, pyarrow.fs.PyFileSystem)
    assert isinstance(arrow.handler, pyarrow.fs.FSSpecHandler)
    with arrow.open_input_stream(f"{path}/r/x.json") as handle:
        assert handle.read() == b"{}"
    with arrow.open_output_stream(f"{path}/r/y.json") as handle:  # how Ray writes its files
        handle.write(b"[1]")
    assert storage.read_bytes(storage.join(url, "r", "y.json")) == b"[1]"
    local, local_path = storage.arrow_filesystem(str(tmp_path / "runs"))
    assert isinstance(local, pyarrow.fs.LocalFileSystem) and local_path == str(tmp_path / "runs")
    assert Path(local_path).parent == tmp_path
