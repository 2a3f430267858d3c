"""``train.compile`` on CPU (inductor): the same losses as eager over 20 steps, and a compiled run resumed from its
checkpoint ends bit-identical to an uninterrupted compiled run. ``train.cuda_graphs`` is refused off CUDA."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pipeline.config import ConfigError, load_params
from pipeline.training.compiled import build_step_functions
from pipeline.training.state import TrainState, build_model, build_state, find_resume_checkpoint
from pipeline.training.step import StepFunctions, step_loss, step_targets, train_step
from tests.pipeline.training.test_state import _job, _save
from tests.pipeline.training.tiny import tiny_batch

STEPS = 20


def _run(job, state: TrainState, until: int, functions: StepFunctions, twin: _EagerTwin | None = None) -> list[float]:
    """Steps with a different tiny batch each; returns the losses (read every step: this is a test). With an
    ``_EagerTwin``, each step is checked against an eager step from the same state."""
    priors, losses = state.model.priors(), []
    skips = state.device_skips()
    while state.step < until:
        batch = tiny_batch(state.model.image_size, seed=state.step)
        eager = twin.step(state, batch) if twin is not None else None
        torch.manual_seed(state.step)
        grads = _Gradients(state.model)
        result = train_step(
            state.model,
            batch,
            priors,
            state.optimizer,
            cfg=job.params.train,
            skips=skips,
            functions=functions,
            observer=grads,
        )
        stats = result.read()
        if twin is not None:
            twin.compare(eager, stats.loss, grads.flat)
        state.end_step(stats.finite)
        losses.append(stats.loss)
    return losses


class _Gradients:
    """An update observer that keeps the step's final gradients, flattened into one vector."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.flat = model, None

    def before_update(self, grad_norm: torch.Tensor) -> None:
        self.flat = torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None])

    def after_update(self) -> None:
        pass


class _EagerTwin:
    """Before each compiled step, an eager copy of the model and optimiser at the same weights and moments takes
    the same batch: the compiled step must give its loss and its gradients.

    A comparison per step, not of two 20-step trajectories: AdamW's update of a parameter whose gradient is
    near zero is near ``lr * sign(grad)``, so float-level differences (inductor fuses and reorders) grow into
    different weights within a few steps whatever the compiler's accuracy."""

    GRAD_RTOL = 2e-2  # relative L2 difference of the gradient vector; measured up to 0.45% for inductor
    # (hard negative mining swaps near-tied negatives, which moves gradient between priors), 0 for aot_eager

    def __init__(self, job) -> None:
        self.job, self.worst = job, 0.0

    def step(self, state: TrainState, batch):
        twin = build_state(self.job, build_model(self.job, None), 1, None)
        twin.model.load_state_dict(state.model.state_dict())
        # a copy: load_state_dict keeps tensors that already have the right dtype and device, so the twin's
        # step would move the compiled run's moments too
        twin.optimizer.load_state_dict(copy.deepcopy(state.optimizer.state_dict()))
        torch.manual_seed(state.step)
        grads = _Gradients(twin.model)
        stats = train_step(
            twin.model, batch, twin.model.priors(), twin.optimizer, cfg=self.job.params.train, observer=grads
        ).read()
        return stats.loss, grads.flat

    def compare(self, eager, loss: float, flat: torch.Tensor) -> None:
        eager_loss, eager_flat = eager
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        difference = float((flat - eager_flat).norm() / eager_flat.norm())
        self.worst = max(self.worst, difference)
        assert difference < self.GRAD_RTOL, f"gradients differ by {difference:.2%} (relative L2)"


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_steps_match_eager_and_resume_exactly(tmp_path, backend):
    """``aot_eager`` traces forward and backward as inductor does, without code generation; ``inductor`` is what
    ``train.compile`` runs. Over 20 compiled steps each step's loss and gradients equal an eager step's from the
    same state, the run trains, and a run resumed from its checkpoint ends bit-identical to a straight one."""
    job = _job(tmp_path)
    cfg = dataclasses.replace(job.params.train, compile=True, max_steps=STEPS)
    job = dataclasses.replace(job, params=dataclasses.replace(job.params, train=cfg))
    torch._dynamo.reset()
    compiled = build_step_functions(cfg, torch.device("cpu"), backend=backend)
    assert compiled.targets is step_targets and compiled.loss is not step_loss  # a CPU reads back for free
    assert build_step_functions(cfg, torch.device("cuda"), backend=backend).targets is not step_targets

    straight = build_state(job, build_model(job, None), 1, None)
    twin = _EagerTwin(job)
    fused = _run(job, straight, STEPS, compiled, twin)
    assert fused[-1] < 0.8 * fused[0]  # and it trains
    if backend == "aot_eager":
        assert twin.worst == 0.0  # no code generation: the same kernels as eager

    first = build_state(job, build_model(job, None), 1, None)
    assert _run(job, first, 7, compiled) == fused[:7]
    _save(job, first)
    resumed = find_resume_checkpoint(job, None, world=1)
    second = build_state(job, build_model(job, resumed), 1, resumed)
    assert _run(job, second, STEPS, build_step_functions(cfg, torch.device("cpu"), backend=backend)) == fused[7:]
    expected, got = straight.model.state_dict(), second.model.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


def test_cuda_graphs_are_refused_without_cuda(tmp_path):
    cfg = dataclasses.replace(_job(tmp_path).params.train, compile=True, cuda_graphs=True, use_gpu=True)
    with pytest.raises(RuntimeError, match=r"train.cuda_graphs: true needs CUDA, but this rank trains on 'cpu'"):
        build_step_functions(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.cuda_graphs: needs train.compile: true and train.use_gpu: true"):
        load_params(overrides=["train.cuda_graphs=true", "train.compile=true"])
    with pytest.raises(ConfigError, match=r"train.cuda_graphs: needs train.compile: true"):
        load_params(overrides=["train.cuda_graphs=true", "train.use_gpu=true"])
    eager = build_step_functions(dataclasses.replace(cfg, compile=False, cuda_graphs=False), torch.device("cpu"))
    assert eager == StepFunctions()


def test_max_boxes_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"train.max_boxes"):
        load_params(overrides=["train.max_boxes=0"])
    assert load_params(overrides=["train.max_boxes=7"]).train.max_boxes == 7
