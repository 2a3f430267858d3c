"""``train.compile`` and ``train.cuda_graphs``: the step's target assignment (``step.step_targets``) and its loss
function (``step.step_loss``: normalisation, the model's forward pass, the MultiBox loss) compiled with
``torch.compile`` (inductor). The all-reduce of the loss normaliser runs eagerly between the two.

Under ``torch.compile`` target assignment and the loss take their static-shape forms
(``ssd_core.static_matching``), so the whole function traces without a host read, and with ground truth
padded to ``train.max_boxes`` its shapes are the same every step: one compilation serves the run (a
batch made shorter by a corrupt sample compiles once more for its own shape). The backward pass is
compiled with it (AOTAutograd). The optimiser step, the clip and the collective stay eager.

On a CPU target assignment stays eager: there a host read costs nothing, and the packed form
(``ssd_core.matching``) is ~40x faster than even the compiled static one (7 ms against 270 ms for
``ssd300_vgg16`` priors at batch 16 x 100 boxes: the static form's ``[B, P, G]`` tables and its ``G``
forced-match rounds are the price of never reading back, which only an accelerator needs).

``train.cuda_graphs`` compiles with ``mode="reduce-overhead"``: inductor records the forward and backward
kernels into CUDA graphs and replays them, which removes the per-kernel launch cost that dominates small
kernels at high step rates. CUDA graphs exist only on CUDA devices: it is refused at load time without
``train.use_gpu`` and at training start on any other device.
"""

from __future__ import annotations

import torch

from pipeline.config import TrainConfig
from pipeline.training.step import StepFunctions, step_loss, step_targets


def build_step_functions(cfg: TrainConfig, device: torch.device, *, backend: str = "inductor") -> StepFunctions:
    """``step_targets`` and ``step_loss``, compiled when ``cfg.compile`` (with CUDA graphs when
    ``cfg.cuda_graphs``). ``backend``: ``torch.compile``'s (tests use ``aot_eager``: the same tracing of forward
    and backward, without generating code).

    Raises:
        RuntimeError: ``train.cuda_graphs`` on a device that is not CUDA.
    """
    if cfg.cuda_graphs and device.type != "cuda":
        raise RuntimeError(
            f"train.cuda_graphs: true needs CUDA, but this rank trains on {device.type!r}: "
            "set train.cuda_graphs: false (or train on GPUs with train.use_gpu: true)"
        )
    if not cfg.compile:
        return StepFunctions()
    options = {"mode": "reduce-overhead"} if cfg.cuda_graphs else {}
    targets = step_targets
    if device.type != "cpu":
        targets = torch.compile(step_targets, backend=backend, dynamic=False, **options)
    return StepFunctions(targets=targets, loss=torch.compile(step_loss, backend=backend, dynamic=False, **options))
