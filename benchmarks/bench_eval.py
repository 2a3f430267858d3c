"""Scoring 5,000 images' detections: our evaluation path against pycocotools' COCOeval, in the same run.

The data mimic COCO val2017: 5,000 images of 640 x 480, 1-15 objects each over 80 classes with sizes
spread over small / medium / large, 10 % difficult (crowd); detections are jittered copies of the
ground truth (varied IoU), duplicates, wrong labels and random boxes — 100 per image (COCO's maxDets),
scores uniform. One seed, so every run scores the same 500,000 detections.

Timed (wall clock, best of ``--reps`` for ours; pycocotools once unless ``--ref-reps``):
- ``voc``: ``ssd_core.metrics.evaluate_voc`` (VOC07 11-point + VOC area AP, all classes);
- ``coco_faster``: building the COCO ground truth / results (``pipeline.report.coco_eval``) + faster-coco-eval's
  COCOeval (evaluate, accumulate, summarize) — the COCO path the evaluate stage uses;
- ``ours_total``: both, i.e. everything the evaluate stage spends on metrics;
- ``pycocotools``: the reference, COCOeval from pycocotools on the same dicts (loadRes, evaluate,
  accumulate, summarize) — the COCO metrics only.
The script checks that both COCO tools give the same 12 statistics (to 1e-6) before reporting.

Run: ``.venv/bin/python benchmarks/bench_eval.py [--images 5000] [--dets 100] [--reps 2]``; prints the
figures and writes ``benchmarks/results/bench_eval.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_eval.json"
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.report.coco_eval import STAT_NAMES, coco_detections, coco_evaluate, coco_ground_truth  # noqa: E402
from ssd_core.metrics import evaluate_voc  # noqa: E402

NUM_CLASSES = 80
WIDTH, HEIGHT = 640, 480


def make_data(num_images: int, dets_per_image: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    keys, sizes, gb, gl, gd, db, ds, dl = [], [], [], [], [], [], [], []
    for i in range(num_images):
        g = int(rng.integers(1, 16))
        side = rng.choice([20.0, 60.0, 180.0], size=g) * rng.uniform(0.6, 1.4, size=g)
        x1, y1 = rng.uniform(0, WIDTH * 0.75, g), rng.uniform(0, HEIGHT * 0.75, g)
        boxes = np.stack(
            [x1, y1, np.minimum(x1 + side, WIDTH), np.minimum(y1 + side * rng.uniform(0.5, 1.5, g), HEIGHT)], 1
        )
        labels = rng.integers(1, NUM_CLASSES + 1, size=g)
        n_copies = min(dets_per_image, 3 * g)
        src = rng.integers(0, g, size=n_copies)
        copies = boxes[src] + rng.normal(0, 0.1, (n_copies, 4)) * side[src, None]
        copy_labels = np.where(rng.random(n_copies) < 0.8, labels[src], rng.integers(1, NUM_CLASSES + 1, n_copies))
        k = dets_per_image - n_copies
        rx, ry = rng.uniform(0, WIDTH - 20, k), rng.uniform(0, HEIGHT - 20, k)
        rand = np.stack([rx, ry, rx + rng.uniform(8, 200, k), ry + rng.uniform(8, 200, k)], 1)
        keys.append(f"{i:012d}")
        sizes.append((WIDTH, HEIGHT))
        gb.append(boxes)
        gl.append(labels)
        gd.append(rng.random(g) < 0.1)
        db.append(np.concatenate([copies, rand]))
        dl.append(np.concatenate([copy_labels, rng.integers(1, NUM_CLASSES + 1, k)]))
        ds.append(rng.random(dets_per_image))
    return {
        "keys": keys,
        "sizes": np.array(sizes),
        "gt_boxes": gb,
        "gt_labels": gl,
        "gt_difficult": gd,
        "det_boxes": db,
        "det_scores": ds,
        "det_labels": dl,
    }


def ours_voc(data: dict):
    return evaluate_voc(
        data["det_boxes"],
        data["det_scores"],
        data["det_labels"],
        data["gt_boxes"],
        data["gt_labels"],
        data["gt_difficult"],
        num_classes=NUM_CLASSES + 1,
    )


def ours_coco(data: dict, classes: list[str]):
    gt = coco_ground_truth(
        data["keys"], data["sizes"], data["gt_boxes"], data["gt_labels"], data["gt_difficult"], classes
    )
    dets = coco_detections(data["det_boxes"], data["det_scores"], data["det_labels"])
    return coco_evaluate(gt, dets, backend="faster_coco_eval"), gt, dets


def reference_pycocotools(gt: dict, dets: list) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = copy.deepcopy(gt), copy.deepcopy(dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def timed(fn, reps: int):
    best, value = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of our path (best is reported)")
    parser.add_argument("--ref-reps", type=int, default=1, help="repetitions of pycocotools")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = make_data(args.images, args.dets)
    classes = [f"class{i:02d}" for i in range(1, NUM_CLASSES + 1)]
    n_dets = sum(len(s) for s in data["det_scores"])
    n_gt = sum(len(lab) for lab in data["gt_labels"])
    print(f"bench_eval: {args.images} images, {n_gt} ground-truth boxes, {n_dets} detections, {NUM_CLASSES} classes")

    t_voc, voc = timed(lambda: ours_voc(data), args.reps)
    t_coco, (coco, gt, dets) = timed(lambda: ours_coco(data, classes), args.reps)
    t_ref, ref_stats = timed(lambda: reference_pycocotools(gt, dets), args.ref_reps)
    ours_stats = [getattr(coco, name) for name in STAT_NAMES]
    for name, a, b in zip(STAT_NAMES, ours_stats, ref_stats, strict=True):
        same = (np.isnan(a) and b < 0) or abs(a - b) <= 1e-6
        if not same:
            print(f"MISMATCH {name}: faster-coco-eval {a} vs pycocotools {b}", file=sys.stderr)
            return 1
    total = t_voc + t_coco
    result = {
        "benchmark": "bench_eval",
        "images": args.images,
        "detections": n_dets,
        "ground_truth_boxes": n_gt,
        "classes": NUM_CLASSES,
        "seconds": {
            "voc": round(t_voc, 3),
            "coco_faster": round(t_coco, 3),
            "ours_total": round(total, 3),
            "pycocotools": round(t_ref, 3),
        },
        "speedup_vs_pycocotools": {"coco_faster": round(t_ref / t_coco, 2), "ours_total": round(t_ref / total, 2)},
        "metrics": {
            "map_voc07": round(voc.map_voc07, 6),
            "map_voc": round(voc.map_voc, 6),
            "map_coco": round(coco.map, 6),
            "map_coco_pycocotools": round(ref_stats[0], 6),
        },
        "reps": {"ours": args.reps, "pycocotools": args.ref_reps},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor(),
            "threads": torch.get_num_threads(),
        },
    }
    print(f"  ours  VOC07 + VOC AP (ssd_core.metrics)         {t_voc:8.2f} s")
    print(f"  ours  COCO (JSON build + faster-coco-eval)       {t_coco:8.2f} s")
    print(f"  ours  total                                      {total:8.2f} s")
    print(f"  ref   pycocotools COCOeval (COCO metrics only)   {t_ref:8.2f} s")
    print(f"  speed-up vs pycocotools: COCO path x{t_ref / t_coco:.1f}, everything x{t_ref / total:.1f}")
    print(
        f"  mAP: VOC07 {voc.map_voc07:.4f}, VOC {voc.map_voc:.4f}, COCO {coco.map:.4f} (pycocotools {ref_stats[0]:.4f})"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
