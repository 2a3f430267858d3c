"""The manifest check: truncated, missing, tampered and miscounted shards, shard names that leave the folder,
and shards opened through an fsspec URL."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.config import ShardConfig
from pipeline.shards.manifest import ShardError, load_manifest
from pipeline.stages.shard import shard


@pytest.fixture
def sharded(index_dir, tmp_path) -> Path:
    shard(index_dir, tmp_path, ShardConfig(maxcount=3), progress=False)
    assert load_manifest(str(tmp_path), verify=True).splits["train"].shards == 3
    return tmp_path


def test_manifest_catches_a_truncated_shard(sharded):
    path = sharded / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:-1024])
    for verify in (False, True):  # the size check runs even without hashing
        with pytest.raises(ShardError, match=r"train-000001\.tar: truncated"):
            load_manifest(str(sharded), verify=verify)


def test_manifest_catches_a_missing_shard(sharded):
    (sharded / "val-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"val-000000\.tar: missing"):
        load_manifest(str(sharded), verify=False)


def test_manifest_catches_a_tampered_shard(sharded):
    path = sharded / "train-000002.tar"
    blob = bytearray(path.read_bytes())
    blob[700] ^= 0xFF  # one byte of JPEG data, same size
    path.write_bytes(bytes(blob))
    load_manifest(str(sharded), verify=False)  # sizes agree: only hashing can tell
    with pytest.raises(ShardError, match=r"train-000002\.tar: sha256"):
        load_manifest(str(sharded), verify=True)


def test_manifest_catches_a_wrong_count_and_a_missing_manifest(sharded):
    data = json.loads((sharded / "manifest.json").read_text())
    data["shards"][0]["count"] += 1
    (sharded / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="count 4 but 3 sample rows"):
        load_manifest(str(sharded), verify=False)
    data["shards"][0]["count"] -= 1
    data["shards"][0]["samples"].pop()
    data["shards"][0]["count"] -= 1
    (sharded / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="holds 3 samples, the manifest lists 2"):
        load_manifest(str(sharded), verify=True)
    (sharded / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest"):
        load_manifest(str(sharded))


def test_shards_open_through_an_fsspec_url(sharded):
    manifest = load_manifest(f"file://{sharded}", verify=True)
    assert manifest.splits["train"].samples == 7


@pytest.mark.parametrize(
    "name",
    ["../outside.tar", "sub/train-000000.tar", "..\\outside.tar", "/tmp/outside.tar", "..", "", "train\0.tar", 7],
)
def test_a_shard_name_that_leaves_the_folder_is_refused(sharded, name):
    """A manifest is data: ``../outside.tar`` (hash and size matching a real file there) must not
    pass ``verify=True`` and be read as a training shard."""
    shutil.copy(sharded / "val-000000.tar", sharded.parent / "outside.tar")
    data = json.loads((sharded / "manifest.json").read_text())
    index = next(i for i, s in enumerate(data["shards"]) if s["name"] == "val-000000.tar")
    data["shards"][index]["name"] = name
    (sharded / "manifest.json").write_text(json.dumps(data))
    for verify in (False, True):
        with pytest.raises(ShardError, match=rf"shards\[{index}\]: shard name {re.escape(repr(name))} "):
            load_manifest(str(sharded), verify=verify)


def test_a_shard_listed_twice_is_refused(sharded):
    data = json.loads((sharded / "manifest.json").read_text())
    data["shards"].append(data["shards"][0])
    (sharded / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"shard 'train-000000.tar' is listed twice"):
        load_manifest(str(sharded), verify=False)
