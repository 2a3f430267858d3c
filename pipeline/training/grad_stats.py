"""Per-layer gradient statistics: three summary metrics per due step, every layer's values in one table.

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

The table's gradients are the ones the optimiser applies: after unscaling and clipping (``train.grad_clip_norm``);
``grad_norm`` is their total norm before clipping, the value the clip compares (above the clip, the layers'
norms add up to the clip, not to ``grad_norm``).

What reaches MLflow (``GradSummary``, ``write_artifacts``):

* metrics, every ``tracking.grad_stats_every`` steps: ``grad_norm`` (the global L2 norm before clipping),
  ``grad_max_update_ratio`` (the largest ``update_ratio``) and ``grad_max_update_layer`` (that layer's
  ``layer_index`` in the table; the training loop also sets its name as the run tag of the same key). The keys
  have no ``/``: MLflow 3's UI puts such keys in its "Model metrics" section, which it shows after the sections
  of prefixed keys (those sorted by name: ``train``, ``val``, ``val/best``, ...), so the first screen of a run
  shows the losses, not gradient diagnostics.
* ``grad_stats.csv``: one row per layer per due step, the whole run, newest step first (MLflow's CSV preview
  shows the first 500 rows); ``grad_norm_heatmap.png``: gradient norm by layer (rows) and step (columns). Both
  are rewritten under the same names, so a run has one of each, plus at most ``len(SNAPSHOT_FRACTIONS)``
  heatmaps frozen at fixed fractions of ``train.max_steps`` (``snapshots/grad_norm_heatmap_step<N>.png``).

The history behind the table travels in the checkpoint (``state_dict``), so a resumed run's table and heatmap
still start at the run's first step. Use on the steps where statistics are due, on the rank that logs::

    loss.backward()
    if grad_stats.is_due(step):
        grad_stats.before_step(grad_norm)  # gradients final (after unscale/clip), weights not yet updated
    optimizer.step()
    if grad_stats.is_due(step):
        tracker.log_metrics(grad_stats.after_step(step).metrics(), step)

All statistics of one call are reduced on the parameters' device and copied to the host once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.artifacts.atomic_write import write_csv_atomic
from pipeline.tracking import GRAD_METRIC_PREFIX

STAT_NAMES = ("norm", "mean", "std", "max_abs", "weight_norm", "update_ratio")
NORM_KEY = f"{GRAD_METRIC_PREFIX}norm"
MAX_RATIO_KEY = f"{GRAD_METRIC_PREFIX}max_update_ratio"
MAX_LAYER_KEY = f"{GRAD_METRIC_PREFIX}max_update_layer"  # a metric (layer_index) and a run tag (the name)
SUMMARY_KEYS = (NORM_KEY, MAX_RATIO_KEY, MAX_LAYER_KEY)
ARTIFACT_FOLDER = "grad_stats"  # in the run's artifacts
TABLE_NAME = "grad_stats.csv"
HEATMAP_NAME = "grad_norm_heatmap.png"
SNAPSHOT_FOLDER = "snapshots"
SNAPSHOT_FRACTIONS = (0.25, 0.5, 0.75)  # of train.max_steps; the end of the run is the heatmap itself
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EPS = 1e-12


class GradStatsRow(NamedTuple):
    """One layer at one step (a row of the table)."""

    step: int
    layer_index: int  # position in ``GradStats.layers`` (the model's parameter order)
    layer: str
    norm: float
    mean: float
    std: float
    max_abs: float
    weight_norm: float
    update_ratio: float


class GradSummary(NamedTuple):
    """What one due step logs as metrics."""

    global_norm: float  # the total gradient norm before clipping (the applied gradients': sqrt(sum of norm^2))
    max_update_ratio: float
    max_update_layer: int  # layer_index of the layer with the largest update ratio

    def metrics(self) -> dict[str, float]:
        """``SUMMARY_KEYS`` -> values, for ``Tracker.log_metrics``."""
        return {
            NORM_KEY: self.global_norm,
            MAX_RATIO_KEY: self.max_update_ratio,
            MAX_LAYER_KEY: float(self.max_update_layer),
        }


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
    """Collects per-layer statistics of ``model`` (see module docstring) and keeps them for the table.

    Args:
        model: the module being trained (a DDP wrapper is fine).
        every: statistics interval in steps (``tracking.grad_stats_every``); 0 turns ``is_due`` off.
        max_steps: the run's length (``train.max_steps``), which places the heatmap snapshots; None: none.
    """

    def __init__(self, model: nn.Module, *, every: int = 0, max_steps: int | None = None):
        if every < 0:
            raise ValueError(f"GradStats: every must be >= 0 (0: off), got {every}")
        self.every = every
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
        self._pending_norm = 0.0  # its global gradient norm
        self._steps: list[int] = []  # the due steps recorded, ascending
        self._values: list[np.ndarray] = []  # one [L, len(STAT_NAMES)] float64 per recorded step
        self._max_steps = max_steps
        self._snapshot_at = sorted({max(1, math.ceil(f * max_steps)) for f in SNAPSHOT_FRACTIONS}) if max_steps else []
        self._snapshots: set[int] = set()  # last steps of the snapshots written
        self._rows_written = 0  # steps in the table last written by this process

    def is_due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def before_step(self, grad_norm: torch.Tensor | float | None = None) -> None:
        """Record gradient statistics and weight norms, and keep a copy of the weights (for the update ratio).
        ``grad_norm``: the total gradient norm before clipping (``train_step`` hands it over), the summary's
        ``global_norm``; None: the norm of the gradients as they are."""
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
        stats = torch.stack([r.to(rows[0].device) for r in rows])  # [L, 5]
        total = stats[:, 0].square().sum().sqrt() if grad_norm is None else torch.as_tensor(grad_norm)
        packed = torch.cat([stats.flatten(), total.to(stats).reshape(1)]).cpu()  # one copy to the host
        self._pending, self._pending_norm = packed[:-1].reshape(stats.shape), float(packed[-1])
        self._before = [[p.detach().clone() for p in params] for params in self._params]

    @torch.no_grad()
    def after_step(self, step: int) -> GradSummary:
        """Update ratios from the weights now vs. at ``before_step``; keep every layer's statistics for the
        table at ``step`` and return the step's summary."""
        if self._pending is None or self._before is None:
            raise RuntimeError("GradStats.after_step() called without before_step() on this step")
        if self._steps and step <= self._steps[-1]:
            raise ValueError(f"GradStats.after_step: steps must increase, got {step} after {self._steps[-1]}")
        deltas = []
        for params, before in zip(self._params, self._before, strict=True):
            pairs = zip(params, before, strict=True)
            deltas.append(sum((p.detach().double() - b.double()).square().sum() for p, b in pairs).sqrt())
        delta = torch.stack([d.to(deltas[0].device) for d in deltas]).cpu().numpy()  # [L]
        stats = self._pending.numpy()  # [L, 5]
        self._pending, self._before = None, None
        ratio = delta / np.maximum(stats[:, 4], _EPS)  # [L]
        self._steps.append(int(step))
        self._values.append(np.concatenate([stats, ratio[:, None]], axis=1))  # [L, 6] in STAT_NAMES order
        top = int(np.argmax(ratio))
        return GradSummary(self._pending_norm, float(ratio[top]), top)

    @property
    def table_rows(self) -> list[GradStatsRow]:
        """Every recorded layer statistic, steps ascending, layers in model order."""
        return [
            GradStatsRow(step, index, layer, *map(float, values[index]))
            for step, values in zip(self._steps, self._values, strict=True)
            for index, layer in enumerate(self.layers)
        ]

    def norm_history(self, up_to: int | None = None) -> tuple[list[int], list[str], np.ndarray]:
        """(steps [S], layers [L], gradient norms [L, S]) of the recorded steps (those <= ``up_to`` if given)."""
        count = len(self._steps) if up_to is None else int(np.searchsorted(self._steps, up_to, side="right"))
        values = np.stack([v[:, 0] for v in self._values[:count]], axis=1) if count else np.zeros((len(self.layers), 0))
        return self._steps[:count], list(self.layers), values

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The recorded history and snapshots written, as tensors and lists (``torch.load(weights_only=True)``)."""
        values = np.stack(self._values) if self._values else np.zeros((0, len(self.layers), len(STAT_NAMES)))
        return {
            "layers": list(self.layers),
            "steps": torch.tensor(self._steps, dtype=torch.int64),  # [S]
            "values": torch.from_numpy(values.astype(np.float64)),  # [S, L, 6]
            "snapshots": sorted(self._snapshots),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the history of ``state_dict()`` (of the same model's layers)."""
        if list(state["layers"]) != self.layers:
            raise ValueError(
                f"GradStats: the checkpoint's gradient statistics are for layers {list(state['layers'])}, "
                f"this model has {self.layers}"
            )
        values = state["values"].double().numpy()  # [S, L, 6]
        if values.shape != (len(state["steps"]), len(self.layers), len(STAT_NAMES)):
            raise ValueError(f"GradStats: checkpoint values of shape {tuple(values.shape)} do not match its steps")
        self._steps = [int(s) for s in state["steps"]]
        self._values = [row.copy() for row in values]
        self._snapshots = {int(s) for s in state["snapshots"]}
        self._rows_written = 0

    # ---------------------------------------------------------------- artifacts
    @property
    def has_unwritten_rows(self) -> bool:
        """Whether steps were recorded since ``write_artifacts`` last wrote the table in this process."""
        return len(self._steps) > self._rows_written

    def write_artifacts(self, folder: str | Path) -> list[tuple[Path, str]]:
        """Write the table, the heatmap and any snapshot now due into ``folder``; returns ``(file, artifact
        folder)`` pairs to log with the tracker (the same names each time: MLflow keeps the newest)."""
        folder = Path(folder)
        rows = sorted(self.table_rows, key=lambda row: (-row.step, row.layer_index))  # newest step first
        write_csv_atomic(folder / TABLE_NAME, GradStatsRow._fields, rows)
        written = [(folder / TABLE_NAME, ARTIFACT_FOLDER)]
        self._rows_written = len(self._steps)
        if not self._steps:
            return written
        written.append((self._heatmap(folder / HEATMAP_NAME, up_to=None), ARTIFACT_FOLDER))
        for threshold in self._snapshot_at:  # ascending
            if threshold > self._steps[-1]:
                break
            count = int(np.searchsorted(self._steps, threshold, side="right"))  # steps <= threshold
            if count == 0 or self._steps[count - 1] in self._snapshots:
                continue
            last = self._steps[count - 1]
            path = folder / SNAPSHOT_FOLDER / f"grad_norm_heatmap_step{last:06d}.png"
            written.append((self._heatmap(path, up_to=threshold), f"{ARTIFACT_FOLDER}/{SNAPSHOT_FOLDER}"))
            self._snapshots.add(last)
        return written

    def _heatmap(self, path: Path, up_to: int | None) -> Path:
        from pipeline.report.plots import grad_norm_heatmap_png

        steps, layers, values = self.norm_history(up_to)
        labels = [f"{index} {name}" for index, name in enumerate(layers)]  # layer_index, as in the table
        kind = "" if up_to is None else f", snapshot at {up_to} of {self._max_steps}"
        title = f"gradient L2 norm by layer\nsteps {steps[0]}-{steps[-1]}{kind}"
        return grad_norm_heatmap_png(steps, labels, values, path, title=title)
