"""One small object with compare-and-swap writes, on local disk or in an object store: what a lease needs.

A lease is correct only if two processes can never both believe they wrote the winning copy. So every
change here is conditional on what the writer last saw, and the store decides atomically:

- ``create(data)``: only if no object exists (locally ``link``, which refuses an existing name like
  ``O_CREAT | O_EXCL`` but publishes a complete file; in S3 ``If-None-Match: *``).
- ``replace(data, version)`` and ``delete(version)``: only if the object is still the one read as
  ``version`` (locally under an exclusive ``flock`` of the folder; in S3 ``If-Match: <ETag>``).

``version`` is opaque: S3's ETag, or locally the sha256 of the bytes. Writers put a unique token in every
document they write, so a version never comes back after it changed (no ABA).

Local disk: every operation holds ``flock`` on the object's folder for a few system calls, so a reader
never sees a half-written file and a read-compare-write is one step. ``flock`` serialises processes and
threads on one host (and NFSv4 clients); the folder gains no lock file.

S3 (``s3fs``): conditional ``PutObject``/``DeleteObject`` (AWS S3 since 2024, MinIO, moto 5). A store that
ignores the conditions would let two jobs in; no check here can tell. Other fsspec stores get a
best-effort fallback that says so once in the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage

logger = logging.getLogger(__name__)


class VersionConflict(RuntimeError):
    """The object changed (or appeared, or vanished) since the version the caller holds."""


class Stored(NamedTuple):
    data: bytes
    version: str  # opaque; pass it to replace/delete


class ConditionalStore(Protocol):
    """One object at ``uri``; every write is atomic and conditional."""

    uri: str

    def read(self) -> Stored | None: ...

    def create(self, data: bytes) -> str:
        """Write ``data`` if no object exists; returns its version. Raises ``VersionConflict`` otherwise."""
        ...

    def replace(self, data: bytes, version: str) -> str:
        """Overwrite the object if it is still ``version``; returns the new version, else ``VersionConflict``."""
        ...

    def delete(self, version: str) -> None:
        """Remove the object if it is still ``version``; else ``VersionConflict`` (already gone included)."""
        ...


def open_store(uri: str) -> ConditionalStore:
    """The conditional store for a local path, ``file://``, ``s3://`` or another fsspec URL."""
    fs, path = storage.filesystem(uri)  # the one filesystem layer: endpoint and credentials from the environment
    if isinstance(fs, LocalFileSystem):
        return LocalStore(uri, path)
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return S3Store(uri, fs, path)
    return BestEffortStore(uri, fs, path)


# ------------------------------------------------------------------------------------------------ local
class LocalStore:
    def __init__(self, uri: str, path: str) -> None:
        self.uri = uri
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        folder = os.path.dirname(self.path) or "."
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _read(self) -> Stored | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return Stored(data, hashlib.sha256(data).hexdigest())

    @staticmethod
    def _write(data: bytes, path: str, flags: int) -> str:
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return hashlib.sha256(data).hexdigest()

    def read(self) -> Stored | None:
        with self._locked():
            return self._read()

    def create(self, data: bytes) -> str:
        with self._locked():
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            version = self._write(data, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.link(tmp, self.path)  # atomic, and refuses an existing name, like O_CREAT | O_EXCL
            except FileExistsError as error:
                raise VersionConflict(f"{self.uri} exists") from error
            finally:
                os.unlink(tmp)
            return version

    def replace(self, data: bytes, version: str) -> str:
        with self._locked():
            self._check(version)
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"  # a crash mid-write leaves this, never a torn lease
            version = self._write(data, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.replace(tmp, self.path)
            return version

    def delete(self, version: str) -> None:
        with self._locked():
            self._check(version)
            os.unlink(self.path)

    def _check(self, version: str) -> None:
        current = self._read()
        if current is None or current.version != version:
            raise VersionConflict(f"{self.uri} changed since it was read")


# ------------------------------------------------------------------------------------------------- S3
def _precondition_failed(error: BaseException) -> bool:
    """s3fs turns S3's ``412 PreconditionFailed`` into ``FileExistsError`` (If-None-Match) or EINVAL."""
    if isinstance(error, FileExistsError):
        return True
    cause = error.__cause__
    response = getattr(cause, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code == "PreconditionFailed" or status == 412


class S3Store:
    def __init__(self, uri: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.uri = uri
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs):
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except OSError as error:
            if _precondition_failed(error):
                raise VersionConflict(f"{self.uri} changed since it was read") from error
            raise

    def read(self) -> Stored | None:
        # HEAD, then GET: the body is at least as new as the ETag, so a document judged stale from the body
        # belongs to an ETag at least as stale; a replace conditional on that ETag cannot overwrite a newer one.
        try:
            etag = self._call("head_object")["ETag"]
            data = self.fs.cat_file(f"{self.bucket}/{self.key}")
        except FileNotFoundError:
            return None
        return Stored(data, etag)

    def create(self, data: bytes) -> str:
        return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]

    def replace(self, data: bytes, version: str) -> str:
        try:
            return self._call("put_object", Body=data, IfMatch=version)["ETag"]
        except FileNotFoundError as error:
            raise VersionConflict(f"{self.uri} is gone") from error

    def delete(self, version: str) -> None:
        try:
            self._call("delete_object", IfMatch=version)
        except FileNotFoundError as error:
            raise VersionConflict(f"{self.uri} is gone") from error


# ---------------------------------------------------------------------------------------- other stores
class BestEffortStore:
    """Read, compare, then write: two writers within one round trip of each other can both succeed."""

    def __init__(self, uri: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.uri = uri
        self.fs = fs
        self.path = path
        logger.warning(
            "%s: this storage has no conditional writes known to the run-folder lease; two jobs starting "
            "within a second of each other could both take it",
            fs.protocol,
        )

    def read(self) -> Stored | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return Stored(data, hashlib.sha256(data).hexdigest())

    def create(self, data: bytes) -> str:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError as error:
            raise VersionConflict(f"{self.uri} exists") from error
        return hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, version: str) -> str:
        current = self.read()
        if current is None or current.version != version:
            raise VersionConflict(f"{self.uri} changed since it was read")
        self.fs.pipe_file(self.path, data)
        return hashlib.sha256(data).hexdigest()

    def delete(self, version: str) -> None:
        current = self.read()
        if current is None or current.version != version:
            raise VersionConflict(f"{self.uri} changed since it was read")
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError as error:
            raise VersionConflict(f"{self.uri} is gone") from error
