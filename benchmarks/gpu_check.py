"""The first thing to run on a GPU host: speed and correctness of SSD training there, in one JSON, <= 8 minutes.

Needs only torch (>= 2.4; APIs newer than that are guarded), numpy and this repository's ``ssd_core`` (pure
torch): no Ray, MLflow, DVC or webdataset, nothing from ``pipeline``. Run from the repository root:

    python benchmarks/gpu_check.py                      # one CUDA GPU, ~5-8 minutes
    python benchmarks/gpu_check.py --out results.json   # elsewhere

Each figure comes from the same run (``benchmarks/results/gpu_check.json`` by default, rewritten after every
section, so a run cut short keeps what it measured):

- ``correctness``: loss and every gradient of ``ssd300_vgg16`` on the device against the same batch on the CPU
  (fp32, TF32 off), relative errors and a pass flag.
- ``train``: training images/s of the model at batch 32 and 64, bf16 autocast + channels_last, random 300 x 300
  images with 1-10 random boxes each (padded to 10), the real target assignment and MultiBox loss, fused SGD;
  eager, ``torch.compile`` (inductor) and compiled + CUDA graphs (``mode="reduce-overhead"``); peak memory.
- ``assign_loss_ms``: target assignment + MultiBox loss forward + backward at batch 32 (the static-shape forms).
- ``postprocess_ms_per_image``: 8,732 priors x 21 classes, the evaluation settings; ``eval_images_per_s``:
  forward (bf16, channels_last) + post-processing.
- ``flops``: model FLOPs per image (forward, ``torch.utils.flop_counter``), x3 for a training step, and the
  achieved fraction of the device's dense bf16 peak (a table of published figures by device name).

``--preset ssd_tiny --steps 2 --device cpu --compile-backend eager`` is the CPU smoke run of
``tests/benchmarks/test_gpu_check.py``, which keeps the script from rotting where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssd_core.augment import normalize_images  # noqa: E402
from ssd_core.loss import multibox_loss  # noqa: E402
from ssd_core.matching import assign_targets  # noqa: E402
from ssd_core.model import build_ssd  # noqa: E402
from ssd_core.postprocess import postprocess  # noqa: E402

NUM_CLASSES = 21
MAX_BOXES = 10
BUDGET_S = 480.0  # the whole script; later sections are skipped (and say so) once it is spent
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets; matched by substring.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_batch(batch: int, size: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """uint8 images ``[B, 3, S, S]`` and 1-10 random valid boxes per image padded to ``MAX_BOXES``."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    corner = torch.rand(batch, MAX_BOXES, 2, generator=gen) * 0.7
    extent = 0.05 + torch.rand(batch, MAX_BOXES, 2, generator=gen) * 0.25
    boxes = torch.cat((corner, corner + extent), dim=-1)  # [B, G, 4] xyxy inside the unit square
    labels = torch.randint(1, NUM_CLASSES, (batch, MAX_BOXES), generator=gen)
    counts = torch.randint(1, MAX_BOXES + 1, (batch, 1), generator=gen)
    mask = torch.arange(MAX_BOXES)[None, :] < counts
    return tuple(t.to(device) for t in (images, boxes, labels, mask))


def _loss(model, images, boxes, labels, mask, priors, amp: bool) -> torch.Tensor:
    """The training loss of one batch, as ``pipeline.training.step.step_loss`` computes it."""
    x = normalize_images(images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        targets = assign_targets(boxes, labels, mask, priors)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    return multibox_loss(out.loc, out.cls_logits, targets.loc_targets, targets.cls_targets).total


def _sgd(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    try:  # fused SGD: CUDA from torch 2.3-2.4, CPU later
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def _mark_step() -> None:
    compiler = getattr(torch, "compiler", None)
    mark = getattr(compiler, "cudagraph_mark_step_begin", None)  # torch >= 2.2
    if mark is not None:
        mark()


def measure_train(args, device: torch.device, batch: int, mode: str) -> dict:
    """Images/s of ``steps`` timed training steps after ``warmup`` (compilation happens there)."""
    torch.manual_seed(0)
    model = build_ssd(args.preset, NUM_CLASSES).to(device).to(memory_format=torch.channels_last).train()
    priors = model.priors().to(device)
    optimizer = _sgd(model, device)
    loss_fn: Callable = _loss
    if mode != "eager":
        options = {"mode": "reduce-overhead"} if mode == "compiled+cuda_graphs" else {}
        loss_fn = torch.compile(_loss, backend=args.compile_backend, dynamic=False, **options)
    gen = torch.Generator().manual_seed(batch)
    data = _random_batch(batch, model.image_size, device, gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> torch.Tensor:
        _mark_step()
        loss = loss_fn(model, *data, priors, True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA graph replay overwrites its outputs

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    _sync(device)
    elapsed = time.perf_counter() - start
    result = {
        "images_per_s": batch * args.steps / elapsed,
        "ms_per_step": 1000 * elapsed / args.steps,
        "warmup_and_compile_s": warm_s,
        "last_loss": float(losses[-1]),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def measure_assign_loss(args, device: torch.device) -> float:
    """ms per target assignment + loss forward + backward, batch ``--loss-batch`` (32), on random logits."""
    model = build_ssd(args.preset, NUM_CLASSES)
    priors = model.priors().to(device)
    gen = torch.Generator().manual_seed(1)
    batch = args.loss_batch
    _, boxes, labels, mask = _random_batch(batch, 8, device, gen)
    loc = torch.randn(batch, len(priors), 4, generator=gen).to(device).requires_grad_()
    logits = torch.randn(batch, len(priors), NUM_CLASSES, generator=gen).to(device).requires_grad_()

    def once() -> None:
        with torch.no_grad():
            targets = assign_targets(boxes, labels, mask, priors)
        multibox_loss(loc, logits, targets.loc_targets, targets.cls_targets).total.backward()

    return _timed_ms(once, device, args.steps)


def _timed_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return 1000 * (time.perf_counter() - start) / reps


def measure_eval(args, device: torch.device) -> dict:
    """Post-processing ms/image (8,732 x 21 for SSD300) and forward + post-processing images/s."""
    torch.manual_seed(0)
    model = build_ssd(args.preset, NUM_CLASSES).to(device).to(memory_format=torch.channels_last).eval()
    priors = model.priors().to(device)
    batch = args.loss_batch
    gen = torch.Generator().manual_seed(2)
    images = _random_batch(batch, model.image_size, device, gen)[0]
    sizes = torch.tensor([[500.0, 375.0]] * batch, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(normalize_images(images).contiguous(memory_format=torch.channels_last))
    loc, logits = out.loc.float(), out.cls_logits.float()
    logits[..., 0] += 4.0  # a partly trained model's confidence: a few hundred candidates per class pass 0.01
    post_ms = _timed_ms(lambda: postprocess(loc, logits, priors, sizes), device, max(args.steps // 2, 1))

    def forward_and_post() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            o = model(normalize_images(images).contiguous(memory_format=torch.channels_last))
        postprocess(o.loc.float(), o.cls_logits.float(), priors, sizes)

    eval_ms = _timed_ms(forward_and_post, device, max(args.steps // 2, 1))
    return {
        "priors": len(priors),
        "classes": NUM_CLASSES,
        "postprocess_ms_per_image": post_ms / batch,
        "eval_images_per_s": 1000 * batch / eval_ms,
    }


def measure_flops(args, device: torch.device, train: dict) -> dict:
    """Forward FLOPs per image (``FlopCounterMode``, torch >= 2.1), x3 for forward + backward, and the best
    compiled training rate as a fraction of the device's dense bf16 peak."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_ssd(args.preset, NUM_CLASSES).to(device).eval()  # eval: batch norm takes one image; same FLOPs
    x = torch.zeros(1, 3, model.image_size, model.image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    forward = counter.get_total_flops()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k.lower() in name.lower()), None)
    best = max((r["images_per_s"] for r in train.values() if isinstance(r, dict) and "images_per_s" in r), default=0)
    achieved = 3 * forward * best / 1e12
    return {
        "device_name": name,
        "forward_gflop_per_image": forward / 1e9,
        "train_gflop_per_image": 3 * forward / 1e9,
        "best_train_images_per_s": best,
        "achieved_tflops": achieved,
        "bf16_peak_tflops": peak,
        "fraction_of_bf16_peak": achieved / peak if peak else None,
        "images_per_s_at_peak": peak * 1e12 / (3 * forward) if peak else None,
    }


def correctness(args, device: torch.device) -> dict:
    """Loss and gradients of one fp32 batch of 2 on ``device`` against the CPU (TF32 off for the comparison)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cpu_model = build_ssd(args.preset, NUM_CLASSES).train()
    dev_model = build_ssd(args.preset, NUM_CLASSES).train()
    dev_model.load_state_dict(cpu_model.state_dict())
    dev_model.to(device)
    data = _random_batch(2, cpu_model.image_size, torch.device("cpu"), torch.Generator().manual_seed(3))
    results = []
    for model, dev in ((cpu_model, torch.device("cpu")), (dev_model, device)):
        loss = _loss(model, *(t.to(dev) for t in data), model.priors().to(dev), False)
        loss.backward()
        results.append((loss.item(), [p.grad.detach().cpu().double() for p in model.parameters()]))
    (cpu_loss, cpu_grads), (dev_loss, dev_grads) = results
    grad_error = max(
        float((a - b).norm() / max(float(a.norm()), 1e-12)) for a, b in zip(cpu_grads, dev_grads, strict=True)
    )
    loss_error = abs(dev_loss - cpu_loss) / max(abs(cpu_loss), 1e-12)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {
        "cpu_loss": cpu_loss,
        "device_loss": dev_loss,
        "loss_rel_error": loss_error,
        "max_grad_rel_error": grad_error,
        "passed": bool(loss_error < 1e-4 and grad_error < 1e-3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="ssd300_vgg16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, CUDA graph capture)")
    parser.add_argument("--loss-batch", type=int, default=32, help="batch of the loss and evaluation figures")
    parser.add_argument("--compile-backend", default="inductor", help="eager: dynamo only (the CPU smoke test)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="later sections are skipped past this")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    report: dict = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "preset": args.preset,
        "args": {k: str(v) for k, v in vars(args).items()},
        "train": {},
    }

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    def section(name: str, fn: Callable[[], object], into: dict | None = None) -> None:
        target = report if into is None else into
        if time.perf_counter() - started > args.budget_s:
            target[name] = "skipped: the 8-minute budget is spent"
        else:
            try:
                target[name] = fn()
            except Exception as error:  # one failing section must not lose the others' figures
                target[name] = f"failed: {type(error).__name__}: {str(error)[:500]}"
        print(name, json.dumps(target[name], default=str), flush=True)
        save()

    section("correctness", lambda: correctness(args, device))
    modes = ["eager", "compiled"] + (["compiled+cuda_graphs"] if device.type == "cuda" else [])
    for batch in args.batches:
        for mode in modes:
            section(f"batch{batch}_{mode}", lambda b=batch, m=mode: measure_train(args, device, b, m), report["train"])
    for batch in args.batches:
        eager, compiled = report["train"].get(f"batch{batch}_eager"), report["train"].get(f"batch{batch}_compiled")
        if isinstance(eager, dict) and isinstance(compiled, dict):
            report["train"][f"batch{batch}_compiled_over_eager"] = compiled["images_per_s"] / eager["images_per_s"]
    section("assign_loss_ms", lambda: measure_assign_loss(args, device))
    section("eval", lambda: measure_eval(args, device))
    section("flops", lambda: measure_flops(args, device, report["train"]))
    if not math.isfinite(report.get("elapsed_s", 0.0)):
        raise RuntimeError("elapsed time is not finite")
    return report


if __name__ == "__main__":
    main()
