"""The optimiser (SGD as in the SSD paper, or AdamW), the rate scaled with the global batch, warm-up, decay.

The schedule is a pure function of the optimiser step (``lr_factor``), so a resumed run continues the
curve exactly where the checkpoint left it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig, milestones_problem

# Warm-up starts at this fraction of the target rate: SSD's first iterations at full rate blow up the
# loss on random heads (the paper's VOC schedule has no warm-up but a lower rate of 1e-3 for 40k steps).
WARMUP_START_FACTOR = 0.001


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``base_lr`` is right for ``reference_batch`` images per step."""
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"scaled_lr: batch sizes must be >= 1, got global {global_batch}, reference {reference_batch}")
    return base_lr * global_batch / reference_batch


def check_schedule(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the key when the schedule cannot run as configured."""
    problem = milestones_problem(cfg) if cfg.schedule == "multistep" else None
    if problem:
        raise ValueError(problem)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the scaled rate for the optimiser step that follows ``step`` completed steps."""
    if step < cfg.warmup_steps:
        return WARMUP_START_FACTOR + (1.0 - WARMUP_START_FACTOR) * step / cfg.warmup_steps
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(1 for m in cfg.milestones if step >= m)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over two groups: weights are decayed, biases and norm scales are not. The rate is
    ``cfg.lr`` scaled from ``cfg.lr_reference_batch`` to the global batch ``cfg.batch_size``, whatever the
    number of workers (which may change during an elastic run).

    - ``sgd``: momentum ``cfg.momentum`` and L2 decay ``cfg.weight_decay`` (the paper).
    - ``adamw``: betas ``(cfg.momentum, 0.999)`` and decoupled decay ``cfg.weight_decay`` (Loshchilov &
      Hutter); trains small randomly initialised models much faster than SGD at the paper's rates.

    The original Caffe SSD sets ``decay_mult: 0`` on biases; decaying BatchNorm/L2Norm scales only pulls
    them towards zero without regularising anything.

    Parameters named by a ``cfg.freeze`` prefix go into two more groups marked ``"frozen"``, which
    ``build_scheduler`` holds at rate 0 until ``cfg.unfreeze_at_step``. Their gradients are still computed
    (and count in the clipped norm) and batch-norm statistics still update: freezing keeps the weights, it
    saves no compute. (One set of groups for all ranks keeps DDP's parameter set fixed across the unfreeze.)
    """
    groups = [
        {"params": [], "weight_decay": cfg.weight_decay, "frozen": False},
        {"params": [], "weight_decay": 0.0, "frozen": False},
        {"params": [], "weight_decay": cfg.weight_decay, "frozen": True},
        {"params": [], "weight_decay": 0.0, "frozen": True},
    ]
    for name, param in model.named_parameters():
        if param.requires_grad:
            frozen = any(name.startswith(prefix) for prefix in cfg.freeze)
            groups[2 * frozen + (param.ndim <= 1)]["params"].append(param)
    groups = [group for group in groups if group["params"] or not group["frozen"]]  # no frozen groups: as before
    lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_reference_batch)  # batch_size is the global batch
    # One fused kernel per step instead of several passes over every tensor (benchmarks/README.md).
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999), fused=True)
    if cfg.optimizer == "sgd":
        sgd = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
        if cfg.momentum:  # zero buffers: a first step skipped through found_inf would leave empty_like ones
            for param in (p for group in groups for p in group["params"]):  # 0 * momentum + g == g: unchanged
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return sgd
    raise ValueError(f"train.optimizer: expected 'sgd' or 'adamw', got {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: call ``scheduler.step()`` once after every optimiser step (skipped ones too).

    The groups of ``train.freeze`` parameters (``"frozen"``) run at rate 0 until ``train.unfreeze_at_step``
    (always, when it is 0), then follow the schedule: an SGD or AdamW step at rate 0 changes nothing, weight
    decay included.
    """
    check_schedule(cfg)

    def frozen_factor(step: int) -> float:
        return lr_factor(step, cfg) if 0 < cfg.unfreeze_at_step <= step else 0.0

    factors = [
        frozen_factor if group.get("frozen") else (lambda step: lr_factor(step, cfg))
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
