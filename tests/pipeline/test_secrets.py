"""Credentials in a tracking URI work, and appear in nothing a run produces.

A real (two-step, one-worker) Ray training and a real evaluation talk to a real ``mlflow server`` through
a proxy that refuses every request without HTTP basic auth ``alice:<password>``; the URI they are given
is ``http://alice:<password>@127.0.0.1:<proxy port>`` (``${oc.env:...}`` in the params file for train, a
command-line override for evaluate). Afterwards every byte the run left behind is searched for the
password: captured logs, stdout and stderr (Ray forwards the workers' output there), every file under the
test's folder (run folder with checkpoints' ``meta.json``, ``state.pt`` and ``outcome.json``, the model
file, ``metrics/eval.json``, plots, the MLflow server's database, artifact store and log) and Ray's own
session folder (its logs and state).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import logging
import shutil
import threading
import urllib.parse
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.artifacts.model_file import save_model_file
from pipeline.cli import main as cli_main
from pipeline.config import TrackingConfig, params_to_dict
from pipeline.stages.train import build_job
from pipeline.tracking import TrackingError, create_tracker, find_run_by_tag
from ssd_core.model import build_ssd
from tests.pipeline.fixtures import make_params, prepare_and_shard
from tests.pipeline.mlflow_server import MlflowServer, free_port
from tests.private_ray import private_ray

pytestmark = pytest.mark.timeout(300)

USER = "alice"
MAX_STEPS = 2  # 8 images / batch 4 on one worker: 2 steps = one epoch, so the epoch's artifacts are logged too
CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
TRAIN = [
    "model.preset=ssd_tiny",
    "train.num_workers=1",
    "train.threads_per_worker=1",
    "train.loader_workers=0",
    "train.batch_size=4",
    "train.lr_reference_batch=4",
    f"train.max_steps={MAX_STEPS}",
    "train.warmup_steps=0",
    "train.checkpoint_every_steps=1",
    "train.keep_checkpoints=2",
    "train.log_every_steps=1",
    "augment.expand=false",
    "augment.crop=false",
    "tracking.grad_stats_every=1",
    "tracking.experiment=secrets",
    "tracking.model_name=secrets",
    "tracking.connect_timeout_s=30",
]
EVALUATE = [
    "eval.batch_size=2",
    "eval.num_workers=0",
    "eval.num_sample_images=2",
    "tracking.experiment=secrets",
    "tracking.model_name=secrets",
]


def _password() -> str:
    return f"pw-{uuid.uuid4().hex}"  # unique: found only where this test's run put it


# ------------------------------------------------------------------------------------- basic-auth proxy
class BasicAuthProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that answers 401 to every request without HTTP basic
    auth ``user:password`` (``/health`` excepted, as in MLflow's own auth app). The plain ``mlflow server``
    ignores credentials; in front of it, credentials that fail to reach MLflow's requests are refused."""

    def __init__(self, upstream: str, user: str, password: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.authorized = 0
        self.refused: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="auth-proxy", daemon=True)

    def start(self) -> BasicAuthProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        proxy: BasicAuthProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        if self.path.split("?")[0] != "/health" and self.headers.get("Authorization") != proxy.expected:
            proxy.refused.append(f"{self.command} {self.path.split('?')[0]}")
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        proxy.authorized += 1
        skip = {"host", "authorization", "connection", "transfer-encoding", "content-length"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        del format, args


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray for the module; yields its session folder (searched for the password too)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in CREDENTIAL_VARS:  # Ray's processes must not inherit credentials from the environment
            mp.delenv(var, raising=False)
        with private_ray(mp, "rs", num_cpus=1) as session:
            yield session.temp


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 training and 4 validation images, 64 x 64."""
    params = make_params(
        **{"data.synthetic.num_train": 8, "data.synthetic.num_val": 4, "data.synthetic.image_size": 64}
    )
    return prepare_and_shard(params, tmp_path_factory.mktemp("secret-data"))[1]


@pytest.fixture
def clean_env(monkeypatch):
    """No MLflow URI or credentials from the environment; whatever a test sets is undone afterwards."""
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _files_holding(secret: str, *roots: Path) -> list[str]:
    needle = secret.encode()
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            try:
                if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                    found.append(str(path))
            except OSError:  # a socket or a file removed meanwhile
                continue
    return found


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.ray
def test_train_and_evaluate_with_credentials_in_the_uri_leave_them_nowhere(
    ray_local, shards, tmp_path, clean_env, caplog, capfd
):
    password = _password()
    server = MlflowServer(tmp_path / "mlflow-server").start()
    proxy = BasicAuthProxy(server.url, USER, password).start()
    clean_uri = f"http://127.0.0.1:{proxy.port}"
    secret_uri = f"http://{USER}:{password}@127.0.0.1:{proxy.port}"
    work = tmp_path / "work"
    work.mkdir()
    # a checkout holds the lock, which the registered MLflow model's pinned requirements come from
    shutil.copy(Path(__file__).resolve().parents[2] / "requirements.lock", work)
    clean_env.chdir(work)
    clean_env.setenv("SSD_TEST_TRACKING_URI", secret_uri)
    params_file = work / "params.yaml"
    params_file.write_text("seed: 0\ntracking:\n  uri: ${oc.env:SSD_TEST_TRACKING_URI}\n")
    plain_file = work / "plain.yaml"
    plain_file.write_text("seed: 0\n")
    caplog.set_level(logging.INFO)
    model = work / "models" / "ssd.pt"
    metrics = work / "metrics" / "eval.json"
    try:
        assert (
            cli_main(
                [
                    "train",
                    "--params",
                    str(params_file),
                    "--shards",
                    str(shards),
                    "--model-out",
                    str(model),
                    *TRAIN,
                    f"train.storage_path={work / 'runs'}",
                ]
            )
            == 0
        )
        assert (
            cli_main(
                [
                    "evaluate",
                    "--params",
                    str(plain_file),
                    "--model",
                    str(model),
                    "--shards",
                    str(shards),
                    "--metrics",
                    str(metrics),
                    "--plots",
                    str(work / "plots"),
                    "--out",
                    str(work / "eval"),
                    *EVALUATE,
                    f"tracking.uri={secret_uri}",
                ]
            )
            == 0
        )
        assert cli_main(["check-params", "--params", str(params_file)]) == 0
        assert cli_main(["summary", "--params", str(params_file), "--metrics", str(metrics)]) == 0

        # The credentials worked: the driver, the Ray worker and evaluate all got past the proxy.
        assert proxy.refused == [] and proxy.authorized > 0
        client = MlflowClient(server.url)
        (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.params["tracking.uri"] == clean_uri  # recorded without the credentials
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]  # the worker
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/map_voc07")] == [MAX_STEPS]
        logged = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"model", "grad_stats", "evaluation"} <= logged
    finally:
        proxy.stop()
        server.stop()

    out, err = capfd.readouterr()
    assert f"MLflow run {run.info.run_id}" in caplog.text and clean_uri in caplog.text  # the logs name the server
    leaks = [
        name for name, text in (("log records", caplog.text), ("stdout", out), ("stderr", err)) if password in text
    ]
    leaks += _files_holding(password, tmp_path, ray_local)
    assert not leaks, f"the password appears in: {leaks}"
    assert list((work / "runs").glob("*/checkpoint_step_*/meta.json")), "no checkpoint was searched"


def test_an_unreachable_server_is_named_without_its_credentials(shards, tmp_path, clean_env, caplog, capfd):
    password = _password()
    port = free_port()  # nothing listens there
    secret_uri = f"http://{USER}:{password}@127.0.0.1:{port}"
    shown = f"http://127.0.0.1:{port}"

    cfg = TrackingConfig(uri=secret_uri, connect_timeout_s=1.0)
    with pytest.raises(TrackingError) as raised:
        create_tracker(cfg, enabled_here=True, run_id=None, run_name="r", repo_root=tmp_path)
    assert password not in str(raised.value) and shown in str(raised.value)

    clean_env.setenv("MLFLOW_TRACKING_URI", secret_uri)  # the same URI from the environment, as evaluate looks it up
    with pytest.raises(TrackingError) as raised:
        find_run_by_tag(TrackingConfig(connect_timeout_s=1.0), tmp_path, "model_sha256", "0" * 64)
    assert password not in str(raised.value) and shown in str(raised.value)
    clean_env.delenv("MLFLOW_TRACKING_URI")

    torch.manual_seed(0)
    model = tmp_path / "ssd.pt"
    classes = ["a", "b"]
    save_model_file(
        model, build_ssd("ssd_tiny", len(classes) + 1), classes=classes, params=params_to_dict(make_params())
    )
    (tmp_path / "plain.yaml").write_text("seed: 0\n")
    clean_env.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    code = cli_main(
        [
            "evaluate",
            "--params",
            str(tmp_path / "plain.yaml"),
            "--model",
            str(model),
            "--shards",
            str(shards),
            "--metrics",
            str(tmp_path / "eval.json"),
            "--plots",
            str(tmp_path / "plots"),
            "--out",
            str(tmp_path / "eval"),
            f"tracking.uri={secret_uri}",
            "tracking.connect_timeout_s=1",
        ]
    )
    out, err = capfd.readouterr()
    assert code == 2 and "unreachable" in caplog.text and shown in caplog.text
    assert password not in caplog.text + out + err


@pytest.mark.parametrize("source", ["tracking.uri", "MLFLOW_TRACKING_URI"])
def test_a_job_carries_the_credentials_apart_from_its_params(source, shards, tmp_path, clean_env):
    """Without the command line's ``detach_credentials``: ``build_job`` itself keeps them out of ``job.params``
    (which every checkpoint records) and hands them to the workers in ``job.tracking_credentials``."""
    password = _password()
    secret_uri = f"http://{USER}:{password}@127.0.0.1:5000"
    if source == "MLFLOW_TRACKING_URI":
        clean_env.setenv("MLFLOW_TRACKING_URI", secret_uri)
        params = make_params()
    else:
        params = make_params(**{"tracking.uri": secret_uri})
    job = build_job(str(shards), params, tmp_path)
    assert job.params.tracking.uri == "http://127.0.0.1:5000"
    assert job.tracking_credentials == {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}
    assert password not in repr(job) and password not in repr(job.params)
