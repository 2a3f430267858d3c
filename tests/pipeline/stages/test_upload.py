"""``python -m pipeline upload shards``: against the real S3 server, through the command line."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline import storage
from pipeline.cli import main as cli_main
from pipeline.shards.manifest import MANIFEST_NAME, load_manifest
from pipeline.stages import upload


def _upload(source, destination) -> int:
    return cli_main(["upload", "shards", str(source), destination])


def test_every_shard_and_the_manifest_arrive_verified(uneven_shards, s3_env):
    destination = s3_env.fresh_url("voc", "shards")
    assert _upload(uneven_shards, destination) == 0
    local = json.loads((uneven_shards / MANIFEST_NAME).read_bytes())
    assert storage.read_bytes(storage.join(destination, MANIFEST_NAME)) == (uneven_shards / MANIFEST_NAME).read_bytes()
    names = sorted(entry.name for entry in storage.list_folder(destination))
    assert names == sorted([MANIFEST_NAME, *(s["name"] for s in local["shards"])])  # 3 train + 1 val shards
    remote = load_manifest(destination, verify=True)  # sha256 and member tables of every uploaded shard
    assert remote.to_dict() == load_manifest(str(uneven_shards)).to_dict()
    assert _upload(uneven_shards, destination) == 0  # the same manifest again: a repeat is fine


def test_a_different_manifest_at_the_destination_is_never_overwritten(uneven_shards, s3_env, tmp_path, caplog):
    destination = s3_env.fresh_url("shards")
    other = json.loads((uneven_shards / MANIFEST_NAME).read_text())
    other["classes"] = ["something", "else"]
    storage.put_bytes(storage.join(destination, MANIFEST_NAME), json.dumps(other).encode())
    before = storage.read_bytes(storage.join(destination, MANIFEST_NAME))
    with caplog.at_level(logging.ERROR):
        assert _upload(uneven_shards, destination) == 1
    assert "exists and differs" in caplog.text and destination in caplog.text
    assert storage.read_bytes(storage.join(destination, MANIFEST_NAME)) == before
    assert [e.name for e in storage.list_folder(destination)] == [MANIFEST_NAME]  # nothing else was written


def test_a_corrupted_upload_fails_loudly_and_the_manifest_stays_away(uneven_shards, s3_env, monkeypatch, caplog):
    """Fault injection: the store ends up with other bytes than were sent (a flipped byte in one shard)."""
    destination = s3_env.fresh_url("shards")
    put_file = storage.put_file

    def corrupting(local, location):
        put_file(local, location)
        if str(location).endswith("train-000001.tar"):
            data = bytearray(storage.read_bytes(location))
            data[700] ^= 0xFF
            storage.put_bytes(location, bytes(data))

    monkeypatch.setattr(upload.storage, "put_file", corrupting)
    with caplog.at_level(logging.ERROR):
        assert _upload(uneven_shards, destination) == 1
    assert f"{destination}/train-000001.tar" in caplog.text and "the manifest was not uploaded" in caplog.text
    assert not storage.exists(storage.join(destination, MANIFEST_NAME))


def test_a_tampered_local_shard_is_refused_before_uploading(uneven_shards, s3_env, tmp_path, caplog):
    source = tmp_path / "shards"
    source.mkdir()
    for path in uneven_shards.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    data = bytearray((source / "val-000000.tar").read_bytes())
    data[600] ^= 0xFF
    (source / "val-000000.tar").write_bytes(bytes(data))
    destination = s3_env.fresh_url("shards")
    with caplog.at_level(logging.ERROR):
        assert _upload(source, destination) == 1
    assert "val-000000.tar: sha256" in caplog.text
    assert storage.list_folder(destination) == []


def test_an_unreachable_destination_is_named(uneven_shards, s3_env, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with caplog.at_level(logging.ERROR):
        assert _upload(uneven_shards, s3_env.url("x")) == 1
    assert "upload destination s3://" in caplog.text and "credentials refused" in caplog.text


@pytest.mark.parametrize("what", ["models", "checkpoints"])
def test_only_shards_can_be_uploaded(what, capsys):
    with pytest.raises(SystemExit) as caught:
        cli_main(["upload", what, "a", "s3://b/c"])
    assert caught.value.code == 2 and "invalid choice" in capsys.readouterr().err
