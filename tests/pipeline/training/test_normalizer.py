"""The global loss normaliser: one worker on 2B images and two workers on B each train on the same gradient.

The two-worker side is a real gloo process group of two spawned processes, each running ``train_step`` on its
share under real DDP; the gradients are read where the step hands them to the optimiser (``UpdateObserver``).
The model is a small convolutional head without batch norm (whose per-rank statistics would make the forward
pass depend on the split, see ``pipeline.training.normalizer``).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.shards.loader import TrainBatch
from pipeline.training.normalizer import global_denominator
from pipeline.training.optim import build_optimizer
from pipeline.training.step import train_step
from ssd_core.model import SSDOutput

NUM_CLASSES = 3  # background + 2
SIZE = 32
CFG = TrainConfig(lr=0.01, batch_size=4, lr_reference_batch=4, grad_clip_norm=0.0, optimizer="sgd")


class _Head(nn.Module):
    """Images ``[B, 3, 32, 32]`` -> loc ``[B, 16, 4]`` and class logits ``[B, 16, C]``, one per 4 x 4 grid cell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.out = nn.Conv2d(8, 4 + NUM_CLASSES, 3, padding=1)

    def forward(self, images: torch.Tensor) -> SSDOutput:
        y = F.adaptive_avg_pool2d(self.out(torch.relu(self.conv(images))), 4)  # [B, 4 + C, 4, 4]
        y = y.flatten(2).transpose(1, 2)  # [B, 16, 4 + C]
        return SSDOutput(y[..., :4].contiguous(), y[..., 4:].contiguous())


def _priors() -> torch.Tensor:
    """The 16 grid cells as cxcywh priors ``[16, 4]``, row-major like the head's output."""
    centres = (torch.arange(4, dtype=torch.float32) + 0.5) / 4
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([cx.reshape(-1), cy.reshape(-1), torch.full((16,), 0.25), torch.full((16,), 0.25)], dim=1)


def _model() -> _Head:
    torch.manual_seed(0)
    return _Head()


def _batch() -> TrainBatch:
    """Four images with 1, 1, 3 and 2 boxes (cell-aligned, so each matches one prior): the halves [0:2] and
    [2:4] have 2 and 5 positives, so the mean of per-half ratios differs from the global ratio."""
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    cell = [[0.0, 0.0, 0.25, 0.25], [0.5, 0.25, 0.75, 0.5], [0.25, 0.75, 0.5, 1.0]]
    counts, labels = [1, 1, 3, 2], [[1, 0, 0], [2, 0, 0], [1, 2, 2], [2, 1, 0]]
    boxes = torch.zeros(4, 3, 4)
    for b, n in enumerate(counts):
        boxes[b, :n] = torch.tensor(cell[:n])
    mask = torch.arange(3)[None, :] < torch.tensor(counts)[:, None]  # [B, G]
    return TrainBatch(images, boxes, torch.tensor(labels), torch.zeros(4, 3, dtype=torch.bool), mask, num_bad=0)


def _share(batch: TrainBatch, start: int, stop: int) -> TrainBatch:
    return TrainBatch(*(t[start:stop] for t in batch[:5]), num_bad=0)


class _Gradients:
    """An ``UpdateObserver`` that keeps the gradients the optimiser is about to apply."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.grads = model, {}

    def before_update(self, grad_norm: torch.Tensor) -> None:
        del grad_norm
        self.grads = {name: w.grad.detach().clone() for name, w in self.model.named_parameters()}

    def after_update(self) -> None:
        pass


def _step(model: nn.Module, batch: TrainBatch, cfg: TrainConfig, wrapped: nn.Module | None = None, **collectives):
    observer = _Gradients(model)
    stats = train_step(
        wrapped or model, batch, _priors(), build_optimizer(model, cfg), cfg=cfg, observer=observer, **collectives
    ).read()
    return stats.loss, observer.grads


def _local_only(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The old normaliser: this rank's own count, as if alone (DDP still averages the gradients)."""
    return values, 1


SCENARIOS = {  # name: (split point of the 4 images, loss_normalize, normaliser collective)
    "halves": (2, "batch", None),
    "halves-own-N": (2, "batch", _local_only),
    "uneven": (1, "batch", None),
    "uneven-per-image": (1, "per_image", None),
}


def _worker(rank: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for name, (split, normalize, counts) in SCENARIOS.items():
            cfg = TrainConfig(**{**CFG.__dict__, "loss_normalize": normalize})
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            share = _share(_batch(), 0, split) if rank == 0 else _share(_batch(), split, 4)
            extra = {"sum_counts": counts} if counts else {}
            results[name] = _step(model, share, cfg, ddp, **extra)
        out[rank] = results
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_workers() -> dict:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    results = dict(out)
    manager.shutdown()
    return results


def _reference(normalize: str):
    cfg = TrainConfig(**{**CFG.__dict__, "loss_normalize": normalize})
    return _step(_model(), _batch(), cfg)


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["halves", "uneven", "uneven-per-image"])
def test_two_workers_on_shares_train_on_the_one_worker_gradient(two_workers, scenario):
    loss, grads = _reference(SCENARIOS[scenario][1])
    assert grads and any(g.abs().max() > 0 for g in grads.values())
    for rank in (0, 1):
        rank_loss, rank_grads = two_workers[rank][scenario]
        assert _close(rank_grads, grads), f"rank {rank}: gradients differ from the one-worker step"
        assert rank_loss == pytest.approx(loss, rel=1e-5)  # the logged loss is the global batch's too


@pytest.mark.slow
def test_dividing_by_each_rank_s_own_count_gives_another_gradient(two_workers):
    """What the step did before: each rank over its own N, then DDP's mean.

    1/2 (S_0 / 2 + S_1 / 5) is not (S_0 + S_1) / 7."""
    _, grads = _reference("batch")
    own = two_workers[0]["halves-own-N"][1]
    assert _close(own, two_workers[1]["halves-own-N"][1])  # DDP still agrees across ranks ...
    assert not _close(own, grads)  # ... on the wrong objective


def test_the_denominator_is_the_global_count_over_the_world_size():
    targets = torch.tensor([[1, 0, -1, 2], [0, 0, 0, 0], [3, 3, 0, 0]])  # [B=3, P=4]: 4 positives
    other_rank = torch.tensor([9.0], dtype=torch.float64)  # the other rank's count

    def two_ranks(values):
        return values + other_rank, 2

    assert global_denominator(targets, normalize="batch", sum_counts=two_ranks).item() == (4 + 9) / 2
    assert global_denominator(targets, normalize="per_image", sum_counts=two_ranks).item() == (3 + 9) / 2
    alone = global_denominator(targets, normalize="batch")  # no process group: this rank is the world
    assert alone.dtype == torch.float32 and alone.ndim == 0 and alone.item() == 4.0
    nothing = torch.zeros(2, 4, dtype=torch.int64)
    assert global_denominator(nothing, normalize="batch").item() == 1.0  # N = 0 divides by 1, never by 0
    with pytest.raises(ValueError, match="normalize must be"):
        global_denominator(targets, normalize="image")
