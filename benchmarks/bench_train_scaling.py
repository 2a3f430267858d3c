"""Distributed training throughput and fault overhead, through the real stage code under a local Ray.

1. Scaling: train images/s and step time of 1 worker x 2 threads (the reference) against 2 workers x 1
   thread (DDP over gloo), at the same global batch, for ``ssd_tiny`` and ``ssd300_vgg16``. Images/s is
   what the training loop itself logs to MLflow (``train/images_per_sec``: global images per second of
   wall time, data loading, matching, forward, backward, all-reduce and optimiser step included), median
   over the log intervals after the first (which holds start-up effects).
2. Fault overhead: wall time of the whole stage (``build_job`` + ``train``: worker start-up, training,
   checkpoints, model file) for ``ssd_tiny`` with 2 workers, without a fault (the reference) and with
   rank 1 SIGKILLed mid-run (``pipeline.training.faults``); the restarted group resumes from the last
   checkpoint.
3. ``--gpu`` (on a CUDA machine only): ``ssd300_vgg16``, one GPU worker, bf16 autocast and channels_last,
   images/s with the GPU named.

Run: ``.venv/bin/python benchmarks/bench_train_scaling.py [--vgg-steps N] [--tiny-steps N] [--gpu]``.
Prints the figures and writes ``benchmarks/results/bench_train_scaling.json``.
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
RESULTS = REPO / "benchmarks" / "results" / "bench_train_scaling.json"
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.cli import main as cli_main  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.stages.train import build_job, train  # noqa: E402
from pipeline.training import faults  # noqa: E402

COMMON = [
    "seed=0",
    "train.loader_workers=0",
    "train.warmup_steps=2",
    "train.lr=0.01",
    "train.lr_reference_batch=16",
    "tracking.grad_stats_every=0",
    "tracking.register_model=false",
]


def make_shards(root: Path, num_train: int) -> str:
    (root / "params.yaml").write_text("seed: 0\n")
    synthetic = [f"data.synthetic.num_train={num_train}", "data.synthetic.num_val=8", "data.synthetic.image_size=160"]
    assert (
        cli_main(
            [
                "prepare",
                "--params",
                str(root / "params.yaml"),
                "--out",
                str(root / "prepared"),
                "--report",
                str(root / "prepare.json"),
                *synthetic,
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "shard",
                "--params",
                str(root / "params.yaml"),
                "--index",
                str(root / "prepared"),
                "--out",
                str(root / "shards"),
            ]
        )
        == 0
    )
    return str(root / "shards")


def run(root: Path, shards: str, name: str, overrides: list[str], *, fault: dict | None = None) -> float:
    """One training run through the stage code; returns its wall time in seconds."""
    params = load_params(
        None, [*COMMON, f"train.storage_path={root / 'runs' / name}", f"train.run_name={name}", *overrides]
    )
    if fault:
        os.environ[faults.ENV_VAR] = json.dumps(fault)
    else:
        os.environ.pop(faults.ENV_VAR, None)
    start = time.perf_counter()
    job = build_job(shards, params, REPO)
    train(job, params, root / "models" / f"{name}.pt")
    return time.perf_counter() - start


def throughput(uri: str, experiment: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = sorted(client.get_metric_history(found.info.run_id, "train/images_per_sec"), key=lambda m: m.step)
    return [m.value for m in history]


def scaling(root: Path, shards: str, preset: str, steps: int, global_batch: int, log_every: int) -> dict:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = {"preset": preset, "steps": steps, "global_batch": global_batch, "configs": {}}
    for workers, threads in ((1, 2), (2, 1)):
        name = f"{preset}-{workers}x{threads}"
        overrides = [
            f"model.preset={preset}",
            f"train.num_workers={workers}",
            f"train.threads_per_worker={threads}",
            f"train.batch_size={global_batch}",  # the global batch, split over the workers
            f"train.max_steps={steps}",
            f"train.checkpoint_every_steps={steps}",
            f"train.log_every_steps={log_every}",
            "tracking.enabled=true",
            f"tracking.uri={uri}",
            f"tracking.experiment={name}",
        ]
        wall = run(root, shards, name, overrides)
        per_interval = throughput(uri, name)
        ips = statistics.median(per_interval[1:] or per_interval)
        out["configs"][f"{workers}x{threads}"] = {
            "workers": workers,
            "threads_per_worker": threads,
            "images_per_sec": round(ips, 2),
            "step_time_s": round(global_batch / ips, 4),
            "wall_s": round(wall, 1),
            "images_per_sec_by_interval": [round(v, 2) for v in per_interval],
        }
    ref, ddp = out["configs"]["1x2"], out["configs"]["2x1"]
    out["ratio_2x1_over_1x2_images_per_sec"] = round(ddp["images_per_sec"] / ref["images_per_sec"], 3)
    print(
        f"{preset:>13}: 1 worker x 2 threads {ref['images_per_sec']:7.2f} img/s ({ref['step_time_s']:.3f} s/step)"
        f" | 2 workers x 1 thread {ddp['images_per_sec']:7.2f} img/s ({ddp['step_time_s']:.3f} s/step)"
        f" | ratio {out['ratio_2x1_over_1x2_images_per_sec']:.2f}"
    )
    return out


def fault_overhead(root: Path, shards: str, steps: int) -> dict:
    overrides = [
        "model.preset=ssd_tiny",
        "train.num_workers=2",
        "train.threads_per_worker=1",
        "train.batch_size=16",  # global: 8 per worker
        f"train.max_steps={steps}",
        "train.checkpoint_every_steps=4",
        f"train.log_every_steps={steps}",
        "train.max_failures=1",
        "tracking.enabled=false",
    ]
    kill_at = steps - steps // 4 - 2  # two steps after a checkpoint, late in the run
    clean = run(root, shards, "fault-none", overrides)
    killed = run(
        root,
        shards,
        "fault-kill",
        overrides,
        fault={"kill": [{"rank": 1, "step": kill_at, "marker": str(root / "killed")}]},
    )
    assert (root / "killed").exists(), "the fault did not fire"
    out = {
        "preset": "ssd_tiny",
        "steps": steps,
        "killed_rank": 1,
        "killed_after_step": kill_at,
        "wall_s_no_fault": round(clean, 1),
        "wall_s_one_worker_killed": round(killed, 1),
        "ratio_killed_over_no_fault": round(killed / clean, 3),
    }
    print(
        f"fault overhead (ssd_tiny, {steps} steps, rank 1 killed after step {kill_at}): {clean:.1f} s without, "
        f"{killed:.1f} s with one worker killed -> x{out['ratio_killed_over_no_fault']:.2f}"
    )
    return out


def gpu(root: Path, shards: str, steps: int) -> dict:
    name = "gpu-ssd300-bf16"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = [
        "model.preset=ssd300_vgg16",
        "train.num_workers=1",
        "train.use_gpu=true",
        "train.precision=bf16",
        "train.channels_last=true",
        "train.batch_size=64",
        "train.loader_workers=8",
        f"train.max_steps={steps}",
        f"train.checkpoint_every_steps={steps}",
        "train.log_every_steps=5",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        f"tracking.experiment={name}",
    ]
    run(root, shards, name, overrides)
    per_interval = throughput(uri, name)
    ips = statistics.median(per_interval[1:] or per_interval)
    device = torch.cuda.get_device_name(0)
    print(f"ssd300_vgg16 bf16 on one {device}: {ips:.0f} img/s")
    return {"device": device, "images_per_sec": round(ips, 1), "batch": 64, "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny-steps", type=int, default=16)
    parser.add_argument("--vgg-steps", type=int, default=5)
    parser.add_argument("--fault-steps", type=int, default=24)
    parser.add_argument("--gpu", action="store_true", help="also measure ssd300_vgg16 bf16 on one GPU")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("bench_train_scaling: --gpu needs a CUDA build of torch and a GPU")
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance on 127.0.0.1
    try:
        shards = make_shards(root, num_train=64)
        ray.init(
            num_cpus=os.cpu_count() or 2,
            num_gpus=torch.cuda.device_count(),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            _temp_dir=temp,
            logging_level="WARNING",
            log_to_driver=False,
        )
        results = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "ray": ray.__version__,
            },
            "scaling": [
                scaling(root, shards, "ssd_tiny", args.tiny_steps, 16, log_every=4),
                scaling(root, shards, "ssd300_vgg16", args.vgg_steps, 4, log_every=1),
            ],
            "fault_overhead": fault_overhead(root, shards, args.fault_steps),
        }
        if args.gpu:
            results["gpu"] = gpu(root, shards, steps=60)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
