"""The one way this package writes a file: a reader sees the old file or the whole new one, never a torn one.

The bytes go to a temporary file in the target's own folder (so the rename never crosses file systems),
named ``.<name>.<pid>-<token>.tmp``; it is flushed and fsynced, renamed over the target with
``os.replace``, and the folder is fsynced so that the rename itself survives a power cut. On any failure
the temporary file is removed and the target is left as it was.

``overwrite=False`` publishes with ``os.link`` instead, which never replaces an existing file (it raises
``FileExistsError`` and the existing file keeps its bytes): for folders the pipeline did not create, where
an existing file is the user's.

``AtomicFile`` is the same protocol for writers that want a stream (the WebDataset shard writer);
``write_bytes_atomic``, ``write_text_atomic`` and ``write_csv_atomic`` (the table built in a string buffer
first) are the everyday calls.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A fresh temporary path beside ``path``: hidden, unique to this process and call, ending in ``.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


class AtomicFile:
    """The new content of ``path``: write bytes to ``stream``, then ``commit()`` to publish or ``discard()``.

    As a context manager it commits when the block ends normally and discards on an exception. The
    temporary file is created with ``O_EXCL`` and the usual ``0o666 & ~umask`` permissions.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = True) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = temp_name(self.path)
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.stream: BinaryIO = os.fdopen(fd, "wb")

    def commit(self, *, before_rename: Callable[[Path], None] | None = None) -> None:
        """Flush and fsync the temporary file, rename it to ``path``, fsync the folder.

        ``before_rename(temp_path)`` runs once the temporary file is complete and fsynced (fault-injection
        tests kill the process there). With ``overwrite=False``, ``FileExistsError`` if ``path`` exists.
        """
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            if before_rename is not None:
                before_rename(self.temp)
            if self.overwrite:
                os.replace(self.temp, self.path)
            else:
                _link_new(self.temp, self.path)
        finally:
            self.discard()  # after a rename there is nothing left to remove; after a link, the temporary name
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Close the stream and remove the temporary file; ``path`` is untouched."""
        self.stream.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def write_bytes_atomic(
    path: str | Path, data: bytes, *, before_rename: Callable[[Path], None] | None = None, overwrite: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically and durably (module docstring); parent folders are created.

    Raises:
        FileExistsError: ``overwrite=False`` and ``path`` exists (it is left as it was).
    """
    file = AtomicFile(path, overwrite=overwrite)
    try:
        file.stream.write(data)
    except BaseException:
        file.discard()
        raise
    file.commit(before_rename=before_rename)


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = True) -> None:
    """``write_bytes_atomic`` of ``text`` encoded as UTF-8 (no newline translation: ``"\\r\\n"`` stays)."""
    write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)


def write_csv_atomic(path: str | Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
    """``header`` then ``rows`` as CSV (``csv`` module defaults: comma, ``\\r\\n`` line ends, None as an
    empty field), built in memory and written with ``write_text_atomic``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def fsync_dir(directory: str | Path) -> None:
    """Make the renames in ``directory`` durable (POSIX); a no-op where a folder cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems refuse fsync on a folder; the rename still happened
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """fsync a file some other code wrote and closed (its bytes reach the disk before it is published)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(temp: Path, path: Path) -> None:
    """Publish ``temp`` as ``path`` only if no ``path`` exists (``os.link`` fails rather than replace)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, "exists already; not replaced (the pipeline did not create it)", str(path)
        ) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: check, then rename (a race with another writer is possible here).
        if os.path.lexists(path):
            raise FileExistsError(
                errno.EEXIST, "exists already; not replaced (the pipeline did not create it)", str(path)
            ) from None
        os.replace(temp, path)
