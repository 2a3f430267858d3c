"""``python -m pipeline upload shards <local shard folder> <destination>``: shards to an object store, verified.

1. The local folder's manifest and every shard are checked first (``load_manifest(verify=True)``).
2. The destination must answer with our credentials (``storage.check_reachable``), and may not hold a
   different ``manifest.json``: that would be another data set, and is refused before anything is written.
   The same manifest again (a repeated or interrupted upload) is fine.
3. Every shard is uploaded as one object, then read back and its sha256 and size compared with the
   manifest; a mismatch stops the upload, naming the shard, before the manifest is written.
4. The manifest goes last, byte for byte the local one (the same bytes give the same data digest, hence
   the same run folder, as training from the local folder), and is read back and compared too.

Until step 4 the destination has no manifest, so ``train --shards`` refuses it (``no manifest``) rather
than reading a half-uploaded data set. Exit status: 0 uploaded and verified, 1 refused or a mismatch.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tqdm import tqdm

from pipeline import storage
from pipeline.config import Params
from pipeline.shards.manifest import MANIFEST_NAME, ShardError, ShardManifest, load_manifest
from pipeline.tracking.uris import redact_uri

logger = logging.getLogger(__name__)


class UploadError(ValueError):
    """The upload was refused or an uploaded object does not match the manifest; the message names it."""


def upload_shards(source: str | Path, destination: str, *, progress: bool = True) -> ShardManifest:
    """Upload the verified shard folder ``source`` to ``destination`` (steps 1-4 of the module docstring).

    Raises:
        ShardError: the local folder does not match its manifest.
        StorageError: the destination cannot be reached with the credentials in the environment.
        UploadError: a different manifest at the destination, or an uploaded object that does not match.
    """
    source = storage.absolute(source)
    manifest = load_manifest(source, verify=True)
    manifest_bytes = storage.read_bytes(storage.join(source, MANIFEST_NAME))
    storage.check_reachable(destination, "upload destination")
    target_manifest = storage.join(destination, MANIFEST_NAME)
    if storage.exists(target_manifest) and storage.read_bytes(target_manifest) != manifest_bytes:
        raise UploadError(
            f"{storage.describe(target_manifest)} exists and differs from {source}/{MANIFEST_NAME}: it describes "
            "other shards; upload to a new prefix (nothing was written)"
        )
    shards = sorted(manifest.shards, key=lambda s: s.name)
    with tqdm(
        total=sum(s.bytes for s in shards), desc="upload", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for shard in shards:
            target = storage.join(destination, shard.name)
            storage.put_file(storage.join(source, shard.name), target)
            sha256, size = storage.sha256_of(target)  # read back what the store now holds
            if (sha256, size) != (shard.sha256, shard.bytes):
                raise UploadError(
                    f"{storage.describe(target)}: uploaded object has sha256 {sha256} ({size} bytes), the manifest "
                    f"says {shard.sha256} ({shard.bytes} bytes); the manifest was not uploaded"
                )
            bar.update(shard.bytes)
    storage.put_bytes(target_manifest, manifest_bytes)
    if storage.read_bytes(target_manifest) != manifest_bytes:
        raise UploadError(f"{storage.describe(target_manifest)}: reads back different bytes from the local manifest")
    return manifest


def main(args: argparse.Namespace, params: Params) -> int:
    del params  # the upload reads no parameters
    started = time.perf_counter()
    try:
        manifest = upload_shards(args.source, args.destination)
    except (ShardError, UploadError, ValueError, OSError) as error:  # StorageError is a ValueError
        logger.error("upload: %s", redact_uri(str(error)))
        return 1
    totals = manifest.to_dict()["totals"]
    seconds = max(time.perf_counter() - started, 1e-9)
    logger.info(
        "upload: %d shards (%d samples, %.1f MB) and the manifest to %s in %.1f s (%.1f MB/s), sha256 verified",
        totals["shards"],
        totals["samples"],
        totals["bytes"] / 1e6,
        storage.describe(args.destination),
        seconds,
        totals["bytes"] / 1e6 / seconds,
    )
    return 0
