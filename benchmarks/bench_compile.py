"""``train.compile`` on this CPU: the compiled training step against the eager one, both bf16 + channels_last.

The step is the pipeline's own ``train_step`` (normalisation, target assignment, forward under bf16 autocast,
MultiBox loss, backward, clip, fused SGD update): eager with ``step_loss``, and with ``step_loss`` compiled by
``torch.compile`` (inductor, ``pipeline.training.compiled``). Both models start from the same weights and see
the same random batch (300 x 300 for ``ssd300_vgg16``, 1-10 boxes per image padded to ``train.max_boxes``).
Compilation happens in warm-up steps, which are not timed; then the two take turns step by step and the ratio
uses each side's fastest round (a shared machine's load only ever adds time), medians reported too, with the
load average.

Where the time goes: one more step of each under ``torch.profiler``, split into convolutions
(``mkldnn_convolution``, ``convolution_backward``, whose oneDNN kernels inductor calls unchanged) and the rest,
which is all that compilation can speed up. ``eager step / (eager step - eager rest + compiled rest)`` is then
what full fusion of everything but the convolutions could give at best.

Run: ``.venv/bin/python benchmarks/bench_compile.py [--presets ssd_tiny ssd300_vgg16] [--rounds N]``. Writes
``benchmarks/results/bench_compile.json``. ``--eager-profile-only`` skips compilation and measures only the
eager step's convolution share (``bench_compile_profile.json``).
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
RESULTS = REPO / "benchmarks" / "results" / "bench_compile.json"
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.shards.batch import TrainBatch  # noqa: E402
from pipeline.training.compiled import build_step_functions  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402
from pipeline.training.step import StepFunctions, train_step  # noqa: E402
from ssd_core.model import build_ssd  # noqa: E402

CONV_OPS = ("mkldnn_convolution", "convolution_backward", "aten::convolution", "aten::_convolution")


def _batch(batch: int, size: int, max_boxes: int) -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    corner = torch.rand(batch, max_boxes, 2, generator=gen) * 0.7
    boxes = torch.cat((corner, corner + 0.05 + torch.rand(batch, max_boxes, 2, generator=gen) * 0.25), dim=-1)
    labels = torch.randint(1, 21, (batch, max_boxes), generator=gen)
    mask = torch.arange(max_boxes)[None, :] < torch.randint(1, 11, (batch, 1), generator=gen)
    return TrainBatch(images, boxes, labels, torch.zeros_like(mask), mask, 0)


def _conv_split(fn) -> tuple[float, float]:
    """(convolution seconds, total seconds) of one call of ``fn`` under the profiler (self CPU times)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    conv = sum(e.self_cpu_time_total for e in events if any(op in e.key for op in CONV_OPS)) / 1e6
    return conv, total


def bench(preset: str, batch: int, rounds: int, warmup: int) -> dict:
    cfg = TrainConfig(precision="bf16", channels_last=True, lr=1e-5, batch_size=batch, compile=True)
    data = _batch(batch, build_ssd(preset, 21).image_size, cfg.max_boxes)
    sides = {}
    for name, loss_fn in (("eager", StepFunctions()), ("compiled", build_step_functions(cfg, torch.device("cpu")))):
        torch.manual_seed(0)
        model = build_ssd(preset, 21).to(memory_format=torch.channels_last).train()
        sides[name] = (model, build_optimizer(model, cfg), loss_fn, model.priors())
    warm = {}
    for name, (model, optimizer, loss_fn, priors) in sides.items():
        start = time.perf_counter()
        for _ in range(warmup):
            train_step(model, data, priors, optimizer, cfg=cfg, functions=loss_fn).read()
        warm[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, float] = {}
    for _ in range(rounds):
        for name, (model, optimizer, loss_fn, priors) in sides.items():
            start = time.perf_counter()
            losses[name] = train_step(model, data, priors, optimizer, cfg=cfg, functions=loss_fn).read().loss
            times[name].append(time.perf_counter() - start)
    split = {
        name: _conv_split(
            lambda m=model, o=optimizer, f=loss_fn, p=priors: train_step(m, data, p, o, cfg=cfg, functions=f)
        )
        for name, (model, optimizer, loss_fn, priors) in sides.items()
    }
    best = {name: min(t) for name, t in times.items()}
    eager_conv, eager_total = split["eager"]
    compiled_conv, compiled_total = split["compiled"]
    return {
        "preset": preset,
        "batch": batch,
        "step_s_min": best,
        "step_s_median": {name: statistics.median(t) for name, t in times.items()},
        "images_per_s_best": {name: batch / s for name, s in best.items()},
        "compiled_over_eager_best": best["eager"] / best["compiled"],
        "compiled_over_eager_median": statistics.median(times["eager"]) / statistics.median(times["compiled"]),
        "warmup_s_incl_compile": warm,
        "last_loss": losses,
        "profile_s": {
            "eager": {"conv": eager_conv, "total": eager_total},
            "compiled": {"conv": compiled_conv, "total": compiled_total},
        },
        "conv_fraction_eager": eager_conv / eager_total,
        "bound_if_everything_but_convs_were_free": eager_total / max(eager_conv, 1e-9),
    }


def eager_profile(preset: str, batch: int) -> dict:
    """Only the eager step's convolution share (no compilation): the bound on what compiling can give."""
    cfg = TrainConfig(precision="bf16", channels_last=True, lr=1e-5, batch_size=batch)
    torch.manual_seed(0)
    model = build_ssd(preset, 21).to(memory_format=torch.channels_last).train()
    optimizer, priors = build_optimizer(model, cfg), model.priors()
    data = _batch(batch, model.image_size, cfg.max_boxes)
    train_step(model, data, priors, optimizer, cfg=cfg).read()  # warm-up
    start = time.perf_counter()
    train_step(model, data, priors, optimizer, cfg=cfg).read()
    step_s = time.perf_counter() - start
    conv, total = _conv_split(lambda: train_step(model, data, priors, optimizer, cfg=cfg).read())
    return {
        "preset": preset,
        "batch": batch,
        "eager_step_s": step_s,
        "profile_s": {"conv": conv, "total": total},
        "conv_fraction_eager": conv / total,
        "bound_if_everything_but_convs_were_free": total / max(conv, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["ssd_tiny", "ssd300_vgg16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 4], help="per preset, in order")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager-profile-only", action="store_true", help="no compilation: the convolution share")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = [round(x, 2) for x in os.getloadavg()]
    results = []
    for preset, batch in zip(args.presets, args.batch, strict=False):
        if args.eager_profile_only:
            result = eager_profile(preset, batch)
        else:
            result = bench(preset, batch, args.rounds, args.warmup)
        print(json.dumps(result, indent=1), flush=True)
        results.append(result)
    report = {
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "threads": args.threads,
        "load_average_start_end": [load, [round(x, 2) for x in os.getloadavg()]],
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = RESULTS.with_name("bench_compile_profile.json") if args.eager_profile_only else RESULTS
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
