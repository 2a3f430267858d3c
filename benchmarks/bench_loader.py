"""Training loader throughput and memory: shards vs the same images read from a VOC folder, vs decode-only.

Data: the raccoon set (real photos, ~500 x 400, ``$SSD_RACCOON_DIR`` or ``../shared/datasets/raccoon``),
prepared (seeded split) and sharded into a temporary folder; its training split (180 images) is read
``--epochs`` times by every path, in each of ``--rounds`` rounds.

Timed (images/s over all epochs, 2 DataLoader worker processes each, batches of 32):
- ``shards``: ``pipeline.shards.loader.train_loader`` with the full SSD augmentation at 300 x 300, as the
  trainer runs it: one loader for all the epochs (``epochs=n``), whose workers run on across epoch
  boundaries. Its workers make whole batches: each batch's augmentation is planned from the JSON records
  before decoding, in one vectorised pass (``plan_augmentations``; the same plans as one by one), and each
  JPEG is decoded (libjpeg-turbo through simplejpeg, ``pipeline.shards.jpeg``) at 1/2, 1/4 or 1/8 when the
  crop window is that much larger than the output (see ``pipeline.shards.samples``); the share of samples
  decoded at each scale is reported;
- ``folder``: the reference users would write first: a map-style Dataset over the VOC folder that parses
  each XML (defusedxml), opens the JPEG with PIL, applies EXIF orientation, converts to RGB and runs the
  same ``train_transform`` (same per-sample seeding), batched by the same collate, in a ``DataLoader``
  made per epoch (``shuffle=True``). It shares every speed-up of the transform itself; what it lacks is
  what the shard loader gives (sizes known before decoding, no XML, the faster decoder, workers that
  outlive the epoch, whole batches made in the worker and so planned together: a map-style Dataset's
  ``__getitem__`` makes one sample at a time);
- ``folder_persistent``: the same with one ``DataLoader(persistent_workers=True)`` for all epochs, the
  best a map-style loader offers: its workers survive the epoch, but each epoch still drains the pipeline
  (its workers keep the dataset they started with, so every epoch draws epoch 0's augmentation: the same
  work). The goal's ratio uses the faster of ``folder`` and ``folder_persistent``;
- ``folder_same_decoder``: ``folder_persistent`` decoding with the shard loader's decoder
  (``pipeline.shards.jpeg`` instead of PIL; none of the raccoon photos carries an EXIF rotation, checked at
  start), to show how much of the gap is the decoder and how much the rest;
- ``shards_resize_only``: the shard loader with every augmentation step off (decode + resize to 300): what
  the loader itself costs, without ``train_transform``'s augmentation work;
- ``decode_only``: the ceiling: the same JPEG bytes, held in memory, only decoded to uint8 tensors with the
  shard loader's decoder, by persistent workers; ``decode_only_pil`` the same with PIL, for reference.
Every path runs once untimed first; then the rounds interleave the paths, so drifting machine load
affects them alike.

Memory: the resident set size (RSS) of the main process and of its DataLoader workers, sampled every
50 ms while the shard loader runs; per epoch the peak of main + workers and main alone. "Flat" means the
last epoch's peak is within 10 % of the first's.

Run: ``.venv/bin/python benchmarks/bench_loader.py [--epochs 3] [--rounds 2]``; prints the figures and
writes ``benchmarks/results/bench_loader.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_loader.json"
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from _raccoon import raccoon_root, raccoon_shards  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from pipeline.shards.jpeg import decode_reduction, decode_rgb, jpeg_size  # noqa: E402
from pipeline.shards.loader import collate_train, train_loader  # noqa: E402
from pipeline.shards.manifest import load_manifest  # noqa: E402
from pipeline.shards.order import sample_seed  # noqa: E402
from pipeline.sources.images import inspect_image, load_rgb  # noqa: E402
from pipeline.sources.voc import parse_voc_xml  # noqa: E402
from ssd_core.augment import AugmentOptions, plan_augmentation, train_transform  # noqa: E402

SIZE, BATCH, WORKERS, SEED = 300, 32, 2, 0
MAX_PIXELS = 89_478_485
FULL = AugmentOptions()
RESIZE_ONLY = AugmentOptions(photometric=False, expand=False, crop=False, flip=False)


def _pil_pixels(image_path: Path) -> torch.Tensor:
    """uint8 ``[3, H, W]``: PIL decode, EXIF orientation, RGB (``load_rgb``, as prepare reads images)."""
    image = load_rgb(image_path, max_pixels=MAX_PIXELS)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _fast_decode(data: bytes) -> torch.Tensor:
    """uint8 ``[3, H, W]`` with the shard loader's decoder (no EXIF handling: see the module docstring)."""
    width, height = jpeg_size(data)
    return torch.from_numpy(decode_rgb(data, width=width, height=height)).permute(2, 0, 1)


def _fast_pixels(image_path: Path) -> torch.Tensor:
    return _fast_decode(image_path.read_bytes())


class FolderDataset(Dataset):
    """The straightforward VOC-folder loader: XML + JPEG from disk per sample, then the same augmentation."""

    def __init__(
        self, items: list[tuple[Path, Path, str]], classes: list[str], epoch: int, read_pixels=_pil_pixels
    ) -> None:
        self.items, self.labels, self.epoch = items, {c: i + 1 for i, c in enumerate(classes)}, epoch
        self.read_pixels = read_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        xml_path, image_path, key = self.items[i]
        parsed = parse_voc_xml(xml_path)
        pixels = self.read_pixels(image_path)  # [3, H, W]
        h, w = pixels.shape[1:]
        boxes = torch.tensor([o.box_px for o in parsed.objects], dtype=torch.float32).reshape(-1, 4)
        boxes = (boxes / torch.tensor([w, h, w, h])).clamp(0, 1)
        labels = torch.tensor([self.labels[o.name] for o in parsed.objects], dtype=torch.int64)
        difficult = torch.tensor([o.difficult for o in parsed.objects], dtype=torch.bool)
        generator = torch.Generator().manual_seed(sample_seed(SEED, self.epoch, key))
        return train_transform(pixels, boxes, labels, difficult, size=SIZE, options=FULL, generator=generator)


class DecodeOnly(Dataset):
    """The JPEG bytes held in memory, decoded to uint8 ``[3, H, W]``: with ``pipeline.shards.jpeg`` or PIL."""

    def __init__(self, blobs: list[bytes], pil: bool = False) -> None:
        self.blobs, self.pil = blobs, pil

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.pil:
            with Image.open(io.BytesIO(self.blobs[i])) as image:
                return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        return _fast_decode(self.blobs[i])


class RssSampler:
    """Peak RSS (MiB) of this process and of all its children, per epoch (set ``epoch``), sampled in a thread."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.me = period, psutil.Process()
        self.epoch = 0
        self.peak_total: dict[int, float] = {}
        self.peak_main: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            main = self.me.memory_info().rss
            total = main
            for child in self.me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass  # a worker that exited between listing and reading
            epoch = self.epoch
            self.peak_main[epoch] = max(self.peak_main.get(epoch, 0.0), main / 2**20)
            self.peak_total[epoch] = max(self.peak_total.get(epoch, 0.0), total / 2**20)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def reduction_shares(records, keys: list[str], epochs: int) -> dict[str, float]:
    """Share of the shard loader's samples decoded at 1/1, 1/2, 1/4, 1/8 (the same plans it makes)."""
    counts = dict.fromkeys((1, 2, 4, 8), 0)
    for epoch in range(epochs):
        for record, key in zip(records, keys, strict=True):
            w, h = record.width, record.height
            boxes = (
                torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
                / torch.tensor([w, h, w, h], dtype=torch.float32)
            ).clamp_(0.0, 1.0)
            labels = torch.tensor(record.labels, dtype=torch.int64).reshape(-1)
            difficult = torch.tensor(record.difficult, dtype=torch.bool).reshape(-1)
            generator = torch.Generator().manual_seed(sample_seed(SEED, epoch, key))
            plan = plan_augmentation(w, h, boxes, labels, difficult, options=FULL, generator=generator)
            counts[decode_reduction(plan, SIZE)] += 1
    total = sum(counts.values())
    return {f"1/{r}": round(n / total, 3) for r, n in counts.items()}


def timed(batches, epoch_images: int, sampler: RssSampler | None = None) -> tuple[float, int]:
    """(seconds, images) to exhaust ``batches`` (TrainBatches, or lists of decoded images); tells ``sampler``
    the epoch (every ``epoch_images`` images) as it goes."""
    images, start = 0, time.perf_counter()
    for batch in batches:
        images += len(batch.images if hasattr(batch, "images") else batch)
        if sampler is not None:
            sampler.epoch = images // epoch_images
    return time.perf_counter() - start, images


def _epochs_of(loader: DataLoader, epochs: int):
    """Batches of ``epochs`` passes over one (persistent-worker) DataLoader."""
    for _ in range(epochs):
        yield from loader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    raccoon = raccoon_root()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = raccoon_shards(Path(tmp))
        result, shards = data.prepared, data.shards
        records = result.records["train"]  # what the index holds (read_index gives equal records)
        manifest = load_manifest(shards, verify=True)
        locations = [loc for s in manifest.split_shards("train") for loc in s.samples]
        items = [
            (raccoon / "annotations" / f"{r.id.split('/', 1)[1]}.xml", r.image, loc.key)
            for r, loc in zip(records, locations, strict=True)
        ]
        blobs = [r.image.read_bytes() for r in records]
        rotated = [r.image.name for r in records if inspect_image(r.image, max_pixels=MAX_PIXELS).orientation != 1]
        if rotated:
            raise SystemExit(f"folder_same_decoder ignores EXIF orientation, but {rotated} carry one")
        mean_pixels = float(np.mean([r.width * r.height for r in records]))

        def shard_batches(epochs, augment=FULL):
            return train_loader(
                shards,
                rank=0,
                world_size=1,
                global_batch=BATCH,
                image_size=SIZE,
                augment=augment,
                seed=SEED,
                num_steps=epochs * math.ceil(len(records) / BATCH),
                num_workers=WORKERS,
            )

        def resize_only_batches(epochs):
            return shard_batches(epochs, RESIZE_ONLY)

        def folder_loader(epoch, read_pixels=_pil_pixels, **options):
            return DataLoader(
                FolderDataset(items, result.classes, epoch, read_pixels),
                batch_size=BATCH,
                num_workers=WORKERS,
                shuffle=True,
                generator=torch.Generator().manual_seed(epoch),
                collate_fn=lambda samples: collate_train(samples, SIZE),
                **options,
            )

        def folder_batches(epochs):  # a DataLoader per epoch
            return (batch for epoch in range(epochs) for batch in folder_loader(epoch))

        def folder_persistent_batches(epochs, read_pixels=_pil_pixels):
            return _epochs_of(folder_loader(0, read_pixels, persistent_workers=True), epochs)

        def folder_same_decoder_batches(epochs):
            return folder_persistent_batches(epochs, _fast_pixels)

        def decode_batches(epochs, pil=False):
            loader = DataLoader(
                DecodeOnly(blobs, pil), batch_size=BATCH, num_workers=WORKERS, collate_fn=list, persistent_workers=True
            )
            return _epochs_of(loader, epochs)

        def decode_pil_batches(epochs):
            return decode_batches(epochs, pil=True)

        paths = {
            "shards": shard_batches,
            "folder": folder_batches,
            "folder_persistent": folder_persistent_batches,
            "folder_same_decoder": folder_same_decoder_batches,
            "shards_resize_only": resize_only_batches,
            "decode_only": decode_batches,
            "decode_only_pil": decode_pil_batches,
        }
        for make in paths.values():
            timed(make(1), len(records))  # warm the page cache and the code paths once
        # Rounds interleave the paths, so a change in machine load during the run hits all of them alike.
        seconds, images = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0)
        for _ in range(args.rounds):
            for name, make in paths.items():
                with RssSampler() as sampler:
                    spent, count = timed(make(args.epochs), len(records), sampler if name == "shards" else None)
                seconds[name] += spent
                images[name] += count
                if name == "shards":  # the last round's
                    rss = [
                        {
                            "epoch": e,
                            "peak_main_mib": round(sampler.peak_main[e], 1),
                            "peak_main_plus_workers_mib": round(sampler.peak_total[e], 1),
                        }
                        for e in range(args.epochs)
                        if e in sampler.peak_total
                    ]

    rates = {name: images[name] / seconds[name] for name in paths}
    shares = reduction_shares(records, [loc.key for loc in locations], args.epochs)
    best_folder = max(rates["folder"], rates["folder_persistent"])
    flat = rss[-1]["peak_main_plus_workers_mib"] <= 1.1 * rss[0]["peak_main_plus_workers_mib"]
    report = {
        "benchmark": "bench_loader",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "setup": {
            "dataset": "raccoon train split",
            "images_per_epoch": len(records),
            "epochs": args.epochs,
            "rounds": args.rounds,
            "mean_image_pixels": round(mean_pixels),
            "image_size": SIZE,
            "batch_size": BATCH,
            "dataloader_workers": WORKERS,
            "augmentation": "full SSD (photometric, expand, crop, flip)",
        },
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "shards_decoded_at_scale": shares,
        "ratios": {
            "shards_over_folder": round(rates["shards"] / best_folder, 3),
            "shards_over_folder_per_epoch_loader": round(rates["shards"] / rates["folder"], 3),
            "shards_over_folder_same_decoder": round(rates["shards"] / rates["folder_same_decoder"], 3),
            "shards_over_decode_only": round(rates["shards"] / rates["decode_only"], 3),
            "shards_resize_only_over_decode_only": round(rates["shards_resize_only"] / rates["decode_only"], 3),
        },
        "goals": {"shards_over_folder": 1.5, "shards_over_decode_only": 0.6},
        "rss_per_epoch": rss,
        "rss_flat": flat,
    }
    print(
        f"loader, raccoon train ({len(records)} images of ~{mean_pixels / 1e3:.0f} kpixels), {args.epochs} epochs, "
        f"{WORKERS} workers, batch {BATCH}, {SIZE}x{SIZE}"
    )
    for name, rate in rates.items():
        print(f"  {name:20s} {rate:8.1f} images/s")
    print("  shards decoded at " + ", ".join(f"{k}: {v:.0%}" for k, v in shares.items()))
    print(
        f"  shards / folder      = {report['ratios']['shards_over_folder']:.2f}  (the faster folder path; goal >= 1.5)"
    )
    print(
        f"  shards / folder with the shard loader's decoder = {report['ratios']['shards_over_folder_same_decoder']:.2f}"
    )
    print(f"  shards / decode-only = {report['ratios']['shards_over_decode_only']:.2f}  (goal >= 0.6)")
    print(
        f"  shards without augmentation (resize only) / decode-only = "
        f"{report['ratios']['shards_resize_only_over_decode_only']:.2f}"
    )
    for row in rss:
        print(
            f"  epoch {row['epoch']}: peak RSS main {row['peak_main_mib']:.0f} MiB, "
            f"main + workers {row['peak_main_plus_workers_mib']:.0f} MiB"
        )
    print(f"  RSS flat over epochs: {flat}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
