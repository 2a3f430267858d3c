"""Registered versions of the model, and the aliases that say which one to use: ``challenger`` and ``champion``.

* Every training job registers its MLflow model as a new version of ``tracking.model_name``
  (``register_version``), tagged with what it was made from (``data_digest``, ``params_digest``,
  ``git_commit``, ``model_sha256``) and given the alias ``challenger``.
* ``evaluate`` tags the version with its validation metrics and the digest of the validation data it was
  scored on (``VAL_DIGEST_TAG``), then ``consider_champion`` moves ``champion`` to it only when its
  ``CHAMPION_METRIC`` beats the current champion's on the same validation data; otherwise it says why not.
  The champion therefore only improves, as long as it is compared like with like.
* ``promote`` moves ``champion`` by hand (``python -m pipeline promote NAME@VERSION``) and records who did it,
  why and which version it replaced, in tags of the new champion.

Every function talks to the store at once through the ``MlflowClient`` it is given.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
CHAMPION_METRIC = "val/map_voc07"  # the SSD paper's number, and the default run's target
VAL_DIGEST_TAG = "val_data_digest"  # sha256 of the validation shards a version's val/* metrics come from
DECISION_TAG = "champion_decision"  # why evaluate did or did not make this version the champion


class Decision(NamedTuple):
    """What ``consider_champion`` did: whether ``champion`` now points at the version, and why."""

    promoted: bool
    reason: str


def register_version(client: Any, name: str, *, model_id: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Register the LoggedModel ``model_id`` (``models:/<model_id>``) as a new version of ``name`` (created if
    missing), tag it with ``tags``, point ``challenger`` at it, and link the version from the LoggedModel (the
    tag ``mlflow.modelVersions``, as ``mlflow.register_model`` does); returns the version number as text."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # A SQLite registry looks the LoggedModel up through the process-wide tracking URI (mlflow's own
    # register_model sets it), not through this client's store: point it at this store for the call.
    with _use_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            await_creation_for=0,
            model_id=model_id,
        )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    links.append({"name": name, "version": version.version})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    logger.info("registered %s version %s (alias %s)", name, version.version, CHALLENGER)
    return str(version.version)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The ``ModelVersion`` that ``name@alias`` points at, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def consider_champion(client: Any, name: str, version: str, *, value: float, data_digest: str) -> Decision:
    """Point ``champion`` at ``name`` version ``version`` if its ``CHAMPION_METRIC`` ``value``, measured on the
    validation data ``data_digest``, beats the current champion's on the same data (or there is no champion).

    The decision and its reason are stored on the version (``DECISION_TAG``) and logged.
    """
    current = alias_version(client, name, CHAMPION)
    shown = f"{CHAMPION_METRIC} {value:.4f}"
    if current is None:
        decision = Decision(True, f"version {version} is the first champion of {name} ({shown})")
    elif str(current.version) == str(version):
        decision = Decision(True, f"version {version} is already the champion ({shown})")
    else:
        decision = _compare(current, version, value, data_digest)
    if decision.promoted and (current is None or str(current.version) != str(version)):
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, DECISION_TAG, decision.reason)
    (logger.info if decision.promoted else logger.warning)("champion: %s", decision.reason)
    return decision


def _compare(current: Any, version: str, value: float, data_digest: str) -> Decision:
    """Whether ``version`` (``value`` on ``data_digest``) beats the champion ``current``, and why (not)."""
    tags = dict(current.tags or {})
    theirs = tags.get(VAL_DIGEST_TAG)
    mine = f"{CHAMPION_METRIC} {value:.4f}"
    if theirs is None or CHAMPION_METRIC not in tags:
        return Decision(
            False,
            f"not promoted: champion version {current.version} has no {CHAMPION_METRIC} on recorded validation "
            f"data to compare with; evaluate it on the same data, or promote by hand "
            f"(python -m pipeline promote {current.name}@{version})",
        )
    if theirs != data_digest:
        return Decision(
            False,
            f"not promoted: version {version} was evaluated on validation data {data_digest[:12]}, champion version "
            f"{current.version} on {theirs[:12]}; mAPs on different data do not compare (evaluate both on the "
            f"same shards, or promote by hand)",
        )
    best = float(tags[CHAMPION_METRIC])
    if value > best:
        return Decision(True, f"version {version} beats champion version {current.version}: {mine} > {best:.4f}")
    return Decision(
        False,
        f"not promoted: version {version}'s {mine} does not beat champion version {current.version}'s "
        f"{best:.4f} on the same validation data",
    )


def promote(client: Any, name: str, version: str, *, user: str, reason: str) -> str | None:
    """Point ``champion`` at ``name`` version ``version`` unconditionally; tag the version with who did it,
    when, why and which version was champion before. Returns that previous version (None if none).

    Raises:
        MlflowException: the version does not exist (RESOURCE_DOES_NOT_EXIST).
    """
    client.get_model_version(name, version)  # raises when there is no such version
    previous = alias_version(client, name, CHAMPION)
    before = str(previous.version) if previous is not None else None
    client.set_registered_model_alias(name, CHAMPION, version)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    tags = {
        "promoted_by": user,
        "promoted_reason": reason,
        "promoted_at": now,
        "promoted_from": before or "none",
        DECISION_TAG: f"promoted by hand by {user}: {reason}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    logger.info("promote: %s version %s is the champion (was %s), by %s: %s", name, version, before, user, reason)
    return before
