"""pipeline.shards.cache: one verified local copy per shard and machine, from the real S3 server."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import pytest

from pipeline import storage
from pipeline.shards.cache import CACHE_ENV, cache_dir, local_copy
from pipeline.shards.manifest import ShardError, load_manifest


@pytest.fixture
def remote(uneven_shards, s3_env, tmp_path, monkeypatch):
    """(manifest of the uploaded shards, their URL); an empty cache folder for this test."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = s3_env.fresh_url("shards")
    assert storage.exists(str(uneven_shards / "manifest.json"))
    for path in sorted(uneven_shards.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            storage.put_file(path, storage.join(url, path.name))
    return load_manifest(url, verify=False), url


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ssd-pipeline" / "shards"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def _copy(remote, name):
    manifest, url = remote
    shard = next(s for s in manifest.shards if s.name == name)
    return shard, local_copy(storage.join(url, name), shard)


def test_a_shard_is_downloaded_once_and_named_by_its_digest(remote, uneven_shards):
    shard, copy = _copy(remote, "train-000001.tar")
    assert copy == cache_dir() / f"{shard.sha256}.tar"
    assert copy.read_bytes() == (uneven_shards / shard.name).read_bytes()
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == shard.sha256
    storage.delete_tree(storage.join(remote[1], shard.name))  # the store no longer has it: the copy serves
    assert _copy(remote, "train-000001.tar")[1] == copy
    assert sorted(p.suffix for p in cache_dir().iterdir()) == [".lock", ".tar"]  # no temporary file left


def test_a_copy_that_does_not_match_the_manifest_is_refused_and_not_kept(remote):
    manifest, url = remote
    target = storage.join(url, "val-000000.tar")
    data = bytearray(storage.read_bytes(target))
    data[100] ^= 1
    storage.put_bytes(target, bytes(data))
    with pytest.raises(ShardError, match=f"shard {target}: downloaded {len(data)} bytes with sha256"):
        _copy(remote, "val-000000.tar")
    assert not any(p.suffix == ".tar" or p.name.endswith(".tmp") for p in cache_dir().iterdir())


def _race(args):
    url, name, cache = args
    os.environ[CACHE_ENV] = cache
    manifest = load_manifest(url, verify=False)
    shard = next(s for s in manifest.shards if s.name == name)
    return str(local_copy(storage.join(url, name), shard))


def test_processes_racing_for_one_shard_all_get_the_whole_copy(remote, s3_env):
    _, url = remote
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        got = pool.map(_race, [(url, "train-000000.tar", str(cache_dir()))] * 3)
    assert len(set(got)) == 1
    shard = next(s for s in remote[0].shards if s.name == "train-000000.tar")
    assert hashlib.sha256(open(got[0], "rb").read()).hexdigest() == shard.sha256
    assert sorted(p.suffix for p in cache_dir().iterdir()) == [".lock", ".tar"]
