"""Opening an MLflow store and a run in it: the tracker's synchronous start-up, and finding a run again.

Everything here talks to the store directly and at once (a failure surfaces to the caller), unlike the
tracker's logging calls, which go through the background ``Sender``. MLflow is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import TrackingConfig
from pipeline.tracking.metadata import git_commit, user
from pipeline.tracking.uris import (
    TrackingError,
    default_tracking_uri,
    is_http,
    probe_server,
    redact_uri,
    use_credentials,
)

logger = logging.getLogger(__name__)

_HTTP_TIMEOUT_S = 30  # per request once started (MLflow's default is 120 s)
# The experiment tag MLflow 3's UI reads to choose its view (mlflow/server/js: "mlflow.experimentKind"); without it
# the UI infers a kind and may open a training experiment in the GenAI view, listing runs as "Evaluation runs".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"  # the UI's "machine learning" (model training) view


class StoredRun(NamedTuple):
    """A run as the store holds it when a tracker starts: what it must not send again."""

    run_id: str
    last_step: dict[str, int]  # metric key -> highest step stored
    params: dict[str, str]  # param key -> value as stored


def connect(cfg: TrackingConfig, repo_root: Path, credentials: Mapping[str, str] | None) -> tuple[str, Any]:
    """``(uri, MlflowClient)`` for the store of ``cfg`` (``default_tracking_uri``), the URI without userinfo.

    The credentials (the URI's userinfo, else ``credentials``) become MLflow's variables of this process. An
    HTTP(S) server is probed first and MLflow's own HTTP retries are turned off (the sender retries); a SQLite
    store's folder is created.

    Raises:
        TrackingError: a server that does not answer within ``cfg.connect_timeout_s``.
    """
    uri = use_credentials(default_tracking_uri(repo_root, cfg.uri), credentials)
    if is_http(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        request_timeout = max(_HTTP_TIMEOUT_S, math.ceil(cfg.connect_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout))
        probe_server(uri, cfg.connect_timeout_s)
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)

    from mlflow.tracking import MlflowClient

    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``: created (with ``artifact_location``, None: the store's default) if
    missing, restored if deleted, and marked as a model-training experiment (``EXPERIMENT_KIND_TAG``) unless
    it already says what kind it is."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT}
            )
        except Exception:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)
    return experiment.experiment_id


def create_run(client: Any, experiment: str, run_name: str, repo_root: Path) -> str:
    """A new run in ``experiment`` tagged with its source, user and git commit (and whether tracked files
    had uncommitted changes at start); returns its id."""
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": "python -m pipeline train", "mlflow.user": user()}
    commit = git_commit(repo_root)
    if commit:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["git_dirty"] = str(commit[1]).lower()
    run = client.create_run(experiment, run_name=run_name, tags=tags)
    return run.info.run_id


def continue_run(client: Any, uri: str, run_id: str, resume_status: str | None) -> StoredRun:
    """Run ``run_id`` (from a checkpoint) with its stored steps and params; its status is set to
    ``resume_status`` (None: left as it is).

    Raises:
        TrackingError: the run is not in the store at ``uri``, or it is deleted.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise TrackingError(
            f"MLflow run {run_id} (from the checkpoint) is not in {uri}: {redact_uri(error.message)}. "
            "Was the tracking store changed between attempts?"
        ) from error
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow run {run_id} in {uri} is deleted; restore it or start a new job")
    last_step: dict[str, int] = {}
    for metric in _latest_metrics(client, run):
        last_step[metric.key] = max(last_step.get(metric.key, -1), int(metric.step))
    if resume_status and run.info.status != resume_status:
        client.update_run(run_id, status=resume_status)
    logger.info("continuing MLflow run %s (%d metrics already stored)", run_id, len(last_step))
    return StoredRun(run_id, last_step, dict(run.data.params))


def _latest_metrics(client: Any, run: Any) -> list[Any]:
    """The newest (highest-step) value of each metric: from the run itself when it carries the steps,
    else from each metric's history."""
    objs = getattr(run.data, "_metric_objs", None)
    if objs is not None and all(hasattr(m, "step") for m in objs):
        return list(objs)
    latest = []
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        if history:
            latest.append(max(history, key=lambda m: m.step))
    return latest


def find_run_by_tag(cfg: TrackingConfig, repo_root: str | Path, key: str, value: str) -> str | None:
    """The newest run of experiment ``cfg.experiment`` tagged ``key = value`` (e.g. the run that logged a
    model file, by its sha256), or None. Raises ``TrackingError`` if an HTTP server does not answer."""
    from mlflow.tracking import MlflowClient

    uri = use_credentials(default_tracking_uri(repo_root, cfg.uri), None)
    if is_http(uri):
        probe_server(uri, cfg.connect_timeout_s)
    elif uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None  # no store yet: nothing was ever logged
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{key} = '{value}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None
