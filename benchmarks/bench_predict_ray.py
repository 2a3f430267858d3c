"""Batch prediction throughput: ``predict --ray`` on 2 Ray Data actors against the single-process ``predict``.

Data: the raccoon photos (~500 x 400 JPEGs, ``$SSD_RACCOON_DIR/images`` or ``../shared/datasets/raccoon/images``),
read in place (outputs go to a temporary folder). Model: an untrained ``--preset`` (default ``ssd_tiny``)
saved as a model file; untrained, its detections fill ``eval.max_detections`` at the default ``--min-score``,
so post-processing is at its dearest, the same for both.

Timed, each through the command (``pipeline.cli.main``), images per second of wall time:
- ``single``: ``predict --no-draw`` (the reference: one process, torch's default threads, 4 reader threads);
- ``ray_cold``: ``predict --ray --ray-workers W``, starting its own local Ray and shutting it down (what a
  user's first command costs on one machine);
- ``ray_warm``: the same with Ray already running in the process (a cluster that is up: actor start-up,
  model shipping and the work, without Ray's own start).
Each round runs the three in a rotated order, so drifting machine load hits all alike. The outputs of every
Ray run are checked (``results.json`` byte for byte) against a single-process run on one torch thread, what
each actor (1 CPU) runs on; that run is timed too (``single_1_thread``) but is not the reference.

Run: ``.venv/bin/python benchmarks/bench_predict_ray.py [--rounds 2] [--workers 2] [--limit N] [--repeat K]``
(``--repeat``: every photo copied K times under other names, so that Ray's fixed start-up costs less per
image); prints the
figures and writes ``benchmarks/results/bench_predict_ray.json`` (with the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_predict_ray.json"
sys.path[:0] = [str(REPO)]

import ray  # noqa: E402
import torch  # noqa: E402
from _raccoon import raccoon_root  # noqa: E402

from pipeline.artifacts.model_file import save_model_file  # noqa: E402
from pipeline.cli import main as cli_main  # noqa: E402
from pipeline.config import load_params, params_to_dict  # noqa: E402
from pipeline.training.ray_runtime import connect_ray  # noqa: E402
from ssd_core.model import build_ssd  # noqa: E402


def photos_folder() -> Path:
    return raccoon_root() / "images"


def run(name: str, argv: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    status = cli_main([*argv, "--out", str(out)])
    elapsed = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{name}: exit status {status}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="ssd_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (0: all)")
    parser.add_argument("--repeat", type=int, default=1, help="each photo K times (links), to amortise start-up")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the private local instances started here
    os.environ.pop("RAY_ADDRESS", None)

    work = Path(tempfile.mkdtemp(prefix="bench-predict-ray-"))
    source = photos_folder()
    if args.limit or args.repeat > 1:
        source_files = sorted(source.iterdir())[: args.limit or None]
        (work / "photos").mkdir()
        for k in range(args.repeat):
            for path in source_files:
                shutil.copyfile(path, work / "photos" / f"{k}-{path.name}")  # a link would be read once
        source = work / "photos"
    images = sum(1 for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    torch.manual_seed(0)
    model = work / "model.pt"
    save_model_file(
        model, build_ssd(args.preset, num_classes=2), classes=["raccoon"], params=params_to_dict(load_params(None))
    )

    base = ["predict", "--model", str(model), str(source), "--batch-size", str(args.batch_size), "--no-draw"]
    ray_argv = [*base, "--ray", "--ray-workers", str(args.workers)]
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = run("single_1_thread", base, work / "out-check")
    torch.set_num_threads(threads)
    reference = (work / "out-check" / "results.json").read_bytes()
    print(f"single, 1 thread: {one_thread:.1f} s, {images / one_thread:.1f} images/s")
    times: dict[str, list[float]] = {"single": [], "ray_cold": [], "ray_warm": []}
    for round_index in range(args.rounds):
        order = list(times)[round_index % 3 :] + list(times)[: round_index % 3]
        for name in order:
            out = work / f"out-{name}"
            if name == "single":
                times[name].append(run(name, base, out))
            elif name == "ray_cold":
                times[name].append(run(name, ray_argv, out))
            else:
                connect_ray(cpus_needed=args.workers, dashboard=False, purpose="bench")
                try:
                    times[name].append(run(name, ray_argv, out))
                finally:
                    ray.shutdown()
            if name != "single":
                assert (out / "results.json").read_bytes() == reference, f"{name}: detections differ from predict's"
            print(f"round {round_index + 1} {name}: {times[name][-1]:.1f} s, {images / times[name][-1]:.1f} images/s")

    rates = {name: images / statistics.median(values) for name, values in times.items()}
    result = {
        "images": images,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "seconds": times,
        "single_1_thread_seconds": one_thread,
        "outputs_equal_single_1_thread": True,
        "images_per_s_median": rates,
        "ratio_ray_cold_to_single": rates["ray_cold"] / rates["single"],
        "ratio_ray_warm_to_single": rates["ray_warm"] / rates["single"],
        "torch_threads_single": threads,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("images", "images_per_s_median", "ratio_ray_cold_to_single", "ratio_ray_warm_to_single")
            },
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
