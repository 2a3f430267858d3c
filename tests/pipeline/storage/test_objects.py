"""pipeline.storage.objects on a local folder and on the real S3 server: the same calls, the same results."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh folder: a local one, or a prefix on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    server = request.getfixturevalue("s3_env")
    return server.fresh_url("root")


def test_write_then_read_round_trips(root):
    data = os.urandom(70_000)
    target = storage.join(root, "sub", "blob.bin")
    assert not storage.exists(target)
    storage.put_bytes(target, data)
    assert storage.read_bytes(target) == data
    assert storage.size(target) == len(data)
    assert storage.exists(target) and storage.exists(storage.join(root, "sub")) and storage.is_dir(root)
    assert storage.sha256_of(target) == (hashlib.sha256(data).hexdigest(), len(data))
    with storage.open_read(target) as handle:  # ranged reads, as the shard reader does them
        handle.seek(1000)
        assert handle.read(10) == data[1000:1010]


def test_a_missing_file_is_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nothing"))
    assert storage.list_folder(storage.join(root, "nothing")) == []


def test_list_folder_gives_the_direct_children(root):
    storage.put_bytes(storage.join(root, "b.txt"), b"12345")
    storage.put_bytes(storage.join(root, "a", "inner.txt"), b"x")
    storage.put_bytes(storage.join(root, "a", "deeper", "x.txt"), b"x")
    assert storage.list_folder(root) == [storage.Entry("a", True, 0), storage.Entry("b.txt", False, 5)]


def test_move_and_delete_a_folder(root):
    source = storage.join(root, "run")
    storage.put_bytes(storage.join(source, "outcome.json"), b"{}")
    storage.put_bytes(storage.join(source, "checkpoint_step_1", "state.pt"), b"state")
    target = storage.join(root, "run.replaced-1")
    storage.move(source, target)
    assert not storage.exists(source)
    assert storage.read_bytes(storage.join(target, "checkpoint_step_1", "state.pt")) == b"state"
    assert storage.read_bytes(storage.join(target, "outcome.json")) == b"{}"
    storage.move(storage.join(target, "outcome.json"), storage.join(root, "moved.json"))
    assert storage.read_bytes(storage.join(root, "moved.json")) == b"{}"
    storage.delete_tree(target)
    assert not storage.exists(target) and storage.exists(storage.join(root, "moved.json"))


def test_put_file_copies_a_local_file(root, tmp_path):
    local = tmp_path / "model.pt"
    local.write_bytes(b"weights" * 1000)
    storage.put_file(local, storage.join(root, "models", "ssd.pt"))
    assert storage.read_bytes(storage.join(root, "models", "ssd.pt")) == local.read_bytes()


def test_a_local_write_leaves_no_temporary_file(tmp_path):
    storage.put_bytes(str(tmp_path / "f.json"), b"1")
    storage.put_bytes(str(tmp_path / "f.json"), b"2")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and (tmp_path / "f.json").read_bytes() == b"2"


def test_an_object_store_write_is_one_put(s3_env):
    """Whole objects: one PutObject, no multipart upload that a reader could catch half-done."""
    url = s3_env.fresh_url("obj.bin")
    data = os.urandom(300_000)
    storage.put_bytes(url, data)
    bucket, key = url.removeprefix("s3://").split("/", 1)
    head = s3_env.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data) and "-" not in head["ETag"]  # a multipart ETag ends in -<parts>
