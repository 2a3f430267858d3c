"""pipeline.tracking.mlflow_tracker against real stores: a SQLite file, and a real ``mlflow server`` that is
stopped for about 30 s in the middle of a run. Everything is read back through ``MlflowClient``."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking import GRAD_METRIC_PREFIX, create_tracker
from pipeline.tracking.mlflow_tracker import MlflowTracker, legal_metric_name
from pipeline.tracking.sender import MAX_METRICS_PER_REQUEST
from pipeline.tracking.uris import TrackingError
from tests.pipeline.mlflow_server import MlflowServer, free_port

OUTAGE_S = 20.0  # server down this long before the restart begins; the restart adds ~10-15 s: ~30 s in all
MAX_STALL_S = 1.0  # a log call only queues: it never holds a training step up this long


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


@pytest.fixture
def running(server):
    if not server.healthy():
        server.start()
    return server


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize(
    ("name", "legal"),
    [
        ("train/loss", "train/loss"),
        ("val/ap_voc07/traffic light", "val/ap_voc07/traffic light"),  # spaces are legal
        ("grad/backbone.0:weight/norm", "grad/backbone.0_weight/norm"),  # ':' is not
        ("a//b/", "a/b"),  # no empty path segment
        ("../x/./y", "_/x/_/y"),  # no '.' or '..' segment
        ("", "_"),
        ("x" * 300, "x" * 250),  # MLflow's key length limit
    ],
)
def test_legal_metric_name(name, legal):
    assert legal_metric_name(name) == legal


# ----------------------------------------------------------------------------------------- SQLite store
@pytest.mark.slow
def test_sqlite_default_store_run_metadata_artifacts_and_resume_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    (repo / "shards").mkdir(parents=True)
    manifest = {"totals": {"train": 8, "val": 2}, "classes": ["a", "b"]}
    (repo / "shards" / "manifest.json").write_text(json.dumps(manifest))
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  shard:\n    cmd: python -m pipeline shard\n    deps:\n"
        "    - path: data/prepared\n      hash: md5\n      md5: aaa.dir\n    - path: pipeline/stages/shard.py\n"
        "      hash: md5\n      md5: ccc\n    outs:\n    - path: shards\n      hash: md5\n      md5: bbb.dir\n"
    )
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "dvc.lock"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    cfg = TrackingConfig(experiment="exp-a", model_name="ssd-test")
    tracker = create_tracker(cfg, enabled_here=True, run_id=None, run_name="job", repo_root=repo)
    assert isinstance(tracker, MlflowTracker)
    assert tracker.uri == f"sqlite:///{repo.resolve()}/mlflow.db"
    tracker.log_run_metadata(
        {"train": {"lr": 0.01, "milestones": [3, 5]}, "seed": 0}, world_size=2, device_type="cpu", shards="shards"
    )
    for step in range(1, 7):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.01}, step)
    wide = {f"{GRAD_METRIC_PREFIX}layer{i}": float(i) for i in range(MAX_METRICS_PER_REQUEST + 200)}  # > 1 request
    tracker.log_metrics(wide, 6)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    tracker.log_artifact(tmp_path / "table.csv", "grad_stats")
    (tmp_path / "table.csv").unlink()  # staged at log time: deleting it right away is fine
    assert tracker.close("KILLED")
    run_id = tracker.run_id

    client = MlflowClient(tracker.uri)
    experiment = client.get_experiment_by_name("exp-a")
    assert experiment.artifact_location == (repo / "mlartifacts" / "exp-a").resolve().as_uri()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params == {"train.lr": "0.01", "train.milestones": "[3, 5]", "seed": "0"}
    assert run.data.tags["world_size"] == "2" and run.data.tags["device_type"] == "cpu"
    assert run.data.tags["mlflow.source.git.commit"] == head and run.data.tags["git_dirty"] == "false"
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.digest and json.loads(dataset.profile)["dvc"] == {"shards": "bbb.dir", "data/prepared": "aaa.dir"}
    assert json.loads(dataset.profile)["totals"] == manifest["totals"]
    assert history(client, run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 7)]
    assert len(client.get_run(run_id).data.metrics) == 2 + len(wide)
    assert [f.path for f in client.list_artifacts(run_id, "grad_stats")] == ["grad_stats/table.csv"]

    # Resume from a checkpoint at step 4: steps 5 and 6 come again and must not be stored twice.
    resumed = create_tracker(cfg, enabled_here=True, run_id=run_id, run_name="job", repo_root=repo)
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_params({"train": {"lr": 0.01}, "seed": 0})  # same values: fine, nothing new sent
    for step in range(5, 9):
        resumed.log_metrics({"train/loss": 10.0 + step}, step)
    resumed.log_metrics({"grad_layer0": 5.0}, 8)
    model_file = tmp_path / "ssd.pt"
    model_file.write_bytes(b"weights")
    resumed.log_model_file(model_file)
    resumed.set_model_version_tags({"val/map_voc07": 0.5})
    assert resumed.close()
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run per job
    assert history(client, run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 7)] + [(7, 17.0), (8, 18.0)]
    assert history(client, run_id, "grad_layer0") == [(6, 0.0), (8, 5.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/ssd.pt"]
    (version,) = client.search_model_versions("name='ssd-test'")
    assert version.run_id == run_id and version.source.endswith("/model")
    assert version.tags["train/loss"] == str(18.0) and version.tags["val/map_voc07"] == "0.5"
    assert not any(k.startswith(GRAD_METRIC_PREFIX) for k in version.tags)  # gradient statistics stay on the run


def test_unknown_run_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="not in sqlite:///"):
        create_tracker(TrackingConfig(), enabled_here=True, run_id="0" * 32, run_name="r", repo_root=tmp_path)


# ----------------------------------------------------------------------------------------- HTTP server
@pytest.mark.slow
def test_unreachable_server_fails_within_the_connect_timeout_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = TrackingConfig(uri=uri, connect_timeout_s=3.0)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        create_tracker(cfg, enabled_here=True, run_id=None, run_name="r", repo_root=tmp_path)
    assert time.monotonic() - started < cfg.connect_timeout_s + 2.0


@pytest.mark.slow
def test_server_run_resume_and_registry(running, tmp_path):
    cfg = TrackingConfig(uri=running.url, experiment="srv-resume", model_name="srv-model")
    first = create_tracker(cfg, enabled_here=True, run_id=None, run_name="job", repo_root=tmp_path)
    for step in range(1, 4):
        first.log_metrics({"train/loss": float(step)}, step)
    first.close("FAILED")
    second = create_tracker(cfg, enabled_here=True, run_id=first.run_id, run_name="job", repo_root=tmp_path)
    for step in range(2, 6):
        second.log_metrics({"train/loss": 100.0 + step}, step)
    (tmp_path / "ssd.pt").write_bytes(b"\0" * 1024)
    second.log_model_file(tmp_path / "ssd.pt", metrics={"val/map": 0.25})
    assert second.close()
    client = MlflowClient(running.url)
    experiment = client.get_experiment_by_name("srv-resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert history(client, first.run_id, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0)]
    assert [f.path for f in client.list_artifacts(first.run_id, "model")] == ["model/ssd.pt"]
    (version,) = client.search_model_versions("name='srv-model'")
    assert version.tags["val/map"] == "0.25"


@pytest.mark.slow
def test_requeued_metrics_already_stored_through_a_server_are_not_stored_twice(running, tmp_path):
    """What a resume re-sends from a checkpoint may be stored already: the server's store skips an identical
    (key, value, timestamp, step); the new ones are stored, and later log calls skip the requeued steps."""
    cfg = TrackingConfig(uri=running.url, experiment="srv-requeue")
    first = create_tracker(cfg, enabled_here=True, run_id=None, run_name="job", repo_root=tmp_path)
    for step in (1, 2):
        first.log_metrics({"train/loss": step / 2}, step)
    assert first.close(status=None) and first.pending_metrics() == []
    client = MlflowClient(running.url)
    stored = [[m.key, m.value, m.timestamp, m.step] for m in client.get_metric_history(first.run_id, "train/loss")]
    second = create_tracker(cfg, enabled_here=True, run_id=first.run_id, run_name="job", repo_root=tmp_path)
    second.requeue_metrics([*stored, ["train/loss", 1.5, stored[-1][2], 3]])
    second.log_metrics({"train/loss": 99.0}, 3)  # the requeued step 3 stands
    second.log_metrics({"train/loss": 2.0}, 4)
    assert second.close()
    assert history(client, first.run_id, "train/loss") == [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]


@pytest.mark.slow
def test_server_outage_mid_run_never_stalls_a_step_and_loses_nothing(running, tmp_path):
    """Stop the server for ~30 s during a run, then restart it: every log call stays fast, and once the
    server is back every metric (and an artifact logged during the outage) is stored exactly once."""
    cfg = TrackingConfig(uri=running.url, experiment="srv-outage")
    tracker = create_tracker(cfg, enabled_here=True, run_id=None, run_name="job", repo_root=tmp_path)
    grad_keys = [f"grad/layer{i}/{s}" for i in range(40) for s in ("norm", "mean", "std")]
    logged: dict[int, float] = {}
    worst = 0.0
    restarter: threading.Thread | None = None
    down_at = up_at = None
    step = 0

    def one_step():
        nonlocal step, worst
        step += 1
        started = time.monotonic()
        tracker.log_metrics({"train/loss": 1.0 / step, "train/images_per_sec": 100.0 + step}, step)
        if step % 10 == 0:
            tracker.log_metrics({k: float(step) for k in grad_keys}, step)
        if step == 30:  # during the outage
            (tmp_path / "during.txt").write_text("logged while the server was down")
            tracker.log_artifact(tmp_path / "during.txt", "outage")
        worst = max(worst, time.monotonic() - started)
        logged[step] = 1.0 / step
        time.sleep(0.05)  # a training step

    for _ in range(10):
        one_step()
    running.stop()
    down_at = time.monotonic()
    while True:
        one_step()
        if restarter is None and time.monotonic() - down_at > OUTAGE_S:
            restarter = threading.Thread(target=running.start)
            restarter.start()
        if restarter is not None and not restarter.is_alive():
            up_at = up_at or time.monotonic()
            if time.monotonic() - up_at > 1.0:  # a few steps after it is back
                break
    assert up_at - down_at >= OUTAGE_S
    assert worst < MAX_STALL_S, f"a log call blocked for {worst:.2f} s"
    flush_started = time.monotonic()
    assert tracker.close(timeout_s=60)
    assert time.monotonic() - flush_started < 30

    client = MlflowClient(running.url)
    assert history(client, tracker.run_id, "train/loss") == sorted(logged.items())  # all steps, each once
    assert [s for s, _ in history(client, tracker.run_id, "grad/layer39/std")] == list(range(10, step + 1, 10))
    assert [f.path for f in client.list_artifacts(tracker.run_id, "outage")] == ["outage/during.txt"]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_custom_sqlite_store_keeps_artifacts_next_to_it_and_bad_calls_are_refused(tmp_path):
    repo, store = tmp_path / "repo", tmp_path / "elsewhere" / "runs.db"
    repo.mkdir()
    cfg = TrackingConfig(uri=f"sqlite:///{store}")
    tracker = create_tracker(cfg, enabled_here=True, run_id=None, run_name="r", repo_root=repo)
    assert tracker.artifact_uri.startswith((store.parent / "mlartifacts" / "ssd").as_uri())
    assert not (repo / "mlartifacts").exists()
    with pytest.raises(TypeError, match="step must be an int"):
        tracker.log_metrics({"a": 1.0}, -1)
    with pytest.raises(TypeError, match="must be a number"):
        tracker.log_metrics({"a": "x"}, 1)
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(Path(tmp_path / "missing.txt"))
    tracker.close()
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log_metrics({"a": 1.0}, 2)
