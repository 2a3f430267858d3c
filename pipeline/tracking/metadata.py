"""What a run records about where it came from: the code (git commit), the data (shard manifest and DVC
hashes), the model file (sha256) and the user. Plain functions over files and subprocesses; no MLflow."""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_GIT_TIMEOUT_S = 10  # a git call that hangs (a locked index, a network filesystem) must not hold up start-up
_READ_CHUNK = 1 << 20  # bytes hashed at a time: a model file of any size in constant memory


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the file at ``path``: how a model file is found again in the tracking store."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit(repo_root: str | Path) -> tuple[str, bool] | None:
    """(HEAD commit, whether tracked files differ from it) of the repository at ``repo_root``; None if unknown."""
    try:
        head = _git(repo_root, "rev-parse", "HEAD")
        dirty = _git(repo_root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head, bool(dirty)


def _git(repo_root: str | Path, *args: str) -> str:
    """The stripped stdout of ``git -C repo_root *args``; raises ``SubprocessError`` on failure or timeout."""
    completed = subprocess.run(
        ["git", "-C", str(repo_root), *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=True
    )
    return completed.stdout.strip()


def user() -> str:
    """The login name of this process (MLflow's ``mlflow.user`` tag), ``unknown`` where there is none."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def shard_dataset_profile(shards: str, repo_root: str | Path) -> dict[str, Any]:
    """What identifies the training data: the manifest's sha256, its sample counts, and the DVC hashes
    (from ``dvc.lock``) of the shard folder and of the inputs of the stage that wrote it.

    Returns:
        ``{"manifest": url, "manifest_sha256": hex, "splits"/"totals"/"classes": as in the manifest (those it
        has), "dvc": {path: hash}}``; ``dvc`` is empty for remote shards or without a ``dvc.lock``.

    Raises:
        OSError: the manifest cannot be read.
    """
    from pipeline.storage import read_bytes  # lazily: pipeline.storage imports this package's uris

    manifest_url = shards.rstrip("/") + "/manifest.json"
    if "://" not in shards:
        manifest_url = str((Path(repo_root) / manifest_url).resolve())
    raw = read_bytes(manifest_url)
    profile: dict[str, Any] = {"manifest": manifest_url, "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = {}
    for key in ("splits", "totals", "classes"):
        if isinstance(manifest, dict) and key in manifest:
            profile[key] = manifest[key]
    profile["dvc"] = _dvc_hashes(shards, Path(repo_root))
    return profile


def _dvc_hashes(shards: str, repo_root: Path) -> dict[str, str]:
    """``{path: hash}`` from ``<repo_root>/dvc.lock`` for the stage whose outs include the local folder
    ``shards``: its outs and its data deps (``.py`` code deps left out). Empty if there is no such stage."""
    lock = repo_root / "dvc.lock"
    if not lock.is_file() or "://" in shards:
        return {}
    import yaml

    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError) as error:
        logger.warning("could not read %s for the data hashes: %s", lock, error)
        return {}
    target = os.path.normpath(os.path.relpath((repo_root / shards).resolve(), repo_root.resolve()))
    hashes: dict[str, str] = {}
    for stage in stages.values():
        outs = stage.get("outs", []) or []
        if any(os.path.normpath(o.get("path", "")) == target for o in outs):
            for entry in [*outs, *(stage.get("deps", []) or [])]:
                digest = entry.get("md5") or entry.get("hash") or entry.get("etag")
                path = entry.get("path", "")
                if digest and path and not path.endswith(".py"):
                    hashes[path] = str(digest)
    return hashes
