"""``models:/name@alias`` (or ``models:/name/3``): the model file inside a registered MLflow model.

``predict`` and ``export`` (``--model``) and training (``model.init_from``) take a model file or a registry
URI. For a URI, the alias is resolved to its version, the MLflow model's ``MLmodel`` is read to find its
``model_file`` artifact (``pipeline.serving.model_log``), and only that file is downloaded into a fresh
temporary folder (or the caller's); the caller loads it like any model file. The store is ``tracking.uri``
(or ``MLFLOW_TRACKING_URI``, else the project's ``mlflow.db``), with the same credentials handling as
training: the URI's userinfo, else the ``credentials`` given (a Ray worker's, from ``TrainJob``), else
MLflow's variables of this process.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import yaml

from pipeline.config import TrackingConfig
from pipeline.tracking.uris import TrackingError, default_tracking_uri, is_http, probe_server, use_credentials

MODELS_SCHEME = "models:/"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


def is_model_uri(text: str | Path) -> bool:
    """Whether ``text`` names a registered model (``models:/...``) rather than a file."""
    return str(text).startswith(MODELS_SCHEME)


class RegisteredFile(NamedTuple):
    """A registered model's file, downloaded: where it is, and the version the URI named or its alias pointed at."""

    path: Path
    name: str
    version: str

    @property
    def pinned_uri(self) -> str:
        """``models:/NAME/VERSION``: this file's version, whatever the alias points at later."""
        return f"{MODELS_SCHEME}{self.name}/{self.version}"


def check_model_uri(uri: str, key: str = "--model") -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of ``models:/name@alias`` or ``models:/name/<version>``; ``key`` names the
    option or param in the message.

    Raises:
        ValueError: any other form, with the two accepted ones named.
    """
    match = _URI.match(uri)
    if not match:
        raise ValueError(f"{key} {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION, or a model file")
    return match["name"], match["alias"], match["version"]


def download_model_file(uri: str, cfg: TrackingConfig, repo_root: Path) -> Path:
    """The model file of the registered model ``uri``, downloaded into a new temporary folder (its parent).

    Raises:
        ValueError: a malformed URI, or a registered model without a ``model_file`` artifact.
        TrackingError: the store does not answer, or has no such model, alias or version.
    """
    return download_registered(uri, cfg, repo_root).path


def download_registered(
    uri: str,
    cfg: TrackingConfig,
    repo_root: str | Path,
    *,
    credentials: Mapping[str, str] | None = None,
    key: str = "--model",
    into: Path | None = None,
) -> RegisteredFile:
    """The model file of the registered model ``uri`` and the version it is, downloaded into ``into`` (default: a
    new temporary folder). ``credentials``: MLflow's credential variables for the store (module docstring);
    ``key`` names the option or param in messages.

    Raises:
        ValueError: a malformed URI, or a registered model without a ``model_file`` artifact.
        TrackingError: the store does not answer, or has no such model, alias or version (the URI named).
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, number = check_model_uri(uri, key)
    store = use_credentials(default_tracking_uri(repo_root, cfg.uri), credentials)
    if is_http(store):
        probe_server(store, cfg.connect_timeout_s)
    target = Path(into) if into is not None else Path(tempfile.mkdtemp(prefix="ssd-registered-model-"))
    try:
        # Resolved here with a client of this store: MLflow's models:/ artifact repository asks the
        # process-wide registry URI instead.
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        if str(version.source).startswith(MODELS_SCHEME):  # models:/<model id>: a LoggedModel (MLflow 3)
            location = client.get_logged_model(version.source.removeprefix(MODELS_SCHEME)).artifact_location
        else:
            location = client.get_model_version_download_uri(name, version.version)
        location = location.rstrip("/")
        mlmodel = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location}/MLmodel", dst_path=str(target), tracking_uri=store
        )
        flavor = (yaml.safe_load(Path(mlmodel).read_text()) or {}).get("flavors", {}).get("python_function", {})
        relative = ((flavor.get("artifacts") or {}).get("model_file") or {}).get("path")
        if not relative:
            raise ValueError(f"{key} {uri}: the MLflow model has no model_file artifact (not logged by train)")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location}/{relative}", dst_path=str(target), tracking_uri=store
        )
    except MlflowException as error:
        raise TrackingError(f"{key} {uri}: {error.message}") from error
    return RegisteredFile(Path(local), name, str(version.version))
