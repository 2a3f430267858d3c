"""Two identical ``python -m pipeline train`` commands started at once, as two ``dvc queue`` workers would:
exactly one trains, the other exits non-zero at once naming the holder, and the weights equal a lone run's.

Real processes: each command is its own interpreter joining one local Ray (as on a cluster); the lease is
taken before Ray is joined, so the refused one never touches it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.artifacts.model_file import load_model_file
from tests.pipeline.fixtures import make_params, prepare_and_shard
from tests.private_ray import private_ray

REPO = Path(__file__).resolve().parents[3]
PARAMS = """seed: 1
model: {preset: ssd_tiny}
augment: {expand: false, crop: false}
train: {num_workers: 1, threads_per_worker: 1, loader_workers: 0, batch_size: 4, max_steps: 6, warmup_steps: 1,
        checkpoint_every_steps: 2, keep_checkpoints: 1, run_name: race}
tracking: {enabled: false}
"""

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("race")
    params = make_params(
        **{"data.synthetic.num_train": 16, "data.synthetic.num_val": 4, "data.synthetic.image_size": 64}
    )
    prepare_and_shard(params, root)
    (root / "params.yaml").write_text(PARAMS)
    return root


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module, which the commands join (``RAY_ADDRESS``)."""
    with pytest.MonkeyPatch.context() as mp, private_ray(mp, "rl", num_cpus=2) as session:
        yield session.address


def _start(root: Path, storage: Path, model_out: Path, address: str) -> subprocess.Popen:
    """``python -m pipeline train`` in ``root``, its output in ``<model_out>.log`` (a pipe could fill and stall it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SSD_TRAIN_"))}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_ADDRESS=address)
    command = [sys.executable, "-m", "pipeline", "train", "--params", "params.yaml", "--shards", "shards"]
    command += ["--model-out", str(model_out), f"train.storage_path={storage}"]
    with open(model_out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model_file(path).model.state_dict()


def test_two_identical_jobs_at_once_one_trains_one_is_refused(workspace, ray_address):
    lone = _start(workspace, workspace / "lone-runs", workspace / "lone.pt", ray_address)
    assert lone.wait(timeout=300) == 0, (workspace / "lone.log").read_text()[-3000:]

    storage = workspace / "runs"
    jobs = [_start(workspace, storage, workspace / f"job{i}.pt", ray_address) for i in range(2)]
    started = time.monotonic()
    ended: dict[int, tuple[int, str, float]] = {}
    while len(ended) < 2:
        for i, job in enumerate(jobs):
            if i not in ended and job.poll() is not None:
                log = (workspace / f"job{i}.log").read_text()
                ended[i] = (job.returncode, log, time.monotonic() - started)
        assert time.monotonic() - started < 300, "the jobs did not finish within 300 s"
        time.sleep(0.2)

    codes = sorted(code for code, _, _ in ended.values())
    assert codes[0] == 0 and codes[1] != 0, {i: (c, log[-2000:]) for i, (c, log, _) in ended.items()}
    winner = next(i for i, (code, _, _) in ended.items() if code == 0)
    loser = 1 - winner
    code, log, seconds = ended[loser]
    assert "is in use by job" in log and "--wait" in log, log[-3000:]
    assert "joining the Ray cluster" not in log, "the refused job must stop before it starts or joins Ray"
    assert seconds < ended[winner][2], "refused at once, not after the winner finished"
    assert not (workspace / f"job{loser}.pt").exists()

    # The winner's weights are a lone run's, bit for bit, and its folder holds exactly one run's leftovers.
    for name, tensor in _weights(workspace / "lone.pt").items():
        assert torch.equal(tensor, _weights(workspace / f"job{winner}.pt")[name]), name
    run_folders = sorted(p.name for p in storage.iterdir())
    assert len(run_folders) == 1 and run_folders[0].startswith("race-"), run_folders  # the lease is gone
    assert sorted(p.name for p in (storage / run_folders[0]).glob("checkpoint_step_*")) == ["checkpoint_step_000000006"]
