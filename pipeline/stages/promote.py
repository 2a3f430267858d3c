"""``python -m pipeline promote NAME@VERSION``: make a registered version the champion by hand.

``evaluate`` moves the alias ``champion`` only to a version that beats the current champion on the same
validation data (``pipeline.serving.registry.consider_champion``). This command moves it unconditionally,
e.g. to roll back, or to start over after the validation data changed, and records on the version who did
it (``--user``, default the login name), why (``--reason``, required), when, and which version it replaced.

The store is ``tracking.uri`` (or ``MLFLOW_TRACKING_URI``, else the project's ``mlflow.db``). Exit status:
0 done; 1 the store refused or did not answer; 2 a malformed ``NAME@VERSION``, an empty reason, or no
such version.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from pipeline.config import Params

logger = logging.getLogger(__name__)

_TARGET = re.compile(r"^(?P<name>[^@/]+)@(?P<version>\d+)$")


def main(args: argparse.Namespace, params: Params) -> int:
    from mlflow.exceptions import MlflowException

    from pipeline.serving.registry import promote
    from pipeline.tracking import TrackingError, redact_uri
    from pipeline.tracking.metadata import user
    from pipeline.tracking.runs import connect

    match = _TARGET.match(str(args.target))
    if not match:
        logger.error("promote: expected NAME@VERSION (e.g. ssd@3), got %r", args.target)
        return 2
    reason = str(args.reason).strip()
    if not reason:
        logger.error("promote: --reason must say why (it is recorded on the version)")
        return 2
    try:
        uri, client = connect(params.tracking, Path.cwd(), None)
        previous = promote(client, match["name"], match["version"], user=args.user or user(), reason=reason)
    except TrackingError as error:
        logger.error("promote: %s", error)
        return 1
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            logger.error("promote: %s has no version %s: %s", match["name"], match["version"], error.message)
            return 2
        logger.error("promote: MLflow store: %s", redact_uri(error.message))
        return 1
    logger.info(
        "promote: %s@champion is version %s (was %s); recorded in the version's promoted_* tags",
        match["name"],
        match["version"],
        previous or "none",
    )
    return 0
