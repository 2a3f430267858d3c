"""What the team MLflow server's round trips cost a training step, against the local SQLite store (the reference).

Both stores in one run: ``sqlite:///<tmp>/mlflow.db`` (the default of a laptop run) and the loopback cluster's
server (``infra/local``: ``mlflow server --app-name basic-auth``, SQLite behind it, every request
authenticated), reached over HTTP as the training user. For each store, in interleaved rounds:

- ``blocking``: how long ``MlflowTracker.log_metrics`` of the 8 per-step training metrics holds the step
  (median and max over ``--steps`` steps): what a step pays with the background sender;
- ``round_trip``: one step's metrics sent and stored, i.e. ``log_metrics`` then ``flush`` (median): what a
  step would pay if it waited for the store (and how long the sender is busy per request);
- ``drain``: ``--steps`` steps logged back to back, then ``flush``: seconds per step of sender throughput.

Run: ``.venv/bin/python benchmarks/bench_tracking_server.py [--cluster-dir DIR] [--steps 100] [--rounds 3]``.
Without ``--cluster-dir`` it starts a cluster with no worker nodes (``infra/local/start --workers 0``) in a
temporary folder and stops it at the end. Prints the figures, writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_tracking_server.json"
sys.path[:0] = [str(REPO)]

from pipeline.config import TrackingConfig  # noqa: E402
from pipeline.tracking import create_tracker  # noqa: E402

METRICS = ("loss", "loss_loc", "loss_conf", "lr", "images_per_sec", "positives_per_image", "skipped", "bad")


def _metrics(step: int) -> dict[str, float]:
    return {f"train/{name}": 1.0 / (step + i + 1) for i, name in enumerate(METRICS)}


def measure(uri: str, steps: int, root: Path) -> dict[str, float]:
    """One round against the store at ``uri``: blocking, round trip and drain figures (seconds)."""
    cfg = TrackingConfig(uri=uri, experiment="bench-tracking-server", register_model=False)
    tracker = create_tracker(cfg, enabled_here=True, run_id=None, run_name="bench", repo_root=root)
    blocking, trips = [], []
    for step in range(1, steps + 1):  # round trips: each step waits for its request
        started = time.perf_counter()
        tracker.log_metrics(_metrics(step), step)
        blocking.append(time.perf_counter() - started)
        assert tracker.flush(60)
        trips.append(time.perf_counter() - started)
    started = time.perf_counter()
    for step in range(steps + 1, 2 * steps + 1):  # drain: the sender batches what queued up
        tracker.log_metrics(_metrics(step), step)
    assert tracker.flush(120)
    drain = (time.perf_counter() - started) / steps
    tracker.close("FINISHED")
    return {
        "blocking_median_s": statistics.median(blocking),
        "blocking_max_s": max(blocking),
        "round_trip_median_s": statistics.median(trips),
        "drain_per_step_s": drain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster-dir", type=Path, help="a running infra/local cluster (default: start one)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    temp = Path(tempfile.mkdtemp(prefix="bts", dir="/tmp"))
    cluster_dir, started = args.cluster_dir, False
    if cluster_dir is None:
        cluster_dir, started = temp / "cluster", True
        subprocess.run([str(REPO / "infra/local/start"), "--dir", str(cluster_dir), "--workers", "0"], check=True)
    try:
        lines = (cluster_dir / "env").read_text().splitlines()
        env = dict(line.removeprefix("export ").split("=", 1) for line in lines)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ[key] = env[key]
        stores = {"sqlite": f"sqlite:///{temp / 'mlflow.db'}", "server": env["MLFLOW_TRACKING_URI"]}
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in stores}
        for _ in range(args.rounds):
            for name, uri in stores.items():
                rounds[name].append(measure(uri, args.steps, temp))
    finally:
        if started:
            subprocess.run([str(REPO / "infra/local/stop"), "--dir", str(cluster_dir)], check=True)
    summary = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in rounds.items()
    }
    ratio = summary["server"]["round_trip_median_s"] / summary["sqlite"]["round_trip_median_s"]
    for name, figures in summary.items():
        shown = ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in figures.items())
        print(f"{name}: {shown}")
    print(f"server / sqlite round trip: {ratio:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "steps": args.steps,
        "rounds": args.rounds,
        "metrics_per_step": len(METRICS),
        "summary": summary,
        "server_over_sqlite_round_trip": ratio,
        "all_rounds": rounds,
        "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    RESULTS.write_text(json.dumps(record, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
