"""Before any work starts: can the object store behind a location be reached with the credentials we have?

``check_reachable(location, role)`` lists at most one key under the location (a read that needs the same
signature as every later request) and turns what goes wrong into a ``StorageError`` naming the role (the
option or params key), the URL (redacted) and the endpoint, within ``PREFLIGHT_TIMEOUT_S``:

- a wrong or unknown key, or a policy that refuses the bucket: ``credentials refused``;
- no credentials at all: ``no credentials found``, with where they are looked for;
- nothing listening, or no answer: ``cannot reach the endpoint``;
- no such bucket: ``no bucket``.

Local paths are not checked here: the stages check their own inputs (a missing manifest, a missing model
file) with messages of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from pipeline.storage.filesystem import StorageError, describe, endpoint, filesystem, is_local
from pipeline.tracking.uris import redact_uri

PREFLIGHT_TIMEOUT_S = 10.0  # the whole check, retries included; a blackholed endpoint fails at this bound
PREFLIGHT_ATTEMPTS = 2  # one retry: a refused connection or a refused key does not change on a third try


def check_reachable(location: str, role: str, *, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Raise ``StorageError`` unless the store behind ``location`` answers a signed listing in time.

    ``role`` says where the location came from (``--shards``, ``train.storage_path``) for the message.
    """
    if is_local(location):
        return
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            _list_one(location)
            outcome.append(None)
        except BaseException as error:  # handed to the caller's thread, which classifies it
            outcome.append(error)

    worker = threading.Thread(target=probe, name="storage-preflight", daemon=True)
    worker.start()
    worker.join(timeout_s)
    where = f"{role} {describe(location)}"
    if not outcome:
        raise StorageError(f"{where}: cannot reach the endpoint (no answer within {timeout_s:g} s)")
    error = outcome[0]
    if error is not None:
        raise StorageError(redact_uri(f"{where}: {_explain(error)}")) from None


def check_all(locations: Iterable[tuple[str, str]], *, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """``check_reachable`` for every ``(location, role)``; each bucket is probed once."""
    seen: set[str] = set()
    for location, role in locations:
        if is_local(location):
            continue
        bucket = location.split("://", 1)[1].split("/", 1)[0]
        if bucket in seen:
            continue
        seen.add(bucket)
        check_reachable(location, role, timeout_s=timeout_s)


def _list_one(location: str) -> None:
    fs, path = filesystem(location)
    if location.startswith(("s3://", "s3a://")):
        from pipeline.storage.s3 import s3_filesystem

        bucket, _, prefix = path.partition("/")
        quick = s3_filesystem(endpoint(), attempts=PREFLIGHT_ATTEMPTS)
        quick.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    else:
        fs.exists(path)


def _explain(error: BaseException) -> str:
    """One line on what went wrong, by the kind of failure (botocore's and s3fs's exception types)."""
    name = type(error).__name__
    text = str(error)
    if isinstance(error, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return f"credentials refused ({text}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            f"no credentials found ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
            "with ~/.aws/credentials"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
        return f"cannot reach the endpoint ({name}: {text}); check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3"
    if isinstance(error, ConnectionError | TimeoutError):
        return f"cannot reach the endpoint ({name}: {text}); check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3"
    if isinstance(error, FileNotFoundError):
        return f"no bucket ({text})"
    return f"not usable ({name}: {text})"
