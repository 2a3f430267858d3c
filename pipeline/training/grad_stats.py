"""Per-layer gradient statistics for MLflow: how each layer's gradients and updates evolve.

A "layer" is a module that owns parameters (``backbone.conv4_3`` = its weight and bias together); the
``module.`` prefix of DDP and ``_orig_mod.`` of ``torch.compile`` are dropped from the names. For each layer:

==============  ==========================================================================
norm            L2 norm of the gradient over all the layer's parameters
mean, std       mean and population standard deviation of the gradient elements
max_abs         largest absolute gradient element
weight_norm     L2 norm of the weights before the optimiser step
update_ratio    ||w_after - w_before|| / ||w_before||: the relative size of the step (the
                usual rule of thumb puts a healthy value near 1e-3)
==============  ==========================================================================

Use it on the steps where statistics are due (``is_due(step)``), on the rank that logs::

    loss.backward()
    if grad_stats.is_due(step):
        grad_stats.before_step()           # gradients final (after unscale/clip), weights not yet updated
    optimizer.step()
    if grad_stats.is_due(step):
        tracker.log_metrics(grad_stats.after_step(step), step)   # one dict -> one batched request

All statistics of one call are reduced on the parameters' device and copied to the host once.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.artifacts.atomic_write import write_csv_atomic
from pipeline.tracking import legal_metric_name

STAT_NAMES = ("norm", "mean", "std", "max_abs", "weight_norm", "update_ratio")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EPS = 1e-12


class GradStatsRow(NamedTuple):
    """One layer at one step (a row of the per-epoch table)."""

    step: int
    layer: str
    norm: float
    mean: float
    std: float
    max_abs: float
    weight_norm: float
    update_ratio: float


def layer_name(parameter_name: str) -> str:
    """``module.backbone.conv1.weight`` -> ``backbone.conv1``; a parameter owned by the root keeps its name."""
    name = parameter_name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name.rsplit(".", 1)[0] if "." in name else name


class GradStats:
    """Collects per-layer statistics of ``model`` (see module docstring).

    Args:
        model: the module being trained (a DDP wrapper is fine).
        every: statistics interval in steps (``tracking.grad_stats_every``); 0 turns ``is_due`` off.
        prefix: metric name prefix.
    """

    def __init__(self, model: nn.Module, *, every: int = 0, prefix: str = "grad"):
        if every < 0:
            raise ValueError(f"GradStats: every must be >= 0 (0: off), got {every}")
        self.every = every
        self.prefix = prefix
        layers: dict[str, list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                layers.setdefault(layer_name(name), []).append(parameter)
        if not layers:
            raise ValueError("GradStats: the model has no trainable parameters")
        self.layers = list(layers)
        self._params = [layers[name] for name in self.layers]
        self._before: list[list[torch.Tensor]] | None = None
        self._pending: torch.Tensor | None = None  # [L, 5] grad stats + weight norm of the current step
        self._calls = 0
        self.table_rows: list[GradStatsRow] = []

    def is_due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Record gradient statistics and weight norms, and keep a copy of the weights (for the update ratio)."""
        rows = []
        for params in self._params:
            device = params[0].device
            count = sum(p.numel() for p in params)
            sum_g = torch.zeros((), device=device, dtype=torch.float64)
            sum_sq = torch.zeros((), device=device, dtype=torch.float64)
            max_abs = torch.zeros((), device=device, dtype=torch.float64)
            weight_sq = torch.zeros((), device=device, dtype=torch.float64)
            for p in params:
                weight_sq += p.detach().double().square().sum()
                if p.grad is None:  # no gradient this step: counts as zeros
                    continue
                g = p.grad.detach().double()
                sum_g += g.sum()
                sum_sq += g.square().sum()
                max_abs = torch.maximum(max_abs, g.abs().max())
            mean = sum_g / count
            variance = torch.clamp(sum_sq / count - mean.square(), min=0.0)
            rows.append(torch.stack([sum_sq.sqrt(), mean, variance.sqrt(), max_abs, weight_sq.sqrt()]))
        self._pending = torch.stack([r.to(rows[0].device) for r in rows]).cpu()  # [L, 5], one copy to the host
        self._before = [[p.detach().clone() for p in params] for params in self._params]

    @torch.no_grad()
    def after_step(self, step: int | None = None) -> dict[str, float]:
        """Update ratios from the weights now vs. at ``before_step``; return every statistic as metrics
        ``{"grad/<layer>/<stat>": value}`` (MLflow-legal names) and append the rows to ``table_rows``."""
        if self._pending is None or self._before is None:
            raise RuntimeError("GradStats.after_step() called without before_step() on this step")
        self._calls += 1
        if step is None:
            step = self._calls * self.every if self.every else self._calls
        deltas = []
        for params, before in zip(self._params, self._before, strict=True):
            pairs = zip(params, before, strict=True)
            deltas.append(sum((p.detach().double() - b.double()).square().sum() for p, b in pairs).sqrt())
        stats = self._pending.tolist()
        delta = torch.stack([d.to(deltas[0].device) for d in deltas]).cpu().tolist()  # [L]
        self._pending, self._before = None, None
        metrics: dict[str, float] = {}
        for layer, (norm, mean, std, max_abs, weight_norm), d in zip(self.layers, stats, delta, strict=True):
            ratio = d / max(weight_norm, _EPS)
            row = GradStatsRow(int(step), layer, norm, mean, std, max_abs, weight_norm, ratio)
            self.table_rows.append(row)
            base = legal_metric_name(f"{self.prefix}/{layer}")
            for stat in STAT_NAMES:
                metrics[f"{base}/{stat}"] = getattr(row, stat)
        return metrics

    def norm_history(self) -> tuple[list[int], list[str], np.ndarray]:
        """(steps [S], layers [L], gradient norms [L, S]) from ``table_rows`` (NaN where missing)."""
        steps = sorted({row.step for row in self.table_rows})
        column = {s: i for i, s in enumerate(steps)}
        index = {name: i for i, name in enumerate(self.layers)}
        values = np.full((len(self.layers), len(steps)), np.nan)
        for row in self.table_rows:
            values[index[row.layer], column[row.step]] = row.norm
        return steps, list(self.layers), values

    def write_epoch_artifacts(self, folder: str | Path, epoch: int) -> list[Path]:
        """Write ``grad_stats_epoch<E>.csv`` (the full per-layer table so far) and
        ``grad_norm_heatmap_epoch<E>.png`` into ``folder``; returns the paths (log them with the tracker)."""
        from pipeline.report.plots import grad_norm_heatmap_png

        folder = Path(folder)
        table = folder / f"grad_stats_epoch{epoch:03d}.csv"
        write_csv_atomic(table, GradStatsRow._fields, self.table_rows)
        paths = [table]
        if self.table_rows:
            steps, layers, values = self.norm_history()
            heatmap = folder / f"grad_norm_heatmap_epoch{epoch:03d}.png"
            grad_norm_heatmap_png(steps, layers, values, heatmap, title=f"gradient L2 norm by layer (epoch {epoch})")
            paths.append(heatmap)
        return paths
