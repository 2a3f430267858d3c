"""The S3 client behind ``s3://`` locations: s3fs with bounded timeouts and retries, one per environment.

Requests are bounded so that a wrong endpoint fails within seconds, not minutes: ``CONNECT_TIMEOUT_S`` per
connection attempt and ``MAX_ATTEMPTS`` attempts in botocore's standard retry mode, and s3fs's own retry
loop (timeouts, dropped connections) shortened to ``S3FS_RETRIES``. Listings are never cached: Ray workers
and other processes write into the same prefixes.

One filesystem is kept per (endpoint, fingerprint of the credential variables, process), so a changed
environment (another key, another endpoint) gets a new client, never a stale cached one. The instance
pickles without secrets (its constructor takes none): where it is unpickled, e.g. on a Ray worker, the
credentials are read from that process's environment and AWS files.
"""

from __future__ import annotations

import hashlib
import os
import threading

import s3fs

CONNECT_TIMEOUT_S = 3.0  # per TCP connect to the object store
READ_TIMEOUT_S = 60.0  # per response (a large ranged read on a slow link still fits)
MAX_ATTEMPTS = 3  # botocore "standard" retry mode: the first try and two retries
S3FS_RETRIES = 2  # s3fs's own attempts on timeouts and dropped connections (its default is 5)
# Variables that decide which credentials the client signs with (their values are only hashed here).
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)

_cache: dict[tuple[str, str, int, int], s3fs.S3FileSystem] = {}
_cache_lock = threading.Lock()


class BoundedS3FileSystem(s3fs.S3FileSystem):
    """``S3FileSystem`` whose own retry loop gives up after ``S3FS_RETRIES`` attempts."""

    retries = S3FS_RETRIES


def s3_filesystem(endpoint_url: str | None, *, attempts: int = MAX_ATTEMPTS) -> s3fs.S3FileSystem:
    """The filesystem for ``endpoint_url`` (None: AWS) and the credentials the environment selects now;
    ``attempts`` per request in botocore's standard retry mode (the preflight uses fewer)."""
    state = "\0".join(f"{name}={os.environ.get(name, '')}" for name in CREDENTIAL_VARS)
    key = (endpoint_url or "", hashlib.sha256(state.encode()).hexdigest(), os.getpid(), attempts)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = BoundedS3FileSystem(
                endpoint_url=endpoint_url,
                config_kwargs={
                    "connect_timeout": CONNECT_TIMEOUT_S,
                    "read_timeout": READ_TIMEOUT_S,
                    "retries": {"max_attempts": attempts, "mode": "standard"},
                },
                use_listings_cache=False,  # Ray workers write into the same prefixes: always ask
                skip_instance_cache=True,
            )
            _cache[key] = fs
    return fs
