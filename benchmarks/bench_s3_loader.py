"""Training loader throughput reading shards from the object store vs from the local folder (same shards).

Data: the raccoon set (real photos, ~500 x 400, ``$SSD_RACCOON_DIR`` or ``../shared/datasets/raccoon``),
prepared and sharded into a temporary folder, then uploaded with ``python -m pipeline upload shards``'s
function to the local S3 server (``infra/local/s3_server.py``: moto on 127.0.0.1, real access keys, started
here and stopped by its PID). Its training split (180 images) is read ``--epochs`` times by each path in
each of ``--rounds`` rounds; the rounds interleave the paths, each round starting with the next one, so
that drifting machine load hits all alike.

Timed (images/s over all epochs): ``pipeline.shards.loader.train_loader`` as the trainer runs it (full SSD
augmentation at 300 x 300, 2 DataLoader workers, batches of 32, one loader for all epochs), with
- ``local``: the shard folder on the local disk (the reference);
- ``s3_cold``: the same shards at ``s3://<bucket>/<prefix>`` with an empty shard cache at the start of the
  pass: the loader's workers download each shard once (``pipeline.shards.cache``, sha256-checked) and read
  samples from the local copies, as a training run does on a fresh machine;
- ``s3_warm``: the same with the cache kept from the previous pass (a resumed or repeated run).

Goal: ``s3_cold`` >= 0.9 x ``local`` over the run. The moto server runs on the same machine and takes CPU
from the loader, so this is a lower bound for a remote store with its own CPUs (and an upper one for its
latency).

Run: ``.venv/bin/python benchmarks/bench_s3_loader.py [--epochs 3] [--rounds 2]``; prints the figures and
writes ``benchmarks/results/bench_s3_loader.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_s3_loader.json"
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402
from _raccoon import raccoon_shards  # noqa: E402

from pipeline.shards.cache import CACHE_ENV  # noqa: E402
from pipeline.shards.loader import train_loader  # noqa: E402
from pipeline.stages.upload import upload_shards  # noqa: E402
from ssd_core.augment import AugmentOptions  # noqa: E402
from tests.object_store import ENV_KEYS, S3Server  # noqa: E402

SIZE, BATCH, WORKERS, SEED = 300, 32, 2, 0
FULL = AugmentOptions()


def timed(batches) -> tuple[float, int]:
    """(seconds, images) to exhaust ``batches``."""
    images, start = 0, time.perf_counter()
    for batch in batches:
        images += len(batch.images)
    return time.perf_counter() - start, images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = S3Server(work / "s3").start()
        try:
            os.environ.update({key: server.env[key] for key in ENV_KEYS})  # the loader's workers inherit it
            data = raccoon_shards(work)
            epoch_steps = math.ceil(len(data.prepared.records["train"]) / BATCH)
            remote = server.url("bench", "shards")
            started = time.perf_counter()
            manifest = upload_shards(work / "shards", remote, progress=False)
            upload_s = time.perf_counter() - started
            sources = {"local": data.shards, "s3_cold": remote, "s3_warm": remote}
            cache = work / "cache"
            os.environ[CACHE_ENV] = str(cache)

            def batches(name: str, epochs: int):
                if name == "s3_cold":
                    shutil.rmtree(cache, ignore_errors=True)
                return train_loader(
                    sources[name],
                    rank=0,
                    world_size=1,
                    global_batch=BATCH,
                    image_size=SIZE,
                    augment=FULL,
                    seed=SEED,
                    num_steps=epochs * epoch_steps,
                    num_workers=WORKERS,
                )

            for name in sources:
                timed(batches(name, 1))  # warm the page cache, the server and the code paths once
            seconds, images = dict.fromkeys(sources, 0.0), dict.fromkeys(sources, 0)
            names = list(sources)
            for round_index in range(args.rounds):  # each round starts with another path: load drift hits all
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    spent, count = timed(batches(name, args.epochs))
                    seconds[name] += spent
                    images[name] += count
        finally:
            server.stop()

    rates = {name: images[name] / seconds[name] for name in sources}
    totals = manifest.to_dict()["totals"]
    report = {
        "benchmark": "bench_s3_loader",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "data": {
            "set": "raccoon train split",
            "images_per_epoch": images["local"] // (args.rounds * args.epochs),
            "shards": totals["shards"],
            "bytes": totals["bytes"],
        },
        "settings": {"batch": BATCH, "workers": WORKERS, "size": SIZE, "epochs": args.epochs, "rounds": args.rounds},
        "upload_s": round(upload_s, 2),
        "images_per_sec": {name: round(rate, 1) for name, rate in rates.items()},
        "over_local": {name: round(rates[name] / rates["local"], 3) for name in sources if name != "local"},
        "goal": ">= 0.9",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
