"""SSD300 train step on this CPU: ssd_core against torchvision's ``ssd300_vgg16``, side by side.

One train step, batch 8 at 300x300, 21 classes, SGD (momentum 0.9, weight decay 5e-4; ours fused, as the
pipeline trains):
- ours: ``normalize_images`` (uint8 -> float) + ``SSD.forward`` + ``assign_targets`` + ``multibox_loss``
  + ``backward()`` + ``optimizer.step()``;
- torchvision: ``ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)`` in training mode,
  ``model(images, targets)`` (its own normalisation, resize, anchors, matching and loss) + the summed
  losses' ``backward()`` + ``optimizer.step()``, as its users run it.
Both get the same images (random, as uint8; torchvision gets them /255 as it expects) and boxes.

Configurations: fp32 in the default layout; bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``
around forward and loss) with the model in ``channels_last``. (torchvision batches its inputs itself, in
the default layout; its weights are channels_last.) The learning rate is 1e-5 so neither model's loss
blows up over the repetitions (a diverged model can hit slow denormal/inf arithmetic); the step costs the
same at any rate.

Timing: all models live in one process and the configurations take turns step by step (one round =
one step of each) after one warm-up step each. This machine is shared, and a neighbour's load only
ever adds time, so the ratios use each configuration's fastest round (``step_s_min``, the least
disturbed estimate, as ``timeit`` advises); medians are reported too, with the load average.

Memory: each configuration also runs in a fresh subprocess (one warm-up step, one measured step);
we report its peak resident set size (``VmHWM``: the whole process, Python and torch included)
and the RSS just before the first step (model, optimizer, data), so ``peak - before`` is what the
train step itself adds (activations, gradients, momentum buffers, allocator slack).

Where the time goes (``--no-profile`` skips it): one more step of each bf16 + channels_last model under
``torch.profiler``, split into convolution kernels (``aten::mkldnn_convolution`` forward,
``aten::convolution_backward``) and everything else. Both models run the same 35 convolutions with the
same shapes, so ``torchvision step / our convolution time`` bounds the ratio reachable under identical
settings even if everything of ours but the convolutions took no time at all. The convolutions' nominal
multiply-accumulates per step (forward, plus grad-input and grad-weight backward; conv1_1 needs no
grad-input) divided by their time gives their arithmetic rate, compared with a large bf16 matmul in the same
process: how close oneDNN already runs them to what this CPU can do.

Also: ``ssd_tiny`` forward + backward images/s at batch 32 on one thread (what one DDP worker of the
embedded default runs), fp32 default layout, fp32 channels_last and bf16 + channels_last.

Run: ``.venv/bin/python benchmarks/bench_train_step.py [--rounds N] [--threads T]``. Prints the
figures and writes ``benchmarks/results/bench_train_step.json``. torchvision comes from ``.bench``
(``make bench-deps``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_train_step.json"
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402
from _torchvision_reference import require_torchvision  # noqa: E402

from ssd_core.augment import normalize_images  # noqa: E402
from ssd_core.loss import multibox_loss  # noqa: E402
from ssd_core.matching import assign_targets  # noqa: E402
from ssd_core.model import build_ssd  # noqa: E402

require_torchvision("bench_train_step")
from torchvision.models.detection import ssd300_vgg16  # noqa: E402

BATCH = 8
SIZE = 300
NUM_CLASSES = 21  # VOC: 20 classes + background
MAX_BOXES = 6
LR = 1e-5
TINY_BATCH = 32  # per worker, the embedded default
TINY_CLASSES = 7
CONFIGS = ("ours_fp32", "ours_bf16_cl", "torchvision_fp32", "torchvision_bf16_cl", "ours_fp32_cl")
TINY_CONFIGS = ("tiny_fp32", "tiny_fp32_cl", "tiny_bf16_cl")


def make_batch(seed: int = 0) -> dict:
    """uint8 images [B, 3, S, S], 1..MAX_BOXES boxes per image (xyxy normalised), labels 1..20."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    counts = torch.randint(1, MAX_BOXES + 1, (BATCH,), generator=gen)
    xy = torch.rand(BATCH, MAX_BOXES, 2, generator=gen) * 0.7
    wh = torch.rand(BATCH, MAX_BOXES, 2, generator=gen) * 0.25 + 0.05
    boxes = torch.cat((xy, xy + wh), dim=-1)  # [B, G, 4]
    labels = torch.randint(1, NUM_CLASSES, (BATCH, MAX_BOXES), generator=gen)
    mask = torch.arange(MAX_BOXES)[None] < counts[:, None]  # [B, G]
    return {"images": images, "boxes": boxes, "labels": labels, "mask": mask}


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def make_step(config: str, data: dict) -> Callable[[], float]:
    """A closure running one full train step of ``config``; returns the loss."""
    bf16 = "bf16" in config
    channels_last = config.endswith("_cl")
    torch.manual_seed(0)
    if config.startswith("ours"):
        model = build_ssd("ssd300_vgg16", NUM_CLASSES).train()
        priors = model.priors()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        images = data["images"].contiguous(memory_format=memory_format)
        boxes, labels, mask = data["boxes"], data["labels"], data["mask"]

        def loss_fn() -> torch.Tensor:
            out = model(normalize_images(images))
            targets = assign_targets(boxes, labels, mask, priors)
            return multibox_loss(out.loc, out.cls_logits, targets.loc_targets, targets.cls_targets).total
    else:
        model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        images = [img.float() / 255 for img in data["images"]]  # what torchvision's users feed it
        targets = [
            {"boxes": b[m] * SIZE, "labels": lab[m]}
            for b, lab, m in zip(data["boxes"], data["labels"], data["mask"], strict=True)
        ]

        def loss_fn() -> torch.Tensor:
            losses = model(images, targets)
            return losses["bbox_regression"] + losses["classification"]

    # Ours steps with the fused SGD kernel, as pipeline.training.optim does; torchvision's users (and its
    # detection references) use the default multi-tensor SGD.
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, fused=config.startswith("ours")
    )

    def step() -> float:
        with _autocast(bf16):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def make_tiny_step(config: str) -> Callable[[], float]:
    """ssd_tiny forward + backward (no loss): the network's share of one worker's step."""
    bf16 = "bf16" in config
    memory_format = torch.channels_last if config.endswith("_cl") else torch.contiguous_format
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", TINY_CLASSES).train().to(memory_format=memory_format)
    size = model.image_size
    images = torch.randn(TINY_BATCH, 3, size, size).contiguous(memory_format=memory_format)

    def step() -> float:
        with _autocast(bf16):
            out = model(images)
        loss = out.loc.square().mean() + out.cls_logits.logsumexp(-1).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.item()

    return step


def conv_macs_per_step(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Nominal multiply-accumulates of one train step's convolutions: forward + grad-weight for every conv,
    grad-input for all but those reading the input image (autograd skips it there)."""
    forward: dict[torch.nn.Module, int] = {}

    def count(module, args, out):
        kh, kw = module.kernel_size
        forward[module] = out.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    first = sum(macs for m, macs in forward.items() if m.in_channels == 3)  # conv1_1: no grad-input
    return 3 * sum(forward.values()) - first


def bf16_matmul_gmacs(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best bf16 ``[n, n] @ [n, n]`` rate in GMAC/s: the CPU's practical bf16 arithmetic peak."""
    torch.set_num_threads(threads)
    a = torch.randn(n, n).bfloat16()
    b = torch.randn(n, n).bfloat16()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return n**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


CONV_KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def profile_step(step: Callable[[], float]) -> dict:
    """One step under ``torch.profiler``: seconds in convolution kernels (self time) and in everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_KERNELS) / 1e6
    calls = sum(e.count for e in events if e.key == "aten::mkldnn_convolution")
    return {
        "profiled_step_s": round(total, 4),
        "conv_s": round(conv, 4),
        "other_s": round(total - conv, 4),
        "conv_share": round(conv / total, 4),
        "conv_forward_calls": calls,
    }


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS: resident now, VmHWM: peak resident) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure_memory(config: str) -> dict:
    """Run in a fresh process: RSS before the first step, and peak RSS over a warm-up and a measured step.

    VmHWM (not ``ru_maxrss``, which a child inherits from the parent that forked it) is the high-water
    mark of this process's own resident memory since it started.
    """
    step = make_tiny_step(config) if config.startswith("tiny") else make_step(config, make_batch())
    before = _status_mb("VmRSS")
    step()
    step()
    peak = _status_mb("VmHWM")
    return {
        "rss_before_step_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "step_adds_mb": round(peak - before, 1),
    }


def time_interleaved(steps: dict[str, Callable[[], float]], rounds: int, images_per_step: int) -> dict:
    """Warm up each step once, then ``rounds`` rounds of one step each; median seconds and images/s."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses = {}
    for name, step in steps.items():
        losses[name] = step()
    for r in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            losses[name] = step()
            times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    return {
        name: {
            "step_s_min": round(min(t), 4),
            "step_s_median": round(statistics.median(t), 4),
            "step_s_all": [round(x, 4) for x in t],
            "images_per_s": round(images_per_step / min(t), 3),
            "ms_per_image": round(1000 * min(t) / images_per_step, 2),
            "last_loss": round(losses[name], 4),
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--tiny-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for SSD300")
    parser.add_argument("--no-profile", action="store_true", help="skip the where-the-time-goes profile")
    parser.add_argument("--memory-only", default="", help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args()
    if args.memory_only:
        torch.set_num_threads(1 if args.memory_only.startswith("tiny") else args.threads)
        print(json.dumps(measure_memory(args.memory_only)))
        return

    torch.set_num_threads(args.threads)
    load_start = round(os.getloadavg()[0], 2)
    print(
        f"SSD300 train step, batch {BATCH}, {args.threads} threads, torch {torch.__version__}, "
        f"load average {load_start} on {os.cpu_count()} CPUs"
    )
    data = make_batch()
    steps = {c: make_step(c, data) for c in CONFIGS}
    results = time_interleaved(steps, args.rounds, BATCH)
    breakdown = {}
    if not args.no_profile:
        print("profiling one bf16 + channels_last step of each ...", flush=True)
        torch.manual_seed(0)
        macs = conv_macs_per_step(build_ssd("ssd300_vgg16", NUM_CLASSES), normalize_images(data["images"]))
        peak = bf16_matmul_gmacs(args.threads)
        torch.set_num_threads(args.threads)
        for config in ("ours_bf16_cl", "torchvision_bf16_cl"):
            breakdown[config] = profile_step(steps[config])
            breakdown[config]["conv_gmac_per_s"] = round(macs / breakdown[config]["conv_s"] / 1e9, 1)
        ours, theirs = breakdown["ours_bf16_cl"], breakdown["torchvision_bf16_cl"]
        breakdown["conv_gmac_per_step"] = round(macs / 1e9, 2)
        breakdown["bf16_matmul_gmac_per_s"] = round(peak, 1)
        breakdown["bound_ours_vs_torchvision_bf16_cl"] = round(theirs["profiled_step_s"] / ours["conv_s"], 3)
    del steps

    torch.set_num_threads(1)
    print(f"ssd_tiny forward + backward, batch {TINY_BATCH}, 1 thread")
    tiny = time_interleaved({c: make_tiny_step(c) for c in TINY_CONFIGS}, args.tiny_rounds, TINY_BATCH)

    print("peak memory, one fresh process per configuration ...", flush=True)
    for config in (*CONFIGS, *TINY_CONFIGS):
        child = subprocess.run(
            [sys.executable, __file__, "--memory-only", config, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        (results if config in results else tiny)[config].update(json.loads(child.stdout.splitlines()[-1]))

    def speedup(a: str, b: str, key: str = "step_s_min") -> float:
        return round(results[b][key] / results[a][key], 3)

    pairs = {
        "ours_bf16_cl_vs_torchvision_fp32": ("ours_bf16_cl", "torchvision_fp32"),
        "ours_bf16_cl_vs_torchvision_bf16_cl": ("ours_bf16_cl", "torchvision_bf16_cl"),
        "ours_fp32_vs_torchvision_fp32": ("ours_fp32", "torchvision_fp32"),
        "ours_fp32_cl_vs_torchvision_fp32": ("ours_fp32_cl", "torchvision_fp32"),
    }
    ratios = {name: speedup(*pair) for name, pair in pairs.items()}
    ratios_of_medians = {name: speedup(*pair, key="step_s_median") for name, pair in pairs.items()}
    goals = {
        "ours_bf16_cl_vs_torchvision_fp32 >= 2.0": ratios["ours_bf16_cl_vs_torchvision_fp32"] >= 2.0,
        "ours_bf16_cl_vs_torchvision_bf16_cl >= 1.1": ratios["ours_bf16_cl_vs_torchvision_bf16_cl"] >= 1.1,
    }
    report = {
        "benchmark": "bench_train_step",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "batch": BATCH,
        "image_size": SIZE,
        "num_classes": NUM_CLASSES,
        "rounds": args.rounds,
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "ssd300": results,
        "ratios": ratios,
        "ratios_of_medians": ratios_of_medians,
        "goals_met": goals,
        "bf16_cl_breakdown": breakdown,
        "ssd_tiny": {"batch": TINY_BATCH, "threads": 1, "num_classes": TINY_CLASSES, **tiny},
    }
    print()
    for name, r in results.items():
        print(
            f"{name:22s} {r['images_per_s']:6.2f} images/s  ({r['step_s_min']:.2f} s/step best, "
            f"{r['step_s_median']:.2f} median)  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (step adds {r['step_adds_mb']:.0f} MB)"
        )
    for name, value in ratios.items():
        print(f"{name:40s} {value:.2f}x  (medians: {ratios_of_medians[name]:.2f}x)")
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'MISSED'}")
    if breakdown:
        for config in ("ours_bf16_cl", "torchvision_bf16_cl"):
            b = breakdown[config]
            print(
                f"{config:22s} profiled step {b['profiled_step_s']:.2f} s: convolutions {b['conv_s']:.2f} s "
                f"({b['conv_share']:.0%}, {b['conv_forward_calls']} forward calls, "
                f"{b['conv_gmac_per_s']:.0f} GMAC/s), other {b['other_s']:.2f} s"
            )
        print(
            f"convolutions: {breakdown['conv_gmac_per_step']:.0f} GMAC per step; bf16 matmul peak in this process "
            f"{breakdown['bf16_matmul_gmac_per_s']:.0f} GMAC/s"
        )
        print(
            f"bound under identical settings (torchvision step / our convolutions alone): "
            f"{breakdown['bound_ours_vs_torchvision_bf16_cl']:.2f}x"
        )
    for name, r in tiny.items():
        print(
            f"{name:14s} {r['ms_per_image']:6.2f} ms/image  {r['images_per_s']:7.1f} images/s (1 thread)  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
