"""MLflow experiment tracking: one run per training job, buffered so that logging never stalls a step.

``create_tracker`` gives rank 0 an ``MlflowTracker`` and every other rank (or a disabled config) a
``NullTracker``; both satisfy ``Tracker``, so the training loop calls them unconditionally.

The package, one idea per module:

* ``uris``: where the store is, credentials out of URIs, redaction of anything logged, the server probe.
  Light: no MLflow, so the launcher and the job import redaction from it cheaply.
* ``metadata``: what a run records about its origin: git commit, shard manifest and DVC hashes, file sha256.
* ``runs``: the synchronous start-up: connect, find or create the experiment, create or continue a run,
  find a run by tag (``evaluate`` finds the run that logged a model file).
* ``sender``: the background thread that sends queued requests in order, batched, retried while transient.
* ``mlflow_tracker``: ``MlflowTracker``, the client the loop and the stages log through.
* ``null``: the ``Tracker`` protocol and ``NullTracker``.

MLflow is imported lazily, inside the functions that talk to a store: importing this package does not
load it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.config import TrackingConfig
from pipeline.tracking.metadata import file_sha256, git_commit, shard_dataset_profile
from pipeline.tracking.mlflow_tracker import (
    DEFAULT_FLUSH_TIMEOUT_S,
    GRAD_METRIC_PREFIX,
    MODEL_DIGEST_TAG,
    MlflowTracker,
    legal_metric_name,
)
from pipeline.tracking.null import NullTracker, Tracker
from pipeline.tracking.runs import find_run_by_tag
from pipeline.tracking.sender import MAX_METRICS_PER_REQUEST
from pipeline.tracking.uris import (
    CREDENTIAL_VARS,
    TRACKING_URI_VAR,
    TrackingError,
    default_tracking_uri,
    detach_credentials,
    probe_server,
    redact_params,
    redact_uri,
    resolve_tracking_uri,
    split_credentials,
    tracking_credentials,
)

__all__ = [
    "CREDENTIAL_VARS",
    "DEFAULT_FLUSH_TIMEOUT_S",
    "GRAD_METRIC_PREFIX",
    "MAX_METRICS_PER_REQUEST",
    "MODEL_DIGEST_TAG",
    "TRACKING_URI_VAR",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "create_tracker",
    "default_tracking_uri",
    "detach_credentials",
    "file_sha256",
    "find_run_by_tag",
    "git_commit",
    "legal_metric_name",
    "probe_server",
    "redact_params",
    "redact_uri",
    "resolve_tracking_uri",
    "shard_dataset_profile",
    "split_credentials",
    "tracking_credentials",
]


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
) -> Tracker:
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
    return MlflowTracker(
        cfg,
        run_id=run_id,
        run_name=run_name,
        repo_root=repo_root,
        resume_status=resume_status,
        flush_timeout_s=flush_timeout_s,
        credentials=credentials,
    )
