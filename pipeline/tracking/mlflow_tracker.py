"""The MLflow client of a training job: one run per job, every call buffered so logging never stalls a step.

How ``MlflowTracker`` behaves (where the store is and how credentials travel: ``pipeline.tracking.uris``):

* **Store.** A SQLite store has no artifact root of its own, so a new experiment is created with
  ``artifact_location`` = ``mlartifacts/<experiment>`` next to the database file. A server decides its own
  artifact root.
* **Start-up.** An HTTP(S) server is probed at ``/health`` first (``probe_server``): if it does not answer
  within ``tracking.connect_timeout_s`` a ``TrackingError`` naming the URI is raised (MLflow's own client
  would retry for minutes). MLflow's HTTP retries are turned off in this process
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless already set) because the sender retries by itself.
* **One run per job.** ``run_id=None`` creates a run; a run id (stored in the checkpoint by the training
  loop) continues that run. On continuing, the last stored step of every metric is read back, and
  ``log_metrics`` drops any value whose step is not above it: nothing is stored twice for one step,
  whatever the checkpoint interval was. Params already stored are not sent again.
* **Never blocking.** ``log_metrics``, ``log_params``, ``set_tags``, ``log_artifact``... only queue a request
  on a ``Sender`` (``pipeline.tracking.sender``), which batches metrics and retries transient failures.
  Metrics carry the time they were logged, and MLflow ignores an identical metric sent twice, so a retried
  request cannot create duplicates.
* **Unsent metrics survive a kill.** Each checkpoint carries ``pending_metrics()``; ``requeue_metrics`` sends
  them again on resume (harmless for one already stored: MLflow skips an identical metric).
* **Exit.** ``flush(timeout_s)`` waits until everything queued is stored (bounded); ``close(status)``
  flushes and ends the run. Artifacts are copied to a staging folder when logged, so the caller may delete
  or overwrite the file right away.

MLflow itself is imported inside the functions that use it: importing this module stays cheap.
"""

from __future__ import annotations

import atexit
import json
import logging
import posixpath
import re
import shutil
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig, flatten
from pipeline.tracking.metadata import file_sha256, shard_dataset_profile
from pipeline.tracking.runs import StoredRun, connect, continue_run, create_run, experiment_id
from pipeline.tracking.sender import Sender
from pipeline.tracking.uris import TrackingError, is_http, redact_uri, run_page_url

logger = logging.getLogger(__name__)

MAX_PARAMS_PER_REQUEST = 100  # MLflow's log_batch limit for params and for tags
MAX_PARAM_VALUE_CHARS = 6000  # MLflow 3 param value limit
MAX_TAG_VALUE_CHARS = 8000
MAX_NAME_CHARS = 250  # MLflow key length limit
DEFAULT_FLUSH_TIMEOUT_S = 120.0
MODEL_DIGEST_TAG = "model_sha256"  # run tag: sha256 of the model file logged by log_model_file
GRAD_METRIC_PREFIX = "grad_"  # keys of the gradient statistics (pipeline.training.grad_stats): run-only metrics
_ATEXIT_FLUSH_MAX_S = 30.0  # an interpreter exiting without close() waits at most this long for the queue
_PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "INVALID_REQUEST",
}
_ILLEGAL_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def legal_metric_name(name: str) -> str:
    """An MLflow-legal metric/param key: letters, digits, ``_ - . /`` and spaces; no empty, ``.`` or ``..``
    path segment; at most 250 characters. Other characters become ``_``."""
    cleaned = _ILLEGAL_NAME_CHARS.sub("_", str(name))
    parts = [p if p not in (".", "..") else "_" for p in cleaned.split("/") if p != ""]
    legal = "/".join(parts) or "_"
    legal = legal[:MAX_NAME_CHARS].rstrip("/")
    assert posixpath.normpath(legal) == legal, legal
    return legal


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
        self.flush_timeout_s = flush_timeout_s
        self.uri, self.client = connect(cfg, self.repo_root, credentials)  # the URI without userinfo
        try:
            location = _artifact_location(self.uri, cfg.experiment)
            self.experiment_id = experiment_id(self.client, cfg.experiment, location)
            if run_id:
                stored = continue_run(self.client, self.uri, run_id, resume_status)
            else:
                stored = StoredRun(create_run(self.client, self.experiment_id, run_name, self.repo_root), {}, {})
            self.run_id = stored.run_id
            self.artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        except TrackingError:
            raise
        except Exception as error:  # start-up talks to the store synchronously: name it in the error
            message = redact_uri(f"MLflow tracking store {self.uri}: {type(error).__name__}: {error}")
            raise TrackingError(message) from error
        self._last_step = stored.last_step  # metric -> highest step stored or queued: a resume sends no step twice
        self._stored_params = stored.params  # param -> value stored or queued: MLflow params are immutable
        self._skipped_steps = 0
        self._staging = Path(tempfile.mkdtemp(prefix="ssd-mlflow-staging-"))
        self._sender = Sender(
            self._send_metrics, is_transient=_is_transient, store=self.uri, name=f"tracker for run {self.run_id}"
        )
        atexit.register(self._atexit)
        page = f"; its page: {run_page_url(self.uri, self.experiment_id, self.run_id)}" if is_http(self.uri) else ""
        logger.info("MLflow run %s in experiment %r at %s%s", self.run_id, cfg.experiment, self.uri, page)

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
                    logger.warning(
                        "param %s changed on resume (%r -> %r); MLflow keeps the first value", name, stored, text
                    )
                continue
            self._stored_params[name] = text
            fresh.append(Param(name, text))
        for start in range(0, len(fresh), MAX_PARAMS_PER_REQUEST):
            chunk = fresh[start : start + MAX_PARAMS_PER_REQUEST]
            self._sender.put_call(f"{len(chunk)} params", lambda c=chunk: self.client.log_batch(self.run_id, params=c))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags (values as text, cut to MLflow's limit); a tag set again takes the new value."""
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:MAX_TAG_VALUE_CHARS]) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_REQUEST):
            chunk = items[start : start + MAX_PARAMS_PER_REQUEST]
            self._sender.put_call(f"{len(chunk)} tags", lambda c=chunk: self.client.log_batch(self.run_id, tags=c))

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
                    message = "%s at step %d is already stored in run %s; skipping steps already logged"
                    logger.info(message, name, step, self.run_id)
                continue
            self._last_step[name] = step
            batch.append(Metric(name, number, now_ms, step))
        if batch:
            self._sender.put_metrics(batch, f"{len(batch)} metrics at step {step}")

    def pending_metrics(self) -> list[list[Any]]:
        """The metrics queued or in flight, ``[key, value, timestamp_ms, step]`` each, oldest first, bounded."""
        return [[m.key, float(m.value), int(m.timestamp), int(m.step)] for m in self._sender.pending_metrics()]

    def requeue_metrics(self, items: list[list[Any]]) -> None:
        """Queue an earlier tracker's ``pending_metrics()`` again, timestamps kept; ``log_metrics`` skips their steps.

        An already stored one is not stored twice: the SQL store's ``log_batch`` (also behind ``mlflow server``)
        skips a metric identical in key, value, timestamp and step."""
        from mlflow.entities import Metric

        batch = [Metric(str(k), float(v), int(t), int(s)) for k, v, t, s in items]
        for metric in batch:
            self._last_step[metric.key] = max(self._last_step.get(metric.key, -1), metric.step)
        if batch:
            self._sender.put_metrics(batch, f"{len(batch)} metrics unsent at the checkpoint")

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

        self._sender.put_call(
            f"artifact {source.name}", upload, cleanup=lambda: shutil.rmtree(staged_dir, ignore_errors=True)
        )

    def log_model_file(
        self, path: str | Path, *, metrics: Mapping[str, float] | None = None, register: bool = True
    ) -> None:
        """Log the model file under ``model/`` and, with ``register`` and ``tracking.register_model``, register
        it as a new version of ``tracking.model_name`` tagged with ``metrics`` (default: the run's latest
        metrics). ``train`` registers the MLflow model instead (``pipeline.serving.publish``): register=False."""
        path = Path(path)
        digest = file_sha256(path)
        self.log_artifact(path, "model")
        self.set_tags({MODEL_DIGEST_TAG: digest})  # lets `evaluate` find this run from the model file
        if not (register and self.cfg.register_model):
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
            else:  # the run's latest headline metrics; gradient statistics stay on the run
                latest = self.client.get_run(self.run_id).data.metrics
                tags = {k: v for k, v in latest.items() if not k.startswith(GRAD_METRIC_PREFIX)}
            tags = {legal_metric_name(k): str(v) for k, v in tags.items()}
            tags |= {"model_file": path.name, MODEL_DIGEST_TAG: digest}
            version = self.client.create_model_version(
                self.cfg.model_name, source=source, run_id=self.run_id, tags=tags, await_creation_for=0
            )
            logger.info("registered %s version %s", self.cfg.model_name, version.version)

        self._sender.put_call(f"register {self.cfg.model_name}", register)

    def set_model_version_tags(self, tags: Mapping[str, Any]) -> None:
        """Tag every registered model version made from this run (e.g. with the evaluation metrics)."""

        def tag() -> None:
            versions = self.client.search_model_versions(f"run_id='{self.run_id}'")
            for version in versions:
                for key, value in tags.items():
                    self.client.set_model_version_tag(version.name, version.version, legal_metric_name(key), str(value))

        self._sender.put_call(f"{len(tags)} model version tags", tag)

    def log_dataset(self, shards: str, *, repo_root: str | Path | None = None, context: str = "train") -> None:
        """Record the shards as the run's input dataset: source = the shard folder, digest = the manifest's
        sha256, profile = sample counts and DVC hashes (``shard_dataset_profile``)."""
        root = Path(repo_root) if repo_root is not None else self.repo_root
        try:
            profile = shard_dataset_profile(shards, root)
        except (OSError, ValueError) as error:
            logger.warning(
                "could not read the shard manifest of %s for the run's dataset: %s",
                redact_uri(shards),
                redact_uri(str(error)),
            )
            return
        profile["manifest"] = redact_uri(profile["manifest"])
        location = redact_uri(shards) if "://" in shards else str((root / shards).resolve())

        def log() -> None:
            from mlflow.entities import DatasetInput, InputTag

            dataset = _shard_dataset(location, profile)
            self.client.log_inputs(
                self.run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
            )

        self._sender.put_call(f"dataset {location}", log)

    def log_run_metadata(
        self,
        params: Mapping[str, Any],
        *,
        world_size: int,
        device_type: str,
        shards: str | None = None,
    ) -> None:
        """What a run records once per job: the flattened params, world size and device type (tags, which
        may change on resume), and the shards as the input dataset. The git commit is set when the run is
        created."""
        self.log_params(params)
        self.set_tags({"world_size": world_size, "device_type": device_type})
        if shards:
            self.log_dataset(shards)

    # ---------------------------------------------------------------- flushing
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued item is stored, at most ``timeout_s`` (default: flush_timeout_s).
        Returns False (and logs what is left) if the store did not take everything in time."""
        return self._sender.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def close(self, status: str | None = "FINISHED", timeout_s: float | None = None) -> bool:
        """Flush, mark the run ``status`` (FINISHED, FAILED, KILLED; None: leave it), stop the sender."""
        if self._sender.closed:
            return True
        if status:
            self._sender.put_call(f"end run ({status})", lambda: self.client.set_terminated(self.run_id, status))
        stored = self._sender.close(self.flush_timeout_s if timeout_s is None else timeout_s)
        if stored:
            shutil.rmtree(self._staging, ignore_errors=True)
        atexit.unregister(self._atexit)
        return stored

    def _atexit(self) -> None:
        if not self._sender.closed and self._sender.pending:
            logger.warning("flushing MLflow before exit (close() was not called)")
            self.flush(min(self.flush_timeout_s, _ATEXIT_FLUSH_MAX_S))

    def _send_metrics(self, batch: list[Any]) -> None:
        """One ``log_batch`` request of ``batch`` (``mlflow.entities.Metric``, at most 1000): the sender's call."""
        self.client.log_batch(self.run_id, metrics=batch)


# ------------------------------------------------------------------------------------------- helpers
def _is_transient(error: Exception) -> bool:
    """Whether a failed request is worth retrying: MLflow errors other than a rejection of the request
    itself, connection errors and timeouts, and SQLite's "database is locked"."""
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


def _param_text(value: Any) -> str:
    """A param value as MLflow stores it: JSON for lists and dicts, cut to MLflow's value limit."""
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:MAX_PARAM_VALUE_CHARS]


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/<experiment>`` next to a SQLite database
    (which has no artifact root of its own); None (the store decides) for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///") :])
    return (database.parent / "mlartifacts" / legal_metric_name(experiment).replace("/", "_")).as_uri()


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def _shard_dataset(location: str, profile: dict[str, Any]):
    """An ``mlflow.data`` dataset that carries only metadata: where the shards are, the manifest digest,
    and a profile with counts and DVC hashes (``shard_dataset_profile``)."""
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
