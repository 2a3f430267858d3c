"""Node-failure recovery time on the loopback cluster: from the kill of a worker node to the next step done.

The README's laptop workflow (``tests/cluster/workflow.py``'s ``SUBMIT``, shards in the cluster's bucket): a
2-rank job on two worker nodes; at its first checkpoint the node of one rank is killed (SIGKILL to its
whole process group: raylet and rank) and a replacement node is started at once, as an autoscaler would.
Measured from the job's own log (rank 0's lines carry the wall-clock second) and the kill's wall-clock time:

- ``replacement_joined_s``: kill -> the new node registered (``infra/local/cluster.py add-node`` returns);
- ``group_restarted_s``: kill -> the new worker group's rank 0 logs ``starting at step K``;
- ``next_step_s``: kill -> the first step that group completes (``step K+1/N``), the recovery time
  (goal <= 30 s). The reference is the run's own step time before the kill (median of the logged steps).

Run: ``.venv/bin/python benchmarks/bench_cluster_recovery.py --shards shards [--cluster-dir DIR]`` with a shard
folder of the embedded default (``dvc repro shard``). Without ``--cluster-dir`` a cluster is started in a
temporary folder and stopped at the end. Writes ``benchmarks/results/bench_cluster_recovery.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_cluster_recovery.json"
sys.path[:0] = [str(REPO)]

from tests.cluster import workflow as wf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="local shard folder to upload")
    parser.add_argument("--cluster-dir", type=Path, help="a running infra/local cluster (default: start one)")
    args = parser.parse_args()
    temp = Path(tempfile.mkdtemp(prefix="bcr", dir="/tmp"))
    cluster_dir = args.cluster_dir or temp / "c"
    shell = wf.Shell(cluster_dir, temp / "commands.log")
    if args.cluster_dir is None:
        shell.run(wf.START, REPO, timeout=600)
    try:
        env = shell.client_env()
        jobs = wf.JobServer(env)
        shell.run(
            f".venv/bin/python -m pipeline upload shards {args.shards.resolve()} s3://$SSD_S3_BUCKET/shards", REPO
        )
        job, run = f"recovery-{int(time.time())}", f"recovery-{int(time.time())}"
        shell.run(wf.SUBMIT, REPO, JOB=job, RUN=run)
        keys = lambda: [k for k in wf.s3_keys(env, f"runs/{run}-") if k.endswith("/meta.json")]  # noqa: E731
        wf.wait_for(keys, "the first checkpoint", 900, every_s=0.2)
        nodes = jobs.training_nodes(job)
        services = json.loads((cluster_dir / "state.json").read_text())["services"]
        victim = next(name for name, s in services.items() if s.get("node_id") in nodes)
        killed = time.time()
        shell.run(wf.KILL_NODE, REPO, NODE=victim)
        shell.run(wf.ADD_NODE, REPO)
        joined = time.time()
        assert jobs.wait(job, 900) == "SUCCEEDED"
        logs = jobs.logs(job)
    finally:
        if args.cluster_dir is None:
            shell.run(wf.STOP, REPO, timeout=300)
    before = [t for t, _ in wf.step_times(logs) if t < killed]
    step_time = statistics.median(b - a for a, b in zip(before, before[1:], strict=False)) if len(before) > 2 else None
    record = {
        "replacement_joined_s": round(joined - killed, 1),
        **wf.recovery(logs, killed),
        "step_time_before_kill_s": step_time,
        "resolution_s": 1.0,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(record, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
