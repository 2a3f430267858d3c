"""pipeline.tracking.metadata: the origin a run records (file digest, git commit, shard profile, user)."""

from __future__ import annotations

import hashlib
import json
import subprocess

import fsspec

from pipeline.tracking import metadata
from pipeline.tracking.metadata import file_sha256, git_commit, shard_dataset_profile

DVC_LOCK = """schema: '2.0'
stages:
  shard:
    cmd: python -m pipeline shard
    deps:
    - path: data/prepared
      hash: md5
      md5: aaa.dir
    - path: pipeline/stages/shard.py
      hash: md5
      md5: ccc
    outs:
    - path: shards
      hash: md5
      md5: bbb.dir
  other:
    cmd: python -m pipeline other
    deps:
    - path: data/elsewhere
      md5: ddd.dir
    outs:
    - path: elsewhere
      md5: eee.dir
"""


def _git(repo, *args):
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_file_sha256_is_the_standard_digest(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"abc")
    # FIPS 180-2, appendix B.1: SHA-256("abc")
    assert file_sha256(tmp_path / "m.pt") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_git_commit_reports_head_and_changes_to_tracked_files_only(tmp_path):
    assert git_commit(tmp_path) is None  # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("new")
    assert git_commit(tmp_path) == (head, False)
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path) == (head, True)


def test_shard_profile_holds_the_manifest_digest_counts_and_the_dvc_hashes_of_its_stage(tmp_path):
    manifest = {"totals": {"train": 8, "val": 2}, "classes": ["a", "b"], "other": 1}
    (tmp_path / "shards").mkdir()
    raw = json.dumps(manifest).encode()
    (tmp_path / "shards" / "manifest.json").write_bytes(raw)
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    profile = shard_dataset_profile("shards", tmp_path)
    assert profile == {
        "manifest": str((tmp_path / "shards" / "manifest.json").resolve()),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "totals": manifest["totals"],
        "classes": ["a", "b"],
        "dvc": {"shards": "bbb.dir", "data/prepared": "aaa.dir"},  # the shard stage's outs and data deps, no code
    }


def test_remote_shards_have_a_profile_without_dvc_hashes(tmp_path):
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    with fsspec.open("memory://bucket/shards/manifest.json", "wb") as handle:
        handle.write(b'{"totals": {"train": 3}}')
    profile = shard_dataset_profile("memory://bucket/shards/", tmp_path)
    assert profile["manifest"] == "memory://bucket/shards/manifest.json"
    assert profile["totals"] == {"train": 3} and profile["dvc"] == {}


def test_user_falls_back_to_unknown(monkeypatch):
    assert metadata.user()

    def no_user():
        raise KeyError("uid not in the password database")

    monkeypatch.setattr(metadata.getpass, "getuser", no_user)
    assert metadata.user() == "unknown"
