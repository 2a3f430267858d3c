"""Tracking-store URIs: where the store is, how its credentials travel, and how a URI is shown.

* **Where.** ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``
  (``default_tracking_uri``). Relative SQLite paths and bare folders are made absolute against the
  repository root, on the driver, before workers see them (``resolve_tracking_uri``).
* **Credentials.** A URI's ``user:password@`` is split off before anything sees the URI
  (``split_credentials``): the URI without it is what is logged, stored in the params and checkpoints and
  handed to MLflow, and the credentials go to MLflow's own variables ``MLFLOW_TRACKING_USERNAME`` and
  ``MLFLOW_TRACKING_PASSWORD`` in the process that talks to the server (``detach_credentials`` on the
  driver; ``TrainJob.tracking_credentials`` carries them to the Ray worker).
* **Shown.** Any other text that may hold a URI (a storage URL, an error message) passes through
  ``redact_uri`` before it is logged or recorded; ``redact_params`` does so for a whole params dict.
* **Reachable.** ``probe_server`` checks an HTTP(S) server's ``/health`` within a bounded time, so a
  missing server fails fast with its URI named instead of after MLflow's own minutes of retries.

Light by design: the launcher, the job and the checkpoints import redaction from here, so this module
imports neither MLflow nor anything heavier than the standard library at import time.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Mapping, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Params

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
_PROBE_ATTEMPT_MAX_S = 5.0  # one /health request waits at most this long; the probe retries until its deadline
_PROBE_PAUSE_S = 0.5  # between two /health attempts


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable, unknown run); the message names the URI."""


# ------------------------------------------------------------------------------------------- redaction
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


# ------------------------------------------------------------------------------------------- credentials
def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``(uri without its userinfo, {MLFLOW_TRACKING_USERNAME: user, MLFLOW_TRACKING_PASSWORD: password})``;
    percent-escapes in the userinfo are decoded. A URI without userinfo comes back unchanged with ``{}``."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    found = {
        "MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(user),
        "MLFLOW_TRACKING_PASSWORD": urllib.parse.unquote(password),
    }
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


def use_credentials(uri: str, credentials: Mapping[str, str] | None) -> str:
    """``uri`` without its userinfo; the userinfo, else ``credentials``, set as MLflow's credential variables
    of this process (MLflow reads them for every request; a worker gets them from ``TrainJob``)."""
    clean, found = split_credentials(uri)
    os.environ.update(found or credentials or {})
    return clean


# ------------------------------------------------------------------------------------------- location
def default_tracking_uri(repo_root: str | Path, uri: str = "") -> str:
    """``uri`` (tracking.uri) if set, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<abs repo>/mlflow.db``;
    a relative SQLite path is resolved against ``repo_root``."""
    chosen = uri or os.environ.get(TRACKING_URI_VAR, "") or "sqlite:///mlflow.db"
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


TRAINING_VIEW = "workflowType=machine_learning"
"""MLflow 3.17's UI picks its GenAI or model-training pages from this query parameter (then remembers the choice in
the browser), not from the experiment's ``mlflow.experimentKind`` tag."""


def run_page_url(server: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the UI of tracking server ``server`` (its userinfo dropped), in the model-training view."""
    return f"{split_credentials(server)[0].rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def is_http(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (probed, retried) rather than a local store."""
    return uri.startswith(("http://", "https://"))


def probe_server(uri: str, timeout_s: float) -> None:
    """Raise ``TrackingError`` naming ``uri`` unless ``GET <uri>/health`` answers within ``timeout_s``."""
    import urllib.error
    import urllib.request  # here, not at the top: it loads http.client and ssl, which redaction never needs

    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with urllib.request.urlopen(url, timeout=max(0.1, min(remaining, _PROBE_ATTEMPT_MAX_S))) as response:
                if response.status == 200:
                    return
                last = RuntimeError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as error:
            last = error
        time.sleep(min(_PROBE_PAUSE_S, max(0.0, deadline - time.monotonic())))
    raise TrackingError(
        redact_uri(
            f"MLflow tracking server {uri} is unreachable (no answer from {url} within {timeout_s:g} s: {last}). "
            "Start it, fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false."
        )
    )
