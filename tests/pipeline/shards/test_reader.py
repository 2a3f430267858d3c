"""ShardReader: the same bytes from a local folder and from the real S3 server (through the shard cache)."""

from __future__ import annotations

import tarfile

import pytest

from pipeline import storage
from pipeline.shards.cache import CACHE_ENV
from pipeline.shards.manifest import load_manifest
from pipeline.shards.reader import CorruptSample, ShardReader


def _members_by_tarfile(shards_dir, manifest, split):
    """The slow reference: every sample's two members, extracted with tarfile, in manifest order."""
    out = []
    for shard in manifest.split_shards(split):
        with tarfile.open(shards_dir / shard.name) as tar:
            for loc in shard.samples:
                jpg = tar.extractfile(f"{loc.key}.jpg").read()
                meta = tar.extractfile(f"{loc.key}.json").read()
                out.append((jpg, meta))
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def remote_shards(uneven_shards, s3_env) -> str:
    url = s3_env.fresh_url("shards")
    for path in sorted(uneven_shards.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            storage.put_file(path, storage.join(url, path.name))
    return url


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_gives_the_tar_members(where, uneven_shards, request):
    root = str(uneven_shards) if where == "local" else request.getfixturevalue("remote_shards")
    manifest = load_manifest(root, verify=False)
    expected = _members_by_tarfile(uneven_shards, manifest, "train")  # 13 samples in shards of 5, 5, 3
    reader = ShardReader(root, manifest.split_shards("train"))
    try:
        assert [reader.read(i) for i in range(len(reader))] == expected
        order = [12, 0, 7, 3, 3, 11, 5]  # across all three shards, one sample twice, backwards too
        assert [reader.read(i) for i in order] == [expected[i] for i in order]
    finally:
        reader.close()


def test_a_truncated_object_makes_only_its_samples_corrupt(uneven_shards, remote_shards, cache):
    manifest = load_manifest(remote_shards, verify=False)
    shards = manifest.split_shards("train")
    last = shards[-1]  # train-000002.tar: samples 10, 11, 12
    whole = storage.read_bytes(storage.join(remote_shards, last.name))
    cut = last.samples[1].jpg_offset + 10  # inside sample 11's image
    storage.put_bytes(storage.join(remote_shards, last.name), whole[:cut])
    reader = ShardReader(remote_shards, shards)
    got = []
    try:
        for index in [0, 10, 11, 12]:
            try:
                got.append(reader.read(index))
            except CorruptSample as error:
                got.append(error)
    finally:
        reader.close()
    assert not isinstance(got[0], CorruptSample)  # train-000000.tar is intact
    assert all(isinstance(g, CorruptSample) for g in got[1:]), got[1:]  # the whole cut shard is refused
    assert f"{remote_shards}/train-000002.tar: downloaded {cut} bytes" in str(got[1])
