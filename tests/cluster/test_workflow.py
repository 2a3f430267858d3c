"""The README's cluster workflow, for real, on a loopback cluster (``infra/local``): an S3 server with access
keys, a token-authenticated Ray head and two worker nodes, an MLflow server with a login, a DVC remote.

One scenario, in the order a team lives it (``tests/cluster/workflow.py`` holds the README lines it runs):

1. The data owner clones the repository, ``dvc repro shard`` (while the cluster starts), uploads the shards to
   the bucket with ``python -m pipeline upload``, pushes them to the DVC remote and commits ``dvc.lock``; then
   deletes ``shards/``: the workers can only read the bucket.
2. A fault-free run (``RUN=fault-free``), during which the MLflow server is killed and restarted >= 10 s later:
   every step's metrics arrive (none lost, none twice) and the steps went on while it was down.
3. The same command as run ``laptop``: two ranks on two different worker nodes (node ids; all nodes share one
   IP). After the first checkpoint one of those nodes is killed, its whole process group, and a replacement
   node is started: the ranks run on the survivor and the replacement. Then ``ray job stop``, which gives the
   driver time to checkpoint and release its lease, and the same command again, which starts at once: it
   resumes from the newest checkpoint in S3 and ends at exactly ``train.max_steps``, with final weights
   bit-identical to the fault-free run's, one MLflow run without a step logged twice, the model registered and
   its artifacts in the bucket, and every step's metrics stored: those rank 0 still had queued when ``ray job
   stop`` ended the job travel in the checkpoint and are sent again on resume.
4. A teammate clones the data owner's commit, ``dvc pull shard``: every shard's sha256 is the manifest's.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.cluster import workflow as wf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.dvc,
    pytest.mark.cluster,
    pytest.mark.timeout(2400),
    pytest.mark.xdist_group("multinode_ray"),  # never beside test_elastic's cluster (see there)
]

OUTAGE_MIN_S = 10.0  # the MLflow server stays down at least this long (the sender's backoff reaches 5 s)
OUTAGE_MIN_STEPS = 5  # ... and until rank 0 has logged this many more steps
JOB_TIMEOUT_S = 420.0


@pytest.fixture
def cluster_dir(tmp_path):
    path = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    yield path
    # keep what explains a failure: the services' logs and the job drivers' logs, beside the commands' log
    shutil.copytree(path / "logs", tmp_path / "cluster-logs", dirs_exist_ok=True)
    for driver_log in (path / "ray").glob("session_*/logs/job-driver-*.log"):
        shutil.copy(driver_log, tmp_path / "cluster-logs" / driver_log.name)
    shutil.rmtree(path, ignore_errors=True)


def _driver_lines(logs: str) -> str:
    """A job's log without the training ranks' lines (the driver's own, its errors, the controller's)."""
    return "\n".join(line for line in logs.splitlines() if "(RayTrainWorker" not in line)[-4000:]


def test_the_readme_cluster_workflow(tmp_path, cluster_dir):
    shell = wf.Shell(cluster_dir, tmp_path / "commands.log")
    owner = wf.fresh_clone(wf.REPO, tmp_path / "owner")
    timings: dict[str, float] = {}
    started = time.monotonic()
    starting = shell.start(wf.START, owner)  # the cluster comes up while the shards are made
    try:
        shell.run(wf.REPRO, owner, timeout=600)
        assert starting.wait(timeout=300) == 0, (tmp_path / "commands.log").read_text()[-4000:]
        timings["cluster and shards"] = time.monotonic() - started
        env = shell.client_env()
        manifest = _data_owner(shell, owner, env)
        timings["upload and push"] = time.monotonic() - started

        _fault_free_run_through_an_mlflow_outage(shell, owner, env, cluster_dir)
        timings["fault-free run"] = time.monotonic() - started
        lost = _run_with_a_node_failure_and_a_stop(shell, owner, env, cluster_dir)
        timings["faulted run"] = time.monotonic() - started

        teammate = wf.fresh_clone(owner, tmp_path / "teammate")
        for line in (wf.REMOTE_ADD, wf.REMOTE_ENDPOINT, wf.PULL):
            shell.run(line, teammate)
        for shard in manifest["shards"]:
            digest = hashlib.sha256((teammate / "shards" / shard["name"]).read_bytes()).hexdigest()
            assert digest == shard["sha256"], shard["name"]
        timings["dvc pull"] = time.monotonic() - started
    finally:
        starting.wait(timeout=300)
        shell.run(wf.STOP, owner, timeout=120)
        print("elapsed:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    assert not (cluster_dir / "state.json").exists()
    assert not lost, (  # checked once the cluster is stopped: a checkpoint carries the metrics still unsent
        f"metrics of steps {lost} were lost: rank 0 still had them queued for MLflow when `ray job stop` "
        "ended the job, and the resumed job starts after them (they are in no checkpoint)"
    )


def _data_owner(shell: wf.Shell, owner: Path, env: dict[str, str]) -> dict:
    """Upload, push and commit the shards; delete the local copy. Returns the manifest."""
    manifest = json.loads((owner / "shards" / "manifest.json").read_text())
    for line in (wf.UPLOAD, wf.REMOTE_ADD, wf.REMOTE_ENDPOINT, wf.PUSH, wf.COMMIT):
        shell.run(line, owner)
    uploaded = set(wf.s3_keys(env, "shards/"))
    assert {f"shards/{s['name']}" for s in manifest["shards"]} | {"shards/manifest.json"} <= uploaded
    assert wf.s3_keys(env, "dvc/"), "dvc push stored nothing in the remote"
    shell.run(wf.RM_SHARDS, owner)  # the workers must read the bucket, nothing of the checkout
    return manifest


def _fault_free_run_through_an_mlflow_outage(shell, owner, env, cluster_dir) -> None:
    """MLflow goes down after rank 0's third step and stays down for at least ``OUTAGE_MIN_S`` and until rank 0
    has logged ``OUTAGE_MIN_STEPS`` more steps. Progress is read from the job's log, not from MLflow: the
    metrics MLflow shows may trail the steps by many seconds on a busy machine (a CI run saw step 3 there only
    after all its steps were done, and the outage missed the run)."""
    jobs, mlflow = wf.JobServer(env), wf.Mlflow(env)
    shell.run(wf.SUBMIT, owner, JOB="fault-free", RUN="fault-free")

    def logged_steps() -> list[int]:
        return [step for _, step in wf.step_times(jobs.logs("fault-free"))]

    def last_step() -> int:
        return max(logged_steps(), default=0)

    wf.wait_for(lambda: last_step() >= 3, "the fault-free run's third step", JOB_TIMEOUT_S, every_s=0.5)
    down = time.time()
    shell.run(wf.KILL_MLFLOW, owner)
    at_kill = last_step()
    assert at_kill < wf.MAX_STEPS - OUTAGE_MIN_STEPS, f"the run was at step {at_kill} when MLflow went down"
    wf.wait_for(
        lambda: time.time() - down >= OUTAGE_MIN_S and last_step() >= at_kill + OUTAGE_MIN_STEPS,
        f"{OUTAGE_MIN_STEPS} steps while MLflow was down",
        JOB_TIMEOUT_S,
        every_s=0.5,
    )
    up = time.time()
    shell.run(wf.REVIVE_MLFLOW, owner)
    print(f"MLflow down {up - down:.1f} s, from step {at_kill} to step {last_step()} (rank 0's log)")
    assert jobs.wait("fault-free", JOB_TIMEOUT_S) == "SUCCEEDED", _driver_lines(jobs.logs("fault-free"))
    logged = logged_steps()
    assert logged == list(range(1, wf.MAX_STEPS + 1)), logged  # each of rank 0's lines once, not once per node

    runs = mlflow.runs("fault-free")
    assert len(runs) == 1
    run = runs[0]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    keys = [m["key"] for m in run["data"]["metrics"] if m["key"].startswith("train/")]
    assert "train/loss" in keys and len(keys) >= 4, keys
    for key in keys:  # log_every_steps=1: every step of every train/ metric, once
        steps = sorted(m["step"] for m in mlflow.history(run_id, key))
        assert steps == list(range(1, wf.MAX_STEPS + 1)), (key, steps)
    stamps = sorted(m["timestamp"] / 1000 for m in mlflow.history(run_id, "train/loss"))
    during = [t for t in stamps if down < t < up]
    assert len(during) >= 3, f"only {len(during)} steps while MLflow was down ({down:.0f}-{up:.0f}): {stamps}"
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if down <= a <= up]
    assert max(gaps) < OUTAGE_MIN_S / 2, f"a step waited for MLflow: gaps {gaps}"


def _run_with_a_node_failure_and_a_stop(shell, owner, env, cluster_dir) -> list[int]:
    """Returns the steps whose metrics never reached MLflow (see the end of the test)."""
    jobs, mlflow = wf.JobServer(env), wf.Mlflow(env)
    services = wf.cluster_state(cluster_dir)["services"]
    workers = {name: s["node_id"] for name, s in services.items() if name.startswith("ray-worker") and "node_id" in s}
    assert len(workers) == 2, services
    shell.run(wf.SUBMIT, owner, JOB="laptop-1", RUN="laptop")
    wf.wait_for(lambda: _checkpoints(env, "laptop"), "the first checkpoint", JOB_TIMEOUT_S, every_s=0.5)
    nodes = jobs.training_nodes("laptop-1")
    assert len(nodes) == 2 and nodes <= set(workers.values()), (nodes, workers)  # two nodes, never the head

    victim = next(name for name, node in workers.items() if node in nodes)
    killed = time.time()
    shell.run(wf.KILL_NODE, owner, NODE=victim)  # the raylet, its workers (one rank), everything of that node
    replacement = re.findall(r"^ray-worker-\d+$", shell.run(wf.ADD_NODE, owner), flags=re.M)[-1]
    new_node = wf.cluster_state(cluster_dir)["services"][replacement]["node_id"]
    survivor = (nodes - {workers[victim]}).pop()
    moved = wf.wait_for(
        lambda: jobs.training_nodes("laptop-1") == {survivor, new_node}, "ranks on survivor + replacement", 180
    )
    assert moved
    # stop once the new group has done a step: on an idle machine the recovered job would otherwise finish first
    recovered = wf.wait_for(
        lambda: _recovery(jobs.logs("laptop-1"), killed), "a step after the recovery", 300, every_s=0.5
    )
    shell.run(wf.JOB_STOP, owner, JOB="laptop-1")
    assert jobs.wait("laptop-1", 120) == "STOPPED"
    stopping = _driver_lines(jobs.logs("laptop-1"))  # SIGTERM, and time to end well before any SIGKILL:
    assert "run the same command again" in stopping and re.search(r"lease: job \S+ released", stopping), stopping
    print("node failure:", json.dumps(recovered))  # for benchmarks/README
    stopped_at = max(_checkpoints(env, "laptop"))
    assert stopped_at < wf.MAX_STEPS

    shell.run(wf.SUBMIT, owner, JOB="laptop-2", RUN="laptop")  # the same command again
    assert jobs.wait("laptop-2", JOB_TIMEOUT_S) == "SUCCEEDED", _driver_lines(jobs.logs("laptop-2"))
    logs = jobs.logs("laptop-2")
    assert "lease: waiting for" not in logs and "took over" not in logs  # laptop-1 let go of the run folder
    assert "resuming from s3://" in logs and f"starting at step {stopped_at} of {wf.MAX_STEPS}" in logs, logs[-4000:]
    assert f"{wf.MAX_STEPS} steps" in shell.run(wf.JOB_LOGS, owner, JOB="laptop-2")

    final = {name: _model_weights(env, name) for name in ("laptop", "fault-free")}
    assert final["laptop"].keys() == final["fault-free"].keys()
    assert all(torch.equal(final["laptop"][k], final["fault-free"][k]) for k in final["laptop"])

    runs = mlflow.runs("laptop")
    assert len(runs) == 1, [r["info"]["run_id"] for r in runs]  # one run across the failure, the stop, the resume
    run_id = runs[0]["info"]["run_id"]
    steps = [m["step"] for m in mlflow.history(run_id, "train/loss")]
    assert len(steps) == len(set(steps)), steps  # no step logged twice
    assert set(steps) <= set(range(1, wf.MAX_STEPS + 1)) and wf.MAX_STEPS in steps, steps
    assert wf.wait_for(lambda: mlflow.model_versions(run_id), "the registered model", 60)
    artifacts = wf.s3_keys(env, "mlartifacts/")
    assert any(run_id in key and key.endswith("model/laptop.pt") for key in artifacts), artifacts
    return sorted(set(range(1, wf.MAX_STEPS + 1)) - set(steps))


def _checkpoints(env: dict[str, str], run: str) -> list[int]:
    """Steps of the complete checkpoints (``meta.json`` written last) in run ``run``'s folder in the bucket."""
    keys = wf.s3_keys(env, f"runs/{run}-")
    return [int(k.split("checkpoint_step_")[1].split("/")[0]) for k in keys if k.endswith("/meta.json")]


def _model_weights(env: dict[str, str], run: str) -> dict[str, torch.Tensor]:
    """The model state of run ``run``'s final checkpoint, read from the bucket."""
    (key,) = [k for k in wf.s3_keys(env, f"runs/{run}-") if k.endswith(f"_{wf.MAX_STEPS:09d}/state.pt")]
    body = wf.s3_client(env).get_object(Bucket=env["SSD_S3_BUCKET"], Key=key)["Body"].read()
    return torch.load(io.BytesIO(body), weights_only=True)["model"]


def _recovery(logs: str, killed: float) -> dict | None:
    """``workflow.recovery`` once the log holds the new group's first step, else None."""
    try:
        return wf.recovery(logs, killed)
    except StopIteration:
        return None
