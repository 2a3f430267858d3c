"""Node-local copies of remote shards, named by their sha256, so that training reads samples from local disk.

Reading one sample per request from an object store costs a request's CPU (signing, parsing: a few ms)
per sample, more than decoding the sample; a shard fetched whole once costs one request. So a shard at an
``s3://`` URL is downloaded once per machine into the cache folder and every later read is a local one:

- the copy is named ``<sha256>.tar`` (the manifest's digest): the same shard in any run, any data-set URL,
  shares one copy, and a changed shard can never be served from a stale one;
- a download goes to a temporary name, is hashed on the way and renamed only when its sha256 and size
  match the manifest (``ShardError`` naming the URL otherwise); a reader never sees a partial copy;
- processes on one machine (Ray workers, their DataLoader workers) take an exclusive ``flock`` on
  ``<sha256>.lock`` while one of them downloads, so each shard crosses the network once per machine.

The folder is ``$SSD_SHARD_CACHE``, else ``$XDG_CACHE_HOME/ssd-pipeline/shards`` (``~/.cache/...``). Nothing
in it is ever deleted by the pipeline: remove it to reclaim the space.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from pipeline.artifacts.atomic_write import AtomicFile
from pipeline.shards.manifest import ShardError, ShardInfo
from pipeline.storage.filesystem import filesystem

CACHE_ENV = "SSD_SHARD_CACHE"
_CHUNK = 8 << 20  # bytes per read while downloading


def cache_dir() -> Path:
    """``$SSD_SHARD_CACHE``, else ``$XDG_CACHE_HOME/ssd-pipeline/shards`` (default ``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ssd-pipeline" / "shards"


def local_copy(location: str, shard: ShardInfo) -> Path:
    """The verified local copy of ``shard`` (at the URL ``location``), downloaded first if this machine has
    none. A copy already here is used without any request to the store (no client is even built).

    Raises:
        ShardError: the downloaded bytes do not match the manifest's sha256 and size.
        OSError: the object store or the cache folder failed.
    """
    folder = cache_dir()
    target = folder / f"{shard.sha256}.tar"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{shard.sha256}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not target.exists():  # another process may have finished it while this one waited
            _download(location, shard, target)
    return target


def _download(location: str, shard: ShardInfo, target: Path) -> None:
    fs, path = filesystem(location)
    digest, size = hashlib.sha256(), 0
    with AtomicFile(target) as out, fs.open(path, "rb", block_size=_CHUNK, cache_type="none") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.stream.write(chunk)
        if (digest.hexdigest(), size) != (shard.sha256, shard.bytes):  # AtomicFile discards the copy
            raise ShardError(
                f"shard {location}: downloaded {size} bytes with sha256 {digest.hexdigest()}, the manifest says "
                f"{shard.bytes} bytes with {shard.sha256}"
            )
