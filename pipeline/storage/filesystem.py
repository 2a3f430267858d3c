"""One filesystem layer for every location the pipeline reads or writes: fsspec, with s3fs for ``s3://``.

A location is a local path (absolute, or relative to the working directory), a ``file://`` URL, an
``s3://bucket/key`` URL, or any other URL an installed fsspec implementation understands. Shards, the
manifest, checkpoints, the run folder, the model file and the inputs of ``evaluate`` / ``predict`` all go
through ``filesystem(url) -> (fs, path)``; Ray gets the same implementation wrapped for pyarrow
(``arrow_filesystem``: ``pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))``, the pattern of Ray's docs).

Credentials never come from the params or a URL: ``s3://key:secret@bucket`` is refused. The S3 client reads
them as every AWS tool does, from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` with ``~/.aws/credentials`` and ``~/.aws/config``, or an instance role. An S3-compatible
server (MinIO, the local moto server) is selected with ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.

The S3 client's timeouts, retries and caching are in ``pipeline.storage.s3``.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.tracking.uris import redact_uri

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the first one set wins, as in botocore


class StorageError(ValueError):
    """A location that cannot be used (refused credentials, unreachable endpoint, a key in the URL...);
    the message names the URL (redacted) and the endpoint."""


def is_url(location: str | Path) -> bool:
    """True for ``scheme://...`` (``file://`` included); False for a plain local path."""
    return "://" in str(location)


def is_local(location: str | Path) -> bool:
    """True for a plain path or a ``file://`` URL."""
    text = str(location)
    return not is_url(text) or text.startswith("file://")


def absolute(location: str | Path, root: str | Path | None = None) -> str:
    """A URL unchanged; a local path made absolute against ``root`` (default: the working directory)."""
    text = str(location)
    if is_url(text):
        return text
    return str((Path(root or Path.cwd()) / text).resolve())


def join(location: str, *names: str) -> str:
    """``location/name/...`` for a path or a URL (``/`` separated; a trailing ``/`` is not doubled)."""
    return "/".join([str(location).rstrip("/"), *(n.strip("/") for n in names)])


def endpoint() -> str | None:
    """The S3 endpoint the environment selects (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``), or None."""
    for name in ENDPOINT_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def describe(location: str) -> str:
    """``location`` for a message: redacted, and for ``s3://`` with the endpoint it goes to."""
    shown = redact_uri(str(location))
    if str(location).startswith("s3://"):
        shown += f" (endpoint {redact_uri(endpoint() or 'AWS default')})"
    return shown


def check_no_credentials(location: str) -> None:
    """Refuse a URL that carries a user or key (``s3://key:secret@bucket``): credentials come from the
    environment or the AWS files only, so they never reach params, logs, checkpoints or MLflow."""
    if not is_url(location):
        return
    netloc = urllib.parse.urlsplit(str(location)).netloc
    if "@" in netloc:
        raise StorageError(
            f"{redact_uri(location)}: credentials in a storage URL are not accepted; give them as "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials"
        )


def filesystem(location: str | Path) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a local path or URL.

    Local paths (relative ones against the working directory) and ``file://`` give fsspec's
    ``LocalFileSystem`` and an absolute path; ``s3://bucket/key`` gives the shared ``S3FileSystem`` (see the
    module docstring) and ``bucket/key``; other URLs whatever fsspec has for their protocol.

    Raises:
        StorageError: a URL with credentials in it, or a protocol no installed package implements.
    """
    text = str(location)
    check_no_credentials(text)
    if is_local(text):
        path = text[len("file://") :] if text.startswith("file://") else text
        return LocalFileSystem(), str(Path(path).resolve())
    protocol = text.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        from pipeline.storage.s3 import s3_filesystem  # imports s3fs and botocore: only when used

        return s3_filesystem(endpoint()), text.split("://", 1)[1].rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as error:
        raise StorageError(f"{redact_uri(text)}: no filesystem for {protocol}:// ({error})") from None
    return fs, path


def arrow_filesystem(location: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path)`` for Ray's ``RunConfig(storage_filesystem=..., storage_path=...)``.

    A local path stays on pyarrow's ``LocalFileSystem`` (what Ray uses for a plain path); a URL gets this
    module's fsspec filesystem wrapped in ``pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))``, so
    Ray's uploads and the driver's own reads go through one implementation. Ray is handed no URL, so a
    key could never appear in its logs or run state.
    """
    import pyarrow.fs

    fs, path = filesystem(location)
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
