"""The raccoon photos as benchmark data: where they are, and their shards built into a temporary folder.

``raccoon_root()`` is ``$SSD_RACCOON_DIR`` or ``../shared/datasets/raccoon`` beside the checkout; it exits
naming the folder when the photos are not there. ``raccoon_shards(work)`` prepares the set (the default
seeded split) and shards it as ``dvc repro`` would, into ``work/prepared`` and ``work/shards``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from pipeline.config import load_params  # noqa: E402
from pipeline.config_schema import Params  # noqa: E402
from pipeline.sources.records import write_index  # noqa: E402
from pipeline.stages.prepare import Prepared, prepare  # noqa: E402
from pipeline.stages.shard import shard  # noqa: E402


class RaccoonShards(NamedTuple):
    params: Params
    prepared: Prepared  # ``.records`` of every split, ``.classes``
    shards: str


def raccoon_root() -> Path:
    root = Path(os.environ.get("SSD_RACCOON_DIR") or REPO.parent / "shared" / "datasets" / "raccoon")
    if not (root / "images").is_dir():
        sys.exit(f"raccoon photos not found in {root / 'images'}; set SSD_RACCOON_DIR")
    return root


def raccoon_shards(work: Path) -> RaccoonShards:
    params = load_params(None, ["data.source=voc", f"data.root={raccoon_root()}"])
    result = prepare(params, work / "prepared", progress=False)
    write_index(work / "prepared", result.records, result.classes)
    shard(work / "prepared", work / "shards", params.shard, progress=False)
    return RaccoonShards(params, result, str(work / "shards"))
