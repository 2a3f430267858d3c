"""Target assignment + MultiBox loss (forward and backward): ssd_core against torchvision's SSD, side by side.

Both sides get the same inputs: a batch of 32 images with 1-10 random boxes each, the 8,732 SSD300
priors, and the same head outputs (regression offsets and 21-class logits). One step is
- ours: ``assign_targets`` + ``multibox_loss`` + ``backward()``;
- torchvision: per image ``box_iou`` + ``SSDMatcher`` (what ``SSD.forward`` does in training), then
  ``SSD.compute_loss`` + ``backward()``, on a real ``torchvision.models.detection.ssd.SSD`` object.
torchvision's box coder weights (10, 10, 5, 5) are our variances (0.1, 0.2), both sides normalise by
the positives of the whole batch and mine 3 negatives per positive, so the two losses agree up to how
rare conflicts between forced matches are resolved; the script prints both as a sanity check.

Run: ``.venv/bin/python benchmarks/bench_loss.py [--reps N]``. Prints the figures and writes
``benchmarks/results/bench_loss.json``. torchvision comes from ``.bench`` (``make bench-deps``).
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
RESULTS = REPO / "benchmarks" / "results" / "bench_loss.json"
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402
from _torchvision_reference import require_torchvision  # noqa: E402
from torch import nn  # noqa: E402

from ssd_core.boxes import cxcywh_to_xyxy  # noqa: E402
from ssd_core.loss import multibox_loss  # noqa: E402
from ssd_core.matching import assign_targets  # noqa: E402
from ssd_core.priors import SSD300_VOC, generate_priors  # noqa: E402

require_torchvision("bench_loss")
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator  # noqa: E402
from torchvision.models.detection.ssd import SSD  # noqa: E402
from torchvision.ops import boxes as tv_box_ops  # noqa: E402

BATCH = 32
NUM_CLASSES = 21  # VOC: 20 classes + background
MAX_BOXES = 10
THREADS = 2  # the CPU the project targets


def make_inputs(seed: int = 0) -> dict:
    """Random boxes (1..10 per image, inside the unit square), labels and head outputs."""
    gen = torch.Generator().manual_seed(seed)
    priors = generate_priors(SSD300_VOC)  # [P, 4] cxcywh
    num_priors = priors.shape[0]
    counts = torch.randint(1, MAX_BOXES + 1, (BATCH,), generator=gen)  # [B]
    corner = torch.rand(BATCH, MAX_BOXES, 2, generator=gen) * 0.8  # [B, G, 2]
    size = 0.03 + torch.rand(BATCH, MAX_BOXES, 2, generator=gen) * 0.6  # [B, G, 2]
    boxes = torch.cat((corner, (corner + size).clamp(max=1.0)), dim=-1)  # [B, G, 4]
    labels = torch.randint(1, NUM_CLASSES, (BATCH, MAX_BOXES), generator=gen)  # [B, G]
    mask = torch.arange(MAX_BOXES)[None, :] < counts[:, None]  # [B, G]
    return {
        "priors": priors,
        "boxes": boxes,
        "labels": labels,
        "mask": mask,
        "loc": torch.randn(BATCH, num_priors, 4, generator=gen),
        "logits": torch.randn(BATCH, num_priors, NUM_CLASSES, generator=gen),
    }


class _NoBackbone(nn.Module):
    """Stands in for VGG: ``SSD`` only reads ``out_channels`` to build its head; the loss never runs it."""

    out_channels = [8] * 6


def make_torchvision_ssd() -> SSD:
    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]])
    return SSD(_NoBackbone(), anchors, (300, 300), NUM_CLASSES)  # iou_thresh 0.5, 3:1 negatives


def ours_match(inputs: dict):
    return assign_targets(inputs["boxes"], inputs["labels"], inputs["mask"], inputs["priors"])


def ours_loss(targets, loc: torch.Tensor, logits: torch.Tensor) -> float:
    terms = multibox_loss(loc, logits, targets.loc_targets, targets.cls_targets)
    terms.total.backward()
    return float(terms.total.detach())


def torchvision_targets(inputs: dict) -> list[dict]:
    return [
        {"boxes": boxes[mask], "labels": labels[mask]}
        for boxes, labels, mask in zip(inputs["boxes"], inputs["labels"], inputs["mask"], strict=True)
    ]


def torchvision_match(model: SSD, targets: list[dict], anchors_xyxy: torch.Tensor) -> list[torch.Tensor]:
    """What ``SSD.forward`` does in training before ``compute_loss``: IoU and ``SSDMatcher`` per image."""
    return [model.proposal_matcher(tv_box_ops.box_iou(t["boxes"], anchors_xyxy)) for t in targets]


def torchvision_loss(model: SSD, targets, anchors_xyxy, matched, loc, logits) -> float:
    anchors = [anchors_xyxy] * len(targets)
    losses = model.compute_loss(targets, {"bbox_regression": loc, "cls_logits": logits}, anchors, matched)
    total = losses["bbox_regression"] + losses["classification"]
    total.backward()
    return float(total.detach())


def median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per side (after 2 warm-ups)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (default: 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = make_inputs()
    model = make_torchvision_ssd()
    anchors_xyxy = cxcywh_to_xyxy(inputs["priors"])  # torchvision anchors are xyxy; normalised units are fine
    tv_targets = torchvision_targets(inputs)  # the per-image lists torchvision takes (not timed)
    ours_loc, ours_logits = (inputs[k].clone().requires_grad_() for k in ("loc", "logits"))
    tv_loc, tv_logits = (inputs[k].clone().requires_grad_() for k in ("loc", "logits"))
    clock = time.perf_counter
    times = {key: [] for key in ("ours", "ours_match", "ours_loss", "tv", "tv_match", "tv_loss")}
    losses = {}

    def ours() -> None:
        ours_loc.grad = ours_logits.grad = None
        start = clock()
        targets = ours_match(inputs)
        middle = clock()
        losses["ours"] = ours_loss(targets, ours_loc, ours_logits)
        end = clock()
        times["ours"].append(end - start)
        times["ours_match"].append(middle - start)
        times["ours_loss"].append(end - middle)

    def reference() -> None:
        tv_loc.grad = tv_logits.grad = None
        start = clock()
        matched = torchvision_match(model, tv_targets, anchors_xyxy)
        middle = clock()
        losses["tv"] = torchvision_loss(model, tv_targets, anchors_xyxy, matched, tv_loc, tv_logits)
        end = clock()
        times["tv"].append(end - start)
        times["tv_match"].append(middle - start)
        times["tv_loss"].append(end - middle)

    for _ in range(2):  # warm-up: allocator, lazy imports
        ours(), reference()
    for values in times.values():
        values.clear()
    for _ in range(args.reps):  # interleaved so both sides see the same machine load
        ours()
        reference()
    ours_ms, reference_ms = median_ms(times["ours"]), median_ms(times["tv"])
    grad_gap = float((ours_logits.grad - tv_logits.grad).abs().max())
    result = {
        "benchmark": "target assignment + MultiBox loss forward+backward",
        "batch": BATCH,
        "priors": int(inputs["priors"].shape[0]),
        "classes": NUM_CLASSES,
        "boxes_per_image": [int(c) for c in inputs["mask"].sum(1)],
        "threads": args.threads,
        "reps": args.reps,
        "ours_median_ms": ours_ms,
        "torchvision_median_ms": reference_ms,
        "speedup": round(reference_ms / ours_ms, 2),
        "ours_min_ms": round(min(times["ours"]) * 1e3, 3),
        "torchvision_min_ms": round(min(times["tv"]) * 1e3, 3),
        "speedup_of_minima": round(min(times["tv"]) / min(times["ours"]), 2),
        "parts_median_ms": {
            "ours_assign_targets": median_ms(times["ours_match"]),
            "ours_multibox_loss_fwd_bwd": median_ms(times["ours_loss"]),
            "torchvision_matching": median_ms(times["tv_match"]),
            "torchvision_compute_loss_fwd_bwd": median_ms(times["tv_loss"]),
        },
        "ours_loss": losses["ours"],
        "torchvision_loss": losses["tv"],
        "max_abs_logit_grad_difference": grad_gap,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    parts = result["parts_median_ms"]
    print(
        f"batch {BATCH}, {result['priors']} priors, {NUM_CLASSES} classes, 1-{MAX_BOXES} boxes/image, "
        f"{args.threads} threads, median of {args.reps}"
    )
    print(
        f"  ours        assign_targets + multibox_loss fwd+bwd: {ours_ms:8.2f} ms "
        f"({parts['ours_assign_targets']:.2f} + {parts['ours_multibox_loss_fwd_bwd']:.2f})   loss {losses['ours']:.6f}"
    )
    print(
        f"  torchvision SSDMatcher + compute_loss fwd+bwd:     {reference_ms:8.2f} ms "
        f"({parts['torchvision_matching']:.2f} + {parts['torchvision_compute_loss_fwd_bwd']:.2f})   "
        f"loss {losses['tv']:.6f}"
    )
    print(
        f"  speed-up: {result['speedup']:.2f}x (of minima {result['speedup_of_minima']:.2f}x)   "
        f"max |d logits grad| {grad_gap:.2e}   -> {RESULTS}"
    )


if __name__ == "__main__":
    main()
