"""What validation during training costs the embedded default: a real 2-worker Ray run, timed from its own metrics.

The run is the embedded default (``params.yaml``: ``ssd_tiny``, 2 workers x 1 thread, 16 images per worker,
bf16 + channels-last, the 200 default validation images of 160 x 160) cut to ``--steps`` steps, validating
every ``--every`` steps, tracked to a throw-away SQLite MLflow store. The training set is smaller than the
default's 1,600 images (``--train-images``): a step's cost does not depend on how many images there are.

Both figures come from the same run:

- the reference: the seconds per training step, from ``train/images_per_sec`` of the logging intervals
  (``train.log_every_steps`` = 10) that hold no validation (the first, which holds the start-up, left out);
- validation: ``val/seconds`` of each validation (every rank scores its half, rank 0 gathers and scores).

The overhead at the default interval is ``n_val * v / (max_steps * t_step + n_val * v)`` with the default's
1,000 steps and a validation every 200 (5 validations), ``v`` the median validation and ``t_step`` the median
clean step. The intervals that do hold a validation give a second estimate of ``v``.

Run: ``.venv/bin/python benchmarks/bench_validation.py [--steps 60] [--every 20]``; prints the figures and
writes ``benchmarks/results/bench_validation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_validation.json"
sys.path[:0] = [str(REPO)]

from pipeline.cli import main as cli_main  # noqa: E402
from pipeline.config import load_params  # noqa: E402

DEFAULT_STEPS, DEFAULT_EVERY = 1000, 200  # the embedded default's run and validation interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--work", type=Path, help="the folder of an earlier call: analyse its run, train nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-validation-"))
    defaults = load_params(REPO / "params.yaml")
    data = [f"data.synthetic.num_train={args.train_images}", "data.synthetic.num_test=0"]
    params = ["--params", str(REPO / "params.yaml")]
    prepared, shards, model = work / "prepared", work / "shards", work / "ssd.pt"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    run = [
        f"train.max_steps={args.steps}",
        f"train.val_every_steps={args.every}",
        f"train.checkpoint_every_steps={args.steps}",
        f"train.storage_path={work / 'runs'}",
        f"tracking.uri={uri}",
        "tracking.register_model=false",
        "tracking.grad_stats_every=0",
    ]
    if args.work is None:
        assert cli_main(["prepare", *params, "--out", str(prepared), "--report", str(work / "p.json"), *data]) == 0
        assert cli_main(["shard", *params, "--index", str(prepared), "--out", str(shards)]) == 0
        assert cli_main(["train", *params, "--shards", str(shards), "--model-out", str(model), *run]) == 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(defaults.tracking.experiment)
    run_id = client.search_runs([experiment.experiment_id])[0].info.run_id
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val/seconds")}
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "train/images_per_sec")}
    every_log = defaults.train.log_every_steps
    images = defaults.train.batch_size * defaults.train.num_workers  # per step
    holds_validation = {s for s in rates if any(s - every_log <= v < s for v in val)}  # validated inside it
    first = min(rates)
    clean = [images / rates[s] for s in rates if s != first and s not in holds_validation]
    dirty = [images / rates[s] for s in holds_validation]
    t_step = statistics.median(clean)
    v = statistics.median(val.values())
    v_from_intervals = (statistics.median(dirty) - t_step) * every_log if dirty else None
    n_val = DEFAULT_STEPS // DEFAULT_EVERY
    overhead = n_val * v / (DEFAULT_STEPS * t_step + n_val * v)
    result = {
        "steps": args.steps,
        "every": args.every,
        "seconds_per_step": t_step,
        "validation_seconds": sorted(val.values()),
        "validation_seconds_median": v,
        "validation_seconds_from_intervals": v_from_intervals,
        "default_validations": n_val,
        "default_overhead": overhead,
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"training step {t_step:.2f} s; validation of 200 images {v:.2f} s (from the intervals: "
        f"{v_from_intervals if v_from_intervals is None else round(v_from_intervals, 2)} s); at the default "
        f"interval ({n_val} validations in {DEFAULT_STEPS} steps): {100 * overhead:.2f}% of the training time"
    )


if __name__ == "__main__":
    main()
