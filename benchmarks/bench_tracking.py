"""What MLflow tracking costs a training step: ssd_tiny on the CPU, a real SQLite store, grad stats on/off.

One training step = assign targets + forward + MultiBox loss + backward + SGD step of ``ssd_tiny``
(21 classes, batch 8, 160 x 160 random images with 1-6 random boxes), on one intra-op thread like a
training worker (``train.threads_per_worker: 1``). Three configurations, all in this run:

- ``baseline``: the step alone (the reference);
- ``metrics``: the step, then ``log_metrics`` of the 8 per-step training metrics (``train/loss`` ...
  ``train/bad_samples``) to an ``MlflowTracker`` on ``sqlite:///<tmp>/metrics.db``;
- ``grad_every_step``: as ``metrics``, plus ``GradStats.before_step`` / ``after_step`` around the
  optimiser step and its 3 summary metrics logged on every step (the worst case), to its own store.
``grad_every_50`` (the default interval) is derived: metrics overhead + 1/50 of the grad-stats overhead.

The machine is shared, so the configurations run in short interleaved blocks (``--block`` steps each,
``--rounds`` times, one model trained throughout) and the overhead is the median over rounds of the
paired difference "config block - baseline block" of block medians: load that comes and goes hits the
neighbouring blocks alike. Reported besides: the time one ``log_metrics`` call blocks the step (median,
max), the process CPU time per step (all threads, so the background sender counts), the final flush.

Run: ``.venv/bin/python benchmarks/bench_tracking.py [--rounds 8] [--block 5]``; prints the figures and
writes ``benchmarks/results/bench_tracking.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_tracking.json"
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from pipeline.config import TrackingConfig  # noqa: E402
from pipeline.tracking import create_tracker  # noqa: E402
from pipeline.training.grad_stats import GradStats  # noqa: E402
from ssd_core.loss import multibox_loss  # noqa: E402
from ssd_core.matching import assign_targets  # noqa: E402
from ssd_core.model import build_ssd  # noqa: E402

NUM_CLASSES = 21
BATCH = 8
MAX_BOXES = 6
GRAD_INTERVAL = 50
CONFIGS = ("baseline", "metrics", "grad_every_step")


def make_batches(n: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.randn(BATCH, 3, size, size, generator=gen)
        xy = torch.rand(BATCH, MAX_BOXES, 2, generator=gen) * 0.6
        wh = 0.1 + torch.rand(BATCH, MAX_BOXES, 2, generator=gen) * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)  # [B, G, 4]
        labels = torch.randint(1, NUM_CLASSES, (BATCH, MAX_BOXES), generator=gen)
        mask = torch.arange(MAX_BOXES)[None] < torch.randint(1, MAX_BOXES + 1, (BATCH, 1), generator=gen)
        batches.append((images, boxes, labels, mask))
    return batches


class Bench:
    """One model and optimiser trained through every block; one tracker per logging configuration."""

    def __init__(self, workdir: Path):
        torch.manual_seed(0)
        self.model = build_ssd("ssd_tiny", NUM_CLASSES).train()
        self.priors = self.model.priors()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.batches = make_batches(8, self.model.image_size)
        self.grad_stats = GradStats(self.model, every=1)
        self.trackers = {
            config: create_tracker(
                TrackingConfig(experiment="bench", uri=f"sqlite:///{workdir / config}.db"),
                enabled_here=True,
                run_id=None,
                run_name=config,
                repo_root=workdir,
            )
            for config in CONFIGS[1:]
        }
        self.step = 0
        self.log_calls: dict[str, list[float]] = {c: [] for c in CONFIGS[1:]}

    def block(self, config: str, steps: int) -> tuple[float, float]:
        """Run ``steps`` steps of ``config``; returns (median step wall time, CPU time per step)."""
        tracker = self.trackers.get(config)
        grads = config == "grad_every_step"
        times = []
        cpu_started = time.process_time()
        for _ in range(steps):
            self.step += 1
            images, boxes, labels, mask = self.batches[self.step % len(self.batches)]
            started = time.perf_counter()
            targets = assign_targets(boxes, labels, mask, self.priors)
            out = self.model(images)
            terms = multibox_loss(out.loc, out.cls_logits, targets.loc_targets, targets.cls_targets)
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if grads:
                self.grad_stats.before_step()
            self.optimizer.step()
            if tracker is not None:
                step_metrics = {
                    "train/loss": terms.total.item(),
                    "train/loss_loc": terms.loc.item(),
                    "train/loss_conf": terms.conf.item(),
                    "train/lr": 1e-3,
                    "train/images_per_sec": 0.0,
                    "train/positives_per_image": 0.0,
                    "train/skipped_steps": 0,
                    "train/bad_samples": 0,
                }
                grad_metrics = self.grad_stats.after_step(self.step).metrics() if grads else None
                log_started = time.perf_counter()  # what the step waits for in the tracker itself
                tracker.log_metrics(step_metrics, self.step)
                if grad_metrics is not None:
                    tracker.log_metrics(grad_metrics, self.step)
                self.log_calls[config].append(time.perf_counter() - log_started)
            times.append(time.perf_counter() - started)
        return statistics.median(times), (time.process_time() - cpu_started) / steps

    def close(self) -> dict[str, float]:
        flush = {}
        for config, tracker in self.trackers.items():
            started = time.perf_counter()
            assert tracker.close(), f"{config}: tracking did not flush"
            flush[config] = time.perf_counter() - started
        return flush


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=5, help="steps per configuration block")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        bench = Bench(Path(tmp))
        for config in CONFIGS:  # warm-up: allocators, the stores' first writes
            bench.block(config, 2)
        blocks: dict[str, list[tuple[float, float]]] = {c: [] for c in CONFIGS}
        for _ in range(args.rounds):
            for config in CONFIGS:
                blocks[config].append(bench.block(config, args.block))
        flush = bench.close()
    wall = {c: statistics.median(b[0] for b in blocks[c]) for c in CONFIGS}
    cpu = {c: statistics.median(b[1] for b in blocks[c]) for c in CONFIGS}
    paired = {
        c: statistics.median(blocks[c][r][0] - blocks["baseline"][r][0] for r in range(args.rounds))
        for c in CONFIGS[1:]
    }
    paired_cpu = {
        c: statistics.median(blocks[c][r][1] - blocks["baseline"][r][1] for r in range(args.rounds))
        for c in CONFIGS[1:]
    }
    default = paired["metrics"] + (paired["grad_every_step"] - paired["metrics"]) / GRAD_INTERVAL
    base = wall["baseline"]
    log_calls = {c: sorted(v) for c, v in bench.log_calls.items()}
    result = {
        "benchmark": "bench_tracking",
        "model": "ssd_tiny",
        "batch": BATCH,
        "image_size": bench.model.image_size,
        "threads": 1,
        "rounds": args.rounds,
        "block_steps": args.block,
        "store": "sqlite (local file)",
        "median_step_ms": {c: round(1000 * wall[c], 2) for c in CONFIGS},
        "overhead_ms_per_step": {
            "metrics": round(1000 * paired["metrics"], 2),
            "grad_every_step": round(1000 * paired["grad_every_step"], 2),
            f"grad_every_{GRAD_INTERVAL}": round(1000 * default, 2),
        },
        "overhead_pct": {
            "metrics": round(100 * paired["metrics"] / base, 2),
            "grad_every_step": round(100 * paired["grad_every_step"] / base, 2),
            f"grad_every_{GRAD_INTERVAL}": round(100 * default / base, 2),
        },
        "cpu_ms_per_step": {c: round(1000 * cpu[c], 2) for c in CONFIGS},
        "cpu_overhead_ms_per_step": {c: round(1000 * v, 2) for c, v in paired_cpu.items()},
        "log_call_ms": {
            c: {"median": round(1000 * statistics.median(v), 4), "max": round(1000 * v[-1], 3)}
            for c, v in log_calls.items()
        },
        "flush_ms": {c: round(1000 * v, 1) for c, v in flush.items()},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
    }
    print(
        f"bench_tracking: ssd_tiny, batch {BATCH}, {bench.model.image_size} px, 1 thread, {args.rounds} rounds x "
        f"{args.block}-step blocks per configuration, SQLite store"
    )
    print(f"  baseline         {1000 * base:8.2f} ms/step (CPU {1000 * cpu['baseline']:.2f} ms)")
    for c in CONFIGS[1:]:
        calls = result["log_call_ms"][c]
        print(
            f"  {c:16s} {1000 * wall[c]:8.2f} ms/step (CPU {1000 * cpu[c]:.2f} ms): overhead "
            f"{1000 * paired[c]:+.2f} ms = {100 * paired[c] / base:+.1f} % (CPU {1000 * paired_cpu[c]:+.2f} ms); "
            f"log_metrics blocks {calls['median']:.3f} ms median, {calls['max']:.2f} ms max; "
            f"flush {result['flush_ms'][c]:.0f} ms"
        )
    print(
        f"  grad stats every {GRAD_INTERVAL} steps (the default): {1000 * default:+.2f} ms/step "
        f"({100 * default / base:+.1f} %)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
