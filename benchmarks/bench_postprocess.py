"""SSD post-processing and training augmentation speed, each against a straightforward reference.

Post-processing: 8,732 SSD300 priors x 21 classes, batch 8, with 2 threads and with 1, two regimes:
- ``typical``: random logits with the background raised so that a few hundred candidates per class and
  image pass the 0.01 threshold (what a partly trained model gives);
- ``worst``: plain random logits, so thousands pass and the top-k of 400 is hit for every class.
The reference is what ssd.pytorch's ``Detect`` does: per image, per class, threshold, sort, top-k and a
greedy NMS that loops over boxes, then merge and cap. Both sides must return identical detections (the
script checks it) and the ratio is reference time / ours. On a machine that other processes keep busy,
2-thread wall times swing widely (OpenMP threads spin-wait for a descheduled partner): the JSON records
the load average, and CPU times and the 1-thread run are the steadier figures.

Augmentation: ``train_transform`` (all steps on) to 300 x 300 and 160 x 160 from a 500 x 375 image, one
thread, as a DataLoader worker runs it. The reference is the chain written out literally, as the original
and most ports run it (``ssd_core.reference.reference_train_transform``; the tests check that both give the
same boxes and images within 1 grey level): photometric distortion of the whole image in float, the whole
zoom-out canvas built, the crop cut out of it and resized with ``interpolate``, then the flip.

Planning (the augmentation's random draws and box geometry, no pixels): batches of 32 images planned with
``plan_augmentations`` (one vectorised pass, as the shard loader's workers do) against the same images
planned one at a time with ``plan_augmentation`` (as ``train_transform`` does); both must give identical
plans (the script checks it).

Run: ``.venv/bin/python benchmarks/bench_postprocess.py [--reps N]``. Prints the figures and writes
``benchmarks/results/bench_postprocess.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_postprocess.json"
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ssd_core import augment  # noqa: E402
from ssd_core.boxes import box_iou  # noqa: E402
from ssd_core.coding import decode_boxes  # noqa: E402
from ssd_core.postprocess import postprocess  # noqa: E402
from ssd_core.priors import SSD300_VOC, generate_priors  # noqa: E402
from ssd_core.reference import reference_train_transform  # noqa: E402

BATCH = 8
NUM_CLASSES = 21  # VOC: 20 classes + background
THREADS = (2, 1)  # the CPU the project targets; 1 thread is also immune to OpenMP spin-waits on a busy machine
SETTINGS = dict(score_threshold=0.01, top_k=400, nms_iou=0.45, max_detections=200)  # the original's
BACKGROUND_OFFSET = {"typical": 7.0, "worst": 0.0}  # added to the background logit


# ------------------------------------------------------------------------------------- reference
def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS, one box per iteration (ssd.pytorch's ``nms``): keep the best, drop its overlaps."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = []
    while order.numel() > 0:
        best = order[0]
        keep.append(best)
        iou = box_iou(boxes[best].unsqueeze(0), boxes[order[1:]])[0]
        order = order[1:][iou <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.int64)


def reference_postprocess(loc, cls_logits, priors, sizes, *, score_threshold, top_k, nms_iou, max_detections):
    """ssd.pytorch ``Detect``: a Python loop over images and classes around the greedy NMS."""
    results = []
    for b in range(loc.shape[0]):
        boxes = decode_boxes(loc[b], priors).clamp(0, 1)  # [P, 4]
        probs = torch.softmax(cls_logits[b], dim=-1)  # [P, C]
        all_boxes, all_scores, all_labels = [], [], []
        for c in range(1, cls_logits.shape[-1]):
            idx = torch.nonzero(probs[:, c] > score_threshold).squeeze(1)
            idx = idx[torch.sort(probs[idx, c], descending=True, stable=True).indices[:top_k]]
            kept = idx[reference_nms(boxes[idx], probs[idx, c], nms_iou)]
            all_boxes.append(boxes[kept])
            all_scores.append(probs[kept, c])
            all_labels.append(torch.full((kept.numel(),), c, dtype=torch.int64))
        scores = torch.cat(all_scores)
        best = torch.sort(scores, descending=True, stable=True).indices[:max_detections]
        w, h = sizes[b]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        results.append((torch.cat(all_boxes)[best] * scale, scores[best], torch.cat(all_labels)[best]))
    return results


# ------------------------------------------------------------------------------------- timing
def timed(fn, reps: int) -> tuple[float, float, object]:
    """Median wall and CPU time (this process, all threads) of ``reps`` calls after a warm-up, and the result.

    CPU time is less sensitive than wall time to other processes competing for the cores.
    """
    result = fn()
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def bench_postprocess(regime: str, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    priors = generate_priors(SSD300_VOC)  # [P, 4]
    num_priors = priors.shape[0]
    loc = torch.randn(BATCH, num_priors, 4, generator=gen) * 0.5  # [B, P, 4]
    logits = torch.randn(BATCH, num_priors, NUM_CLASSES, generator=gen)  # [B, P, C]
    logits[..., 0] += BACKGROUND_OFFSET[regime]
    sizes = torch.tensor([[500, 375]] * BATCH)
    passing = (torch.softmax(logits, -1)[..., 1:] > SETTINGS["score_threshold"]).sum(1).float()  # [B, C-1]

    ours_s, ours_cpu, ours = timed(lambda: postprocess(loc, logits, priors, sizes, **SETTINGS), reps)
    ref_s, ref_cpu, ref = timed(
        lambda: reference_postprocess(loc, logits, priors, sizes.tolist(), **SETTINGS), max(1, reps // 3)
    )
    identical = all(
        torch.equal(d.boxes, rb) and torch.equal(d.scores, rs) and torch.equal(d.labels, rl)
        for d, (rb, rs, rl) in zip(ours, ref, strict=True)
    )
    return {
        "candidates_per_class_mean": round(float(passing.mean()), 1),
        "candidates_per_class_after_top_k_mean": round(float(passing.clamp(max=SETTINGS["top_k"]).mean()), 1),
        "detections_per_image_mean": round(statistics.mean(d.boxes.shape[0] for d in ours), 1),
        "ours_ms_per_image": round(ours_s * 1000 / BATCH, 2),
        "reference_ms_per_image": round(ref_s * 1000 / BATCH, 2),
        "speedup": round(ref_s / ours_s, 1),
        "ours_cpu_ms_per_image": round(ours_cpu * 1000 / BATCH, 2),
        "reference_cpu_ms_per_image": round(ref_cpu * 1000 / BATCH, 2),
        "identical_detections": identical,
    }


def bench_augmentation(size: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=gen)
    boxes = torch.tensor([[0.10, 0.15, 0.45, 0.70], [0.40, 0.30, 0.95, 0.90], [0.70, 0.05, 0.80, 0.20]])
    labels, difficult = torch.tensor([12, 15, 7]), torch.tensor([False, False, True])
    options = augment.AugmentOptions()

    def run() -> None:
        for seed in range(reps):
            g = torch.Generator().manual_seed(seed)
            augment.train_transform(image, boxes, labels, difficult, size=size, options=options, generator=g)

    def run_literal() -> None:
        for seed in range(reps):
            g = torch.Generator().manual_seed(seed)
            reference_train_transform(image, boxes, labels, difficult, size=size, options=options, generator=g)

    ours_s, _, _ = timed(run, 1)
    ref_s, _, _ = timed(run_literal, 1)
    return {
        "ours_images_per_s": round(reps / ours_s, 1),
        "reference_images_per_s": round(reps / ref_s, 1),
        "speedup": round(ref_s / ours_s, 2),
    }


def bench_planning(batches: int, batch_size: int = 32) -> dict:
    gen = torch.Generator().manual_seed(0)
    sizes = [(int(w), int(h)) for w, h in torch.randint(200, 700, (batch_size, 2), generator=gen).tolist()]
    boxes, labels, difficult = [], [], []
    for i in range(batch_size):
        corner = torch.rand(1 + i % 5, 2, generator=gen) * 0.6
        boxes.append(torch.cat([corner, corner + 0.05 + torch.rand(1 + i % 5, 2, generator=gen) * 0.35], 1))
        labels.append(torch.randint(1, 21, (1 + i % 5,), generator=gen))
        difficult.append(torch.zeros(1 + i % 5, dtype=torch.bool))
    options = augment.AugmentOptions()
    plans = {}

    def generators(batch: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(batch * batch_size + i) for i in range(batch_size)]

    def one_at_a_time() -> None:
        for batch in range(batches):
            plans["alone"] = [
                augment.plan_augmentation(*sizes[i], boxes[i], labels[i], difficult[i], options=options, generator=g)
                for i, g in enumerate(generators(batch))
            ]

    def together() -> None:
        for batch in range(batches):
            plans["together"] = augment.plan_augmentations(
                sizes, boxes, labels, difficult, options=options, generators=generators(batch)
            )

    alone_s, _, _ = timed(one_at_a_time, 3)
    together_s, _, _ = timed(together, 3)
    identical = all(
        (a.expansion, a.window, a.flip) == (b.expansion, b.window, b.flip)
        and torch.equal(a.boxes, b.boxes)
        and torch.equal(a.labels, b.labels)
        for a, b in zip(plans["alone"], plans["together"], strict=True)
    )
    images = batches * batch_size
    return {
        "one_at_a_time_ms_per_image": round(alone_s * 1000 / images, 3),
        "batched_ms_per_image": round(together_s * 1000 / images, 3),
        "speedup": round(alone_s / together_s, 2),
        "identical_plans": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed post-processing calls per regime")
    parser.add_argument("--aug-images", type=int, default=300, help="augmented images per measurement")
    args = parser.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    post = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        for regime in BACKGROUND_OFFSET:
            post[f"{regime}_{threads}_threads"] = bench_postprocess(regime, args.reps)
    torch.set_num_threads(1)
    aug = {f"train_transform_{s}x{s}_from_500x375": bench_augmentation(s, args.aug_images) for s in (300, 160)}
    planning = bench_planning(max(1, args.aug_images // 32))
    result = {
        "benchmark": "bench_postprocess",
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15_min_at_start": load_at_start,  # other work on the machine skews wall times
        },
        "postprocess": {
            "setup": f"batch {BATCH}, {NUM_CLASSES} classes, 8,732 SSD300 priors, {SETTINGS}",
            "reference": "per-image, per-class Python loop around a greedy NMS (ssd.pytorch Detect)",
            **post,
        },
        "augmentation": {
            "setup": "all steps on (photometric, expand x4, crop, flip), 1 thread, one sample at a time",
            "reference": "same chain, zoom-out canvas window built literally and resized with interpolate",
            **aug,
        },
        "planning": {
            "setup": "batches of 32 images (200..700 px sides, 1..5 boxes), all steps on, 1 thread",
            "reference": "the same images planned one at a time (plan_augmentation)",
            **planning,
        },
    }
    for regime, r in post.items():
        print(
            f"postprocess [{regime}: {r['candidates_per_class_mean']} candidates/class]: "
            f"ours {r['ours_ms_per_image']} ms/image, reference {r['reference_ms_per_image']} ms/image, "
            f"{r['speedup']}x (CPU time {r['ours_cpu_ms_per_image']} vs {r['reference_cpu_ms_per_image']} ms/image), "
            f"identical={r['identical_detections']}"
        )
    for name, r in aug.items():
        print(
            f"{name}: ours {r['ours_images_per_s']} img/s, reference {r['reference_images_per_s']} img/s, "
            f"{r['speedup']}x"
        )
    print(
        f"planning, batches of 32: batched {planning['batched_ms_per_image']} ms/image, one at a time "
        f"{planning['one_at_a_time_ms_per_image']} ms/image, {planning['speedup']}x, "
        f"identical={planning['identical_plans']}"
    )
    print(f"load average at start (1, 5, 15 min): {load_at_start} on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
