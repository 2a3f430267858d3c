"""Loader images/s per CPU core at 300 x 300 with the full SSD augmentation, and what a GPU host needs.

``pipeline.shards.loader.train_loader`` in the main process (``num_workers=0``) on one intra-op thread, as
each DataLoader worker runs it, over the raccoon photos (~500 x 400, ``$SSD_RACCOON_DIR`` or
``../shared/datasets/raccoon``) for ``--epochs`` epochs: read, plan, decode (reduced where the crop allows),
photometric distortion, zoom-out, crop, resize, flip and collation. Per-core throughput is images per second
of this process's *CPU time* (``time.process_time``), which a busy shared machine disturbs far less than wall
time; the wall-time rate is reported too, with the load average.

A GPU that trains at R images/s needs R / (images/s per core) loader cores: at 2,000 img/s (``ssd300_vgg16``
bf16 on one H100/H200, the goal) a 16-core host needs >= 125 img/s per core, one core left for the trainer
aside.

Run: ``.venv/bin/python benchmarks/bench_loader_core.py [--epochs N]``; writes
``benchmarks/results/bench_loader_core.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_loader_core.json"
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402
from _raccoon import raccoon_shards  # noqa: E402

from pipeline.shards.loader import train_loader  # noqa: E402
from ssd_core.augment import AugmentOptions  # noqa: E402

TARGET_IMAGES_PER_S, HOST_CORES = 2000, 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="of the 180 training photos")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        data = raccoon_shards(Path(tmp))
        loader = train_loader(
            data.shards,
            rank=0,
            world_size=1,
            global_batch=32,
            image_size=300,
            augment=AugmentOptions(),
            seed=0,
            num_steps=args.epochs * 180 // 32,
            num_workers=0,
            max_boxes=data.params.train.max_boxes,
        )
        cpu0, wall0, images = time.process_time(), time.perf_counter(), 0
        for batch in loader:
            images += len(batch.images)
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    per_core = images / cpu_s
    needed = TARGET_IMAGES_PER_S / HOST_CORES
    report = {
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "images": images,
        "images_per_cpu_s": per_core,
        "images_per_wall_s": images / wall_s,
        "needed_per_core_for_2000_on_16_cores": needed,
        "cores_needed_for_2000": TARGET_IMAGES_PER_S / per_core,
        "load_average_start_end": [load, [round(x, 2) for x in os.getloadavg()]],
    }
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
