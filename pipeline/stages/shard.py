"""``python -m pipeline shard``: the prepared index -> WebDataset shards + ``manifest.json``.

Reads ``--index/{train,val,test}.jsonl`` and ``classes.json``; writes ``--out/{split}-%06d.tar`` and
``--out/manifest.json`` (see ``pipeline.shards.write`` and ``pipeline.shards.manifest``) into a folder the
stage owns (``pipeline.artifacts.output_folder``). Shows a progress bar and ends with one line of counts
and throughput.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.artifacts.output_folder import claim_output_folder
from pipeline.config import Params, ShardConfig
from pipeline.shards.manifest import ShardManifest
from pipeline.shards.write import SHARD_STAGE, ShardWriteError, clear_outputs, write_manifest, write_split
from pipeline.sources.records import SPLITS, read_classes, read_index

logger = logging.getLogger(__name__)


def shard(index_dir: Path, out_dir: Path, cfg: ShardConfig, *, progress: bool = True) -> ShardManifest:
    """Write every split of the index as shards, then the manifest (last, atomically).

    ``out_dir`` must be new, empty, or a folder this stage made (its ``.ssd-pipeline`` marker); its old
    shards and manifest are deleted first. Any other folder is refused (``OutputFolderError``), untouched.
    """
    classes = read_classes(index_dir)
    records = {split: read_index(index_dir, split) for split in SPLITS}
    claim_output_folder(out_dir, SHARD_STAGE)
    clear_outputs(out_dir, SPLITS)
    infos = []
    with tqdm(total=sum(map(len, records.values())), desc="shard", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            infos += write_split(records[split], split, out_dir, cfg, on_sample=lambda: bar.update(1))
    return write_manifest(out_dir, classes, infos)


def main(args: argparse.Namespace, params: Params) -> int:
    start = time.perf_counter()
    try:
        manifest = shard(args.index, args.out, params.shard)
    except (ShardWriteError, FileNotFoundError, ValueError) as error:
        logger.error("shard: %s", error)
        return 1
    seconds = max(time.perf_counter() - start, 1e-9)
    totals = manifest.to_dict()["totals"]
    per_split = ", ".join(f"{k} {v.samples} in {v.shards}" for k, v in manifest.splits.items())
    logger.info(
        "shard: %d samples (%s shards), %.1f MB in %.1f s: %.0f samples/s, %.1f MB/s; manifest %s",
        totals["samples"],
        per_split,
        totals["bytes"] / 1e6,
        seconds,
        totals["samples"] / seconds,
        totals["bytes"] / 1e6 / seconds,
        args.out / "manifest.json",
    )
    return 0
