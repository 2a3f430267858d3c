"""The end of a training job in MLflow: the model file logged as an MLflow model and registered as a new version.

``publish_model`` runs once, on the driver, after training wrote the model file: it logs the MLflow model
(``pipeline.serving.model_log.log_pyfunc``) to the job's run and registers it as a new version of
``tracking.model_name`` with the alias ``challenger`` (``pipeline.serving.registry``). The version's tags
say what it was made from:

==================  ====================================================================================
``data_digest``     sha256 of the shard manifest the job trained on
``params_digest``   sha256 of the job's params as recorded in MLflow (sorted JSON, URIs redacted)
``git_commit``      the repository's HEAD when the job ran (``git_dirty``: tracked files had changes)
``model_sha256``    sha256 of the model file (``evaluate`` finds the run and version by it)
==================  ====================================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import TrackingConfig
from pipeline.tracking.metadata import file_sha256, git_commit
from pipeline.tracking.mlflow_tracker import MODEL_DIGEST_TAG
from pipeline.tracking.runs import connect
from pipeline.tracking.uris import TrackingError, redact_uri

logger = logging.getLogger(__name__)

LOCK_FILE = "requirements.lock"  # at the repository root: the pins the MLflow model's requirements come from


class Published(NamedTuple):
    model_id: str  # the MLflow 3 LoggedModel (models:/<model_id>)
    version: str | None  # the registered version; None with tracking.register_model=false


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of ``params`` as sorted JSON: equal params give equal digests, whatever their key order."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def version_tags(model_file: Path, params: Mapping[str, Any], data_digest: str, repo_root: Path) -> dict[str, str]:
    """The tags of the logged model and its registered version (module docstring)."""
    tags = {
        "data_digest": data_digest,
        "params_digest": params_digest(params),
        MODEL_DIGEST_TAG: file_sha256(model_file),
    }
    commit = git_commit(repo_root)
    if commit:
        tags["git_commit"], tags["git_dirty"] = commit[0], str(commit[1]).lower()
    return tags


def publish_model(
    cfg: TrackingConfig,
    *,
    repo_root: Path,
    run_id: str,
    model_file: Path,
    params: Mapping[str, Any],
    data_digest: str,
    credentials: Mapping[str, str] | None = None,
    lock: Path | None = None,
) -> Published:
    """Log ``model_file`` (trained with ``params`` on data ``data_digest``) to run ``run_id`` as an MLflow
    model and, with ``cfg.register_model``, register it as a new version of ``cfg.model_name`` (``challenger``).

    ``lock``: the requirements lock to pin from (default ``repo_root/requirements.lock``).

    Raises:
        TrackingError: the store refused or could not be reached (the model file itself is unaffected).
    """
    from pipeline.serving.model_log import log_pyfunc
    from pipeline.serving.registry import register_version

    uri, client = connect(cfg, repo_root, credentials)
    tags = version_tags(model_file, params, data_digest, repo_root)
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        model_id = log_pyfunc(
            client,
            experiment_id=experiment_id,
            run_id=run_id,
            model_file=model_file,
            params=params,
            lock=lock if lock is not None else repo_root / LOCK_FILE,
            tags=tags,
        )
        version = None
        if cfg.register_model:
            version = register_version(client, cfg.model_name, model_id=model_id, run_id=run_id, tags=tags)
    except (OSError, ValueError) as error:
        raise TrackingError(redact_uri(f"MLflow model of {model_file} in {uri}: {error}")) from error
    except Exception as error:  # MlflowException and the store's own errors: name the store
        raise TrackingError(
            redact_uri(f"MLflow model of {model_file} in {uri}: {type(error).__name__}: {error}")
        ) from error
    return Published(model_id, version)
