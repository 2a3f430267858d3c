"""MLflow experiment tracking: one run per training job, buffered so that logging never stalls a step.

``create_tracker`` gives rank 0 an ``MlflowTracker`` and every other rank (or a disabled config) a
``NullTracker`` with the same methods, so the training loop calls them unconditionally.

How the ``MlflowTracker`` behaves:

* **Where.** ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db`` with
  artifacts under ``<repo>/mlartifacts/<experiment>`` (a SQLite store has no artifact root of its own,
  so a new experiment is created with ``artifact_location`` = ``mlartifacts/<experiment>`` next to the
  database file). Relative SQLite paths are made absolute against the repository root, on the driver,
  before workers see them. A server decides its own artifact root.
* **Credentials.** A URI's ``user:password@`` is split off before anything sees the URI
  (``split_credentials``): the URI without it is what is logged, stored in the params and checkpoints and
  handed to MLflow, and the credentials go to MLflow's own variables ``MLFLOW_TRACKING_USERNAME`` and
  ``MLFLOW_TRACKING_PASSWORD`` in the process that talks to the server (``detach_credentials`` on the
  driver; ``TrainJob.tracking_credentials`` carries them to the Ray worker). Any other text that may hold a
  URI (a storage URL, an error message) passes through ``redact_uri`` before it is logged or recorded.
* **Start-up.** An HTTP(S) server is probed at ``/health`` first: if it does not answer within
  ``tracking.connect_timeout_s`` a ``TrackingError`` naming the URI is raised (MLflow's own client would
  retry for about four minutes). MLflow's HTTP retries are turned off in this process
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless already set) because the sender below retries by itself.
* **One run per job.** ``run_id=None`` creates a run; a run id (stored in the checkpoint by the training
  loop) continues that run. On continuing, the last stored step of every metric is read back, and
  ``log_metrics`` drops any value whose step is not above it: nothing is stored twice for one step,
  whatever the checkpoint interval was. Params already stored are not sent again.
* **Never blocking.** ``log_metrics``, ``log_params``, ``set_tags``, ``log_artifact``... only append to a
  queue. One background thread sends it in order: consecutive metric calls are merged into
  ``log_batch`` requests of at most 1000 metrics (MLflow's per-request limit; one call's metrics are
  never split unless it alone exceeds the limit), and anything that fails for a transient reason (server
  down, timeout, database locked) is retried with exponential backoff (0.5 s doubling to 5 s) until it
  is stored. Metrics carry the time they were logged, and MLflow ignores an identical metric sent twice,
  so a retried request cannot create duplicates. A request the server rejects for good (an invalid value)
  is logged as an error and dropped.
* **Exit.** ``flush(timeout_s)`` waits until everything queued is stored (bounded);
  ``close(status)`` flushes and ends the run. Artifacts are copied to a staging folder when logged, so the
  caller may delete or overwrite the file right away.
"""

from __future__ import annotations

import atexit
import collections
import getpass
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Params, TrackingConfig, flatten

logger = logging.getLogger(__name__)

MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_REQUEST = 100  # MLflow's log_batch limit for params and for tags
MAX_PARAM_VALUE_CHARS = 6000  # MLflow 3 param value limit
MAX_TAG_VALUE_CHARS = 8000
MAX_NAME_CHARS = 250  # MLflow key length limit
DEFAULT_FLUSH_TIMEOUT_S = 120.0
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 5.0
_LINGER_S = 0.5  # the sender waits this long for more metrics before a small request
_HTTP_TIMEOUT_S = 30  # per request once started (MLflow's default is 120 s)
_PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_REQUEST",
}  # fmt: skip
_ILLEGAL_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
TRACKING_URI_VAR = "MLFLOW_TRACKING_URI"
# MLflow reads these for every request it sends (basic auth, or a bearer token).
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# ``scheme://`` then everything up to the last ``@`` before a space or quote: the userinfo, even one whose
# password holds an unescaped ``@`` or ``/`` (a path with an ``@`` in it is redacted too: better too much).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]*@")
# A query parameter whose name says it holds a secret: ``?token=``, ``&password=``, ``X-Amz-Signature=``...
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&#\s'\"]*(?:token|passw|pwd|secret|sig|credential|key|auth)[^=&#\s'\"]*=)[^&#\s'\"]*",
    re.IGNORECASE,
)
MODEL_DIGEST_TAG = "model_sha256"  # run tag: sha256 of the model file logged by log_model_file


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable, unknown run); the message names the URI."""


# ------------------------------------------------------------------------------------------- names, URIs
def legal_metric_name(name: str) -> str:
    """An MLflow-legal metric/param key: letters, digits, ``_ - . /`` and spaces; no empty, ``.`` or ``..``
    path segment; at most 250 characters. Other characters become ``_``."""
    cleaned = _ILLEGAL_NAME_CHARS.sub("_", str(name))
    parts = [p if p not in (".", "..") else "_" for p in cleaned.split("/") if p != ""]
    legal = "/".join(parts) or "_"
    legal = legal[:MAX_NAME_CHARS].rstrip("/")
    assert posixpath.normpath(legal) == legal, legal
    return legal


def redact_uri(text: str) -> str:
    """``text`` (a URI, or a message holding URIs) with every userinfo replaced by ``***`` and the value of
    every secret-looking query parameter by ``***``: ``http://alice:pw@host:5000/x?token=t`` ->
    ``http://***@host:5000/x?token=***``. For anything that is logged, raised or recorded."""
    text = _USERINFO.sub(r"\g<scheme>***@", str(text))
    return _SECRET_QUERY.sub(r"\g<key>***", text)


def redact_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested ``values`` (e.g. ``params_to_dict``) with ``redact_uri`` applied to every string, for
    the params a run records (checkpoints, model file, MLflow): ``train.storage_path`` may be
    ``s3://key:secret@bucket/runs`` and must stay so where it is used, but not where it is stored."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return redact_uri(value)
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(clean(v) for v in value)
        return value

    return clean(values)


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``(uri without its userinfo, {MLFLOW_TRACKING_USERNAME: user, MLFLOW_TRACKING_PASSWORD: password})``;
    percent-escapes in the userinfo are decoded. A URI without userinfo comes back unchanged with ``{}``."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    found = {"MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(user),
             "MLFLOW_TRACKING_PASSWORD": urllib.parse.unquote(password)}  # fmt: skip
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), {k: v for k, v in found.items() if v}


def tracking_credentials(uri: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The credentials to send to the tracking server ``uri``: its userinfo if it has one, else MLflow's
    credential variables (``CREDENTIAL_VARS``) that are set in ``environ``."""
    return split_credentials(uri)[1] or {k: environ[k] for k in CREDENTIAL_VARS if environ.get(k)}


def detach_credentials(params: Params, environ: MutableMapping[str, str] = os.environ) -> Params:
    """``params`` with credentials removed from ``tracking.uri``, called where params are loaded.

    The credentials of the URI in use (``tracking.uri``, else ``MLFLOW_TRACKING_URI``, whose value is
    stripped in ``environ`` as well) move to ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` in
    ``environ``, where MLflow reads them. Afterwards no tracking URI in the params or the environment carries
    a password: the params can be logged, printed, recorded and sent to workers as they are.
    """
    uri, found = split_credentials(params.tracking.uri)
    env_uri, env_found = split_credentials(environ.get(TRACKING_URI_VAR, ""))
    if env_found:
        environ[TRACKING_URI_VAR] = env_uri
    environ.update(found if params.tracking.uri else env_found)
    if not found:
        return params
    return replace(params, tracking=replace(params.tracking, uri=uri))


def _use_credentials(uri: str, credentials: Mapping[str, str] | None) -> str:
    """``uri`` without its userinfo; the userinfo, else ``credentials``, set as MLflow's credential variables
    of this process (MLflow reads them for every request; a worker gets them from ``TrainJob``)."""
    clean, found = split_credentials(uri)
    os.environ.update(found or credentials or {})
    return clean


def default_tracking_uri(repo_root: str | Path, uri: str = "") -> str:
    """``uri`` (tracking.uri) if set, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<abs repo>/mlflow.db``;
    a relative SQLite path is resolved against ``repo_root``."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    return resolve_tracking_uri(chosen, repo_root)


def resolve_tracking_uri(uri: str, repo_root: str | Path) -> str:
    """Make a SQLite or local-path URI absolute against ``repo_root``; other URIs are returned unchanged."""
    root = Path(repo_root).resolve()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{root / path}"
        return uri
    if uri.startswith("file:"):
        return uri
    if "://" not in uri and uri not in ("databricks", "databricks-uc"):  # a bare local folder
        return str((root / uri).resolve())
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe_server(uri: str, timeout_s: float) -> None:
    """Raise ``TrackingError`` naming ``uri`` unless ``GET <uri>/health`` answers within ``timeout_s``."""
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with urllib.request.urlopen(url, timeout=max(0.1, min(remaining, 5.0))) as response:
                if response.status == 200:
                    return
                last = RuntimeError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as error:
            last = error
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise TrackingError(redact_uri(
        f"MLflow tracking server {uri} is unreachable (no answer from {url} within {timeout_s:g} s: {last}). "
        "Start it, fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false."
    ))  # fmt: skip


# ------------------------------------------------------------------------------------------- run metadata
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_run_by_tag(cfg: TrackingConfig, repo_root: str | Path, key: str, value: str) -> str | None:
    """The newest run of experiment ``cfg.experiment`` tagged ``key = value`` (e.g. the run that logged a
    model file, by its sha256), or None. Raises ``TrackingError`` if an HTTP server does not answer."""
    from mlflow.tracking import MlflowClient

    uri = _use_credentials(default_tracking_uri(repo_root, cfg.uri), None)
    if _is_http(uri):
        probe_server(uri, cfg.connect_timeout_s)
    elif uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None  # no store yet: nothing was ever logged
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.{key} = '{value}'",
                              max_results=1, order_by=["attributes.start_time DESC"])  # fmt: skip
    return runs[0].info.run_id if runs else None


def git_commit(repo_root: str | Path) -> tuple[str, bool] | None:
    """(HEAD commit, whether tracked files differ from it) of the repository at ``repo_root``; None if unknown."""
    try:
        head = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head, bool(dirty)


def shard_dataset_profile(shards: str, repo_root: str | Path) -> dict[str, Any]:
    """What identifies the training data: the manifest's sha256, its sample counts, and the DVC hashes
    (from ``dvc.lock``) of the shard folder and of the inputs of the stage that wrote it."""
    import fsspec

    manifest_url = shards.rstrip("/") + "/manifest.json"
    if "://" not in shards:
        manifest_url = str((Path(repo_root) / manifest_url).resolve())
    with fsspec.open(manifest_url, "rb") as handle:
        raw = handle.read()
    profile: dict[str, Any] = {"manifest": manifest_url, "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = {}
    for key in ("splits", "totals", "classes"):
        if isinstance(manifest, dict) and key in manifest:
            profile[key] = manifest[key]
    profile["dvc"] = _dvc_hashes(shards, Path(repo_root))
    return profile


def _dvc_hashes(shards: str, repo_root: Path) -> dict[str, str]:
    lock = repo_root / "dvc.lock"
    if not lock.is_file() or "://" in shards:
        return {}
    import yaml

    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError) as error:
        logger.warning("could not read %s for the data hashes: %s", lock, error)
        return {}
    target = os.path.normpath(os.path.relpath((repo_root / shards).resolve(), repo_root.resolve()))
    hashes: dict[str, str] = {}
    for stage in stages.values():
        outs = stage.get("outs", []) or []
        if any(os.path.normpath(o.get("path", "")) == target for o in outs):
            for entry in [*outs, *(stage.get("deps", []) or [])]:
                digest = entry.get("md5") or entry.get("hash") or entry.get("etag")
                path = entry.get("path", "")
                if digest and path and not path.endswith(".py"):
                    hashes[path] = str(digest)
    return hashes


# ------------------------------------------------------------------------------------------- trackers
class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_model_file(self, path: str | Path, *, metrics: Mapping[str, float] | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self, timeout_s: float | None = None) -> bool: ...
    def close(self, status: str | None = "FINISHED", timeout_s: float | None = None) -> bool: ...


class NullTracker:
    """The tracker of ranks other than 0, and of ``tracking.enabled=false``: every call does nothing."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        del params

    def last_logged_step(self, key: str) -> int | None:
        del key
        return None

    def log_run_metadata(self, params: Mapping[str, Any], **kwargs: Any) -> None:
        del params, kwargs

    def log_dataset(self, shards: str, *, repo_root: str | Path | None = None, context: str = "train") -> None:
        del shards, repo_root, context

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        del metrics, step

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        del local_path, artifact_path

    def log_model_file(self, path: str | Path, *, metrics: Mapping[str, float] | None = None) -> None:
        del path, metrics

    def set_model_version_tags(self, tags: Mapping[str, Any]) -> None:
        del tags

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        del tags

    def flush(self, timeout_s: float | None = None) -> bool:
        del timeout_s
        return True

    def close(self, status: str | None = "FINISHED", timeout_s: float | None = None) -> bool:
        del status, timeout_s
        return True


def create_tracker(
    cfg: TrackingConfig,
    *,
    enabled_here: bool,
    run_id: str | None,
    run_name: str,
    repo_root: str | Path,
    resume_status: str | None = "RUNNING",
    flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
    credentials: Mapping[str, str] | None = None,
) -> MlflowTracker | NullTracker:
    """``MlflowTracker`` where ``cfg.enabled and enabled_here`` (rank 0), else ``NullTracker``.

    Args:
        cfg: the ``tracking`` section of the params.
        enabled_here: True on the one process that logs (rank 0 / the driver).
        run_id: continue this run (from the checkpoint), or None to create one.
        run_name: display name of a new run.
        repo_root: the repository, for the default store, artifact root, git commit and dvc.lock.
        resume_status: status set on a continued run (None: leave it; the evaluate stage uses that).
        flush_timeout_s: default bound for ``flush`` and ``close``.
        credentials: MLflow's credential variables (``CREDENTIAL_VARS``) to set in this process, for a server
            whose URI carries none (``TrainJob.tracking_credentials`` on a Ray worker); a ``user:password@``
            in the URI itself is split off and used instead.

    Raises:
        TrackingError: server unreachable within ``cfg.connect_timeout_s``, or ``run_id`` unknown.
    """
    if not (cfg.enabled and enabled_here):
        return NullTracker()
    return MlflowTracker(cfg, run_id=run_id, run_name=run_name, repo_root=repo_root, resume_status=resume_status,
                         flush_timeout_s=flush_timeout_s, credentials=credentials)  # fmt: skip


@dataclass
class _Op:
    """One queued unit of work. ``metrics`` ops are merged into batches; ``call`` ops run alone."""

    description: str
    metrics: list[Any] = field(default_factory=list)
    call: Callable[[], None] | None = None
    cleanup: Callable[[], None] | None = None


class MlflowTracker:
    """Rank 0's tracker: synchronous start-up (experiment, run), then a buffered background sender."""

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_id: str | None,
        run_name: str,
        repo_root: str | Path,
        resume_status: str | None = "RUNNING",
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        credentials: Mapping[str, str] | None = None,
    ):
        self.cfg = cfg
        self.repo_root = Path(repo_root).resolve()
        self.uri = _use_credentials(default_tracking_uri(self.repo_root, cfg.uri), credentials)  # no userinfo
        self.flush_timeout_s = flush_timeout_s
        if _is_http(self.uri):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            request_timeout = max(_HTTP_TIMEOUT_S, math.ceil(cfg.connect_timeout_s))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout))
            probe_server(self.uri, cfg.connect_timeout_s)
        elif self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)

        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        try:
            self.experiment_id = self._experiment_id(cfg.experiment)
            self._last_step: dict[str, int] = {}
            self._stored_params: dict[str, str] = {}
            if run_id:
                self.run_id = self._continue_run(run_id, resume_status)
            else:
                self.run_id = self._create_run(run_name)
            self.artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        except TrackingError:
            raise
        except Exception as error:  # start-up talks to the store synchronously: name it in the error
            message = redact_uri(f"MLflow tracking store {self.uri}: {type(error).__name__}: {error}")
            raise TrackingError(message) from error
        self._staging = Path(tempfile.mkdtemp(prefix="ssd-mlflow-staging-"))
        self._ops: collections.deque[_Op] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._flushing = 0
        self._stop = threading.Event()
        self._skipped_steps = 0
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        logger.info("MLflow run %s in experiment %r at %s", self.run_id, cfg.experiment, self.uri)

    # ---------------------------------------------------------------- start-up (synchronous)
    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///"):  # a SQLite store has no artifact root: next to the database
                database = Path(self.uri[len("sqlite:///") :])
                location = (database.parent / "mlartifacts" / legal_metric_name(name).replace("/", "_")).as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:  # another process created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _create_run(self, run_name: str) -> str:
        tags = {"mlflow.source.type": "JOB", "mlflow.source.name": "python -m pipeline train",
                "mlflow.user": _user()}  # fmt: skip
        commit = git_commit(self.repo_root)
        if commit:
            tags["mlflow.source.git.commit"] = commit[0]
            tags["git_dirty"] = str(commit[1]).lower()  # uncommitted changes to tracked files at start
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    def _continue_run(self, run_id: str, resume_status: str | None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            raise TrackingError(
                f"MLflow run {run_id} (from the checkpoint) is not in {self.uri}: {redact_uri(error.message)}. "
                "Was the tracking store changed between attempts?"
            ) from error
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow run {run_id} in {self.uri} is deleted; restore it or start a new job")
        for metric in self._latest_metrics(run):
            self._last_step[metric.key] = max(self._last_step.get(metric.key, -1), int(metric.step))
        self._stored_params = dict(run.data.params)
        if resume_status and run.info.status != resume_status:
            self.client.update_run(run_id, status=resume_status)
        logger.info("continuing MLflow run %s (%d metrics already stored)", run_id, len(self._last_step))
        return run_id

    def _latest_metrics(self, run) -> list[Any]:
        """The newest (highest-step) value of each metric: from the run itself when it carries the steps,
        else from each metric's history."""
        objs = getattr(run.data, "_metric_objs", None)
        if objs is not None and all(hasattr(m, "step") for m in objs):
            return list(objs)
        latest = []
        for key in run.data.metrics:
            history = self.client.get_metric_history(run.info.run_id, key)
            if history:
                latest.append(max(history, key=lambda m: m.step))
        return latest

    # ---------------------------------------------------------------- the public, non-blocking calls
    def last_logged_step(self, key: str) -> int | None:
        """The highest step of metric ``key`` stored in (or queued for) this run, None if none."""
        return self._last_step.get(legal_metric_name(key))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings are flattened to ``a.b`` keys). Params already stored are skipped;
        a changed value on a continued run is reported and skipped (MLflow params are immutable)."""
        from mlflow.entities import Param

        fresh = []
        for key, value in flatten(params).items():
            name = legal_metric_name(key)
            text = _param_text(value)
            stored = self._stored_params.get(name)
            if stored is not None:
                if stored != text:
                    logger.warning("param %s changed on resume (%r -> %r); MLflow keeps the first value",
                                   name, stored, text)  # fmt: skip
                continue
            self._stored_params[name] = text
            fresh.append(Param(name, text))
        for start in range(0, len(fresh), MAX_PARAMS_PER_REQUEST):
            chunk = fresh[start : start + MAX_PARAMS_PER_REQUEST]
            self._put(_Op(f"{len(chunk)} params", call=lambda c=chunk: self.client.log_batch(self.run_id, params=c)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:MAX_TAG_VALUE_CHARS]) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_REQUEST):
            chunk = items[start : start + MAX_PARAMS_PER_REQUEST]
            self._put(_Op(f"{len(chunk)} tags", call=lambda c=chunk: self.client.log_batch(self.run_id, tags=c)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` (names made MLflow-legal). Returns at once; a value whose step is not
        above the last one stored or queued for that name is dropped (resume: no step stored twice)."""
        from mlflow.entities import Metric

        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"log_metrics: step must be an int >= 0, got {step!r}")
        now_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            name = legal_metric_name(key)
            try:
                number = float(value)
            except (TypeError, ValueError) as error:
                raise TypeError(f"log_metrics: {key!r} must be a number, got {type(value).__name__}") from error
            if step <= self._last_step.get(name, -1):
                self._skipped_steps += 1
                if self._skipped_steps == 1:
                    logger.info("%s at step %d is already stored in run %s; skipping steps already logged",
                                name, step, self.run_id)  # fmt: skip
                continue
            self._last_step[name] = step
            batch.append(Metric(name, number, now_ms, step))
        if batch:
            self._put(_Op(f"{len(batch)} metrics at step {step}", metrics=batch))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or folder for upload under ``artifact_path``; it is copied to a staging folder now."""
        source = Path(local_path)
        if not source.exists():
            raise FileNotFoundError(f"log_artifact: {source} does not exist")
        staged_dir = Path(tempfile.mkdtemp(dir=self._staging))
        staged = staged_dir / source.name
        if source.is_dir():
            shutil.copytree(source, staged)
        else:
            shutil.copy2(source, staged)

        def upload() -> None:
            if staged.is_dir():
                self.client.log_artifacts(self.run_id, str(staged), artifact_path=_join(artifact_path, source.name))
            else:
                self.client.log_artifact(self.run_id, str(staged), artifact_path=artifact_path)

        self._put(_Op(f"artifact {source.name}", call=upload,
                      cleanup=lambda: shutil.rmtree(staged_dir, ignore_errors=True)))  # fmt: skip

    def log_model_file(self, path: str | Path, *, metrics: Mapping[str, float] | None = None) -> None:
        """Log the model file under ``model/`` and, with ``tracking.register_model``, register it as a new
        version of ``tracking.model_name`` tagged with ``metrics`` (default: the run's latest metrics)."""
        path = Path(path)
        digest = file_sha256(path)
        self.log_artifact(path, "model")
        self.set_tags({MODEL_DIGEST_TAG: digest})  # lets `evaluate` find this run from the model file
        if not self.cfg.register_model:
            return
        source = f"{self.artifact_uri.rstrip('/')}/model"

        def register() -> None:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(self.cfg.model_name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            if metrics is not None:
                tags = dict(metrics)
            else:  # the run's latest headline metrics; per-layer statistics stay on the run
                latest = self.client.get_run(self.run_id).data.metrics
                tags = {k: v for k, v in latest.items() if not k.startswith("grad/")}
            tags = {legal_metric_name(k): str(v) for k, v in tags.items()}
            tags["model_file"] = path.name
            tags[MODEL_DIGEST_TAG] = digest
            version = self.client.create_model_version(self.cfg.model_name, source=source, run_id=self.run_id,
                                                       tags=tags, await_creation_for=0)  # fmt: skip
            logger.info("registered %s version %s", self.cfg.model_name, version.version)

        self._put(_Op(f"register {self.cfg.model_name}", call=register))

    def set_model_version_tags(self, tags: Mapping[str, Any]) -> None:
        """Tag every registered model version made from this run (e.g. with the evaluation metrics)."""

        def tag() -> None:
            versions = self.client.search_model_versions(f"run_id='{self.run_id}'")
            for version in versions:
                for key, value in tags.items():
                    self.client.set_model_version_tag(version.name, version.version, legal_metric_name(key), str(value))

        self._put(_Op(f"{len(tags)} model version tags", call=tag))

    def log_dataset(self, shards: str, *, repo_root: str | Path | None = None, context: str = "train") -> None:
        """Record the shards as the run's input dataset: source = the shard folder, digest = the manifest's
        sha256, profile = sample counts and DVC hashes (``shard_dataset_profile``)."""
        root = Path(repo_root) if repo_root is not None else self.repo_root
        try:
            profile = shard_dataset_profile(shards, root)
        except (OSError, ValueError) as error:
            logger.warning("could not read the shard manifest of %s for the run's dataset: %s", redact_uri(shards),
                           redact_uri(str(error)))  # fmt: skip
            return
        profile["manifest"] = redact_uri(profile["manifest"])
        location = redact_uri(shards) if "://" in shards else str((root / shards).resolve())

        def log() -> None:
            from mlflow.entities import DatasetInput, InputTag

            dataset = _shard_dataset(location, profile)
            self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                              [InputTag("mlflow.data.context", context)])])  # fmt: skip

        self._put(_Op(f"dataset {location}", call=log))

    def log_run_metadata(
        self,
        params: Mapping[str, Any],
        *,
        world_size: int,
        device_type: str,
        shards: str | None = None,
    ) -> None:
        """Everything the issue asks a run to record once: the flattened params, world size and device type
        (tags, which may change on resume), and the shards as the input dataset. The git commit is set
        when the run is created."""
        self.log_params(params)
        self.set_tags({"world_size": world_size, "device_type": device_type})
        if shards:
            self.log_dataset(shards)

    # ---------------------------------------------------------------- flushing
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued item is stored, at most ``timeout_s`` (default: flush_timeout_s).
        Returns False (and logs what is left) if the store did not take everything in time."""
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._ops or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        pending = sum(len(op.metrics) or 1 for op in self._ops) + int(self._busy)
                        logger.error("MLflow store %s: %d queued items (metrics, artifacts...) not stored after %g s",
                                     self.uri, pending, timeout_s)  # fmt: skip
                        return False
                    self._cond.wait(timeout=min(remaining, 0.5))
            finally:
                self._flushing -= 1
        return True

    def close(self, status: str | None = "FINISHED", timeout_s: float | None = None) -> bool:
        """Flush, mark the run ``status`` (FINISHED, FAILED, KILLED; None: leave it), stop the sender."""
        if self._closed:
            return True
        if status:
            self._put(_Op(f"end run ({status})", call=lambda: self.client.set_terminated(self.run_id, status)))
        stored = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(timeout=1.0)
        if stored:
            shutil.rmtree(self._staging, ignore_errors=True)
        atexit.unregister(self._atexit)
        return stored

    def _atexit(self) -> None:
        if not self._closed and (self._ops or self._busy):
            logger.warning("flushing MLflow before exit (close() was not called)")
            self.flush(min(self.flush_timeout_s, 30.0))

    # ---------------------------------------------------------------- the sender thread
    def _put(self, op: _Op) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"tracker for run {self.run_id} is closed")
            self._ops.append(op)
            self._cond.notify_all()

    def _take(self) -> _Op | None:
        """Pop the next unit (cond held): one call op, or leading metric ops merged up to the request limit."""
        if not self._ops:
            return None
        if self._ops[0].call is not None:
            return self._ops.popleft()
        first = self._ops.popleft()
        merged = list(first.metrics)
        limit = MAX_METRICS_PER_REQUEST
        while self._ops and self._ops[0].call is None and len(merged) + len(self._ops[0].metrics) <= limit:
            merged.extend(self._ops.popleft().metrics)
        if len(merged) > MAX_METRICS_PER_REQUEST:  # one call larger than a request: split it, keep the rest queued
            rest = merged[MAX_METRICS_PER_REQUEST:]
            merged = merged[:MAX_METRICS_PER_REQUEST]
            self._ops.appendleft(_Op(f"{len(rest)} metrics", metrics=rest))
        return _Op(f"{len(merged)} metrics", metrics=merged)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if not self._ops and self._closed:
                    return
                small = all(op.call is None for op in self._ops) and sum(len(op.metrics) for op in self._ops) < 200
                if small and not self._flushing and not self._closed:
                    self._cond.wait(timeout=_LINGER_S)  # let a few steps accumulate into one request
                op = self._take()
                if op is None:
                    continue
                self._busy = True
            try:
                self._send_with_retry(op)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send_with_retry(self, op: _Op) -> None:
        delay, failures, started = _BACKOFF_FIRST_S, 0, time.monotonic()
        while True:
            try:
                if op.call is not None:
                    op.call()
                else:
                    self.client.log_batch(self.run_id, metrics=op.metrics)
            except Exception as error:  # classified below: transient -> retry, permanent -> report and drop
                if not _is_transient(error):
                    logger.error("MLflow store %s rejected %s: %s", self.uri, op.description, _short(error))
                    break
                failures += 1
                if failures == 1:
                    logger.warning("MLflow store %s unavailable (%s); buffering and retrying", self.uri, _short(error))
                if self._stop.wait(delay):
                    logger.error("MLflow store %s: gave up on %s at close", self.uri, op.description)
                    break
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            if failures:
                logger.warning("MLflow store %s is back after %.1f s; sending the buffered items",
                               self.uri, time.monotonic() - started)  # fmt: skip
            break
        if op.cleanup is not None:
            op.cleanup()


# ------------------------------------------------------------------------------------------- helpers
def _is_transient(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code not in _PERMANENT_ERROR_CODES
    if isinstance(error, OSError):  # connection refused/reset, timeouts (requests' errors are OSErrors)
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy comes with mlflow
        return False
    return isinstance(error, OperationalError)  # e.g. "database is locked"


def _short(error: Exception) -> str:
    """The first line of ``error``, at most 300 characters, URIs redacted: for log lines and messages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return redact_uri(text)[:300]


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:MAX_PARAM_VALUE_CHARS]


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _shard_dataset(location: str, profile: dict[str, Any]):
    """An ``mlflow.data`` dataset that carries only metadata: where the shards are, the manifest digest,
    and a profile with counts and DVC hashes."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the registry warns that a local path fits several source types
        source = resolve_dataset_source(location)
    name = Path(urllib.parse.urlparse(location).path).name or "shards"
    return ShardDataset(source, name=name, digest=profile["manifest_sha256"][:16])
