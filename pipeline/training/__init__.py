"""Distributed SSD training with Ray Train: one module per job.

- ``job``: ``TrainJob``, what the driver hands the workers; the run identity that names the run folder.
- ``code_closure``: the source files a run executes (its import closure), hashed into the run identity.
- ``ray_runtime``: join a Ray cluster or start a private one (``train`` and ``predict --ray``).
- ``launcher``: join or start Ray, prepare the run folder, build and run the ``TorchTrainer``.
- ``loop``: ``train_loop_per_worker``, what every DDP rank runs: the Ray calls, the step loop, reports.
- ``step``: ``train_step``, one optimiser step on one batch (no Ray; runnable alone in a test), no host read.
- ``compiled``: ``train.compile`` / ``train.cuda_graphs``: the step's target assignment and loss compiled.
- ``state``: ``TrainState`` (what a checkpoint restores), built fresh or from the newest valid checkpoint.
- ``step_log``: per-step bookkeeping: progress, step metrics, gradient statistics, epoch artifacts.
- ``progress``: rank 0's progress lines and per-step metrics.
- ``optim``: SGD, learning-rate scaling with the global batch, warm-up and decay.
- ``checkpoint``: atomic checkpoint directories, validation, finding the newest valid one, pruning.
- ``guard``: the joint non-finite-step decision (on the device) and skip counting; step values read in batches.
- ``determinism``: seeds from (seed, epoch, step) and deterministic kernels.
- ``grad_stats``: rank 0's per-layer gradient statistics: three summary metrics, the run's table and heatmap.
- ``faults``: ``TrainHooks`` (does nothing) and the test-only fault injection (SIGKILL, NaN) that replaces
  it when an environment variable is set.

Nothing here imports Ray at module import time except ``ray_runtime``, ``launcher`` and ``loop``.
"""
