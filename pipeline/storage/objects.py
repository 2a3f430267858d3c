"""Whole-file reads and writes, listings, moves and deletes at any location of ``filesystem``.

Writes publish a file completely or not at all. A local file goes through ``write_bytes_atomic``
(temporary file, fsync, rename); an object store gets the whole object in one PUT (``pipe_file``), which S3
makes visible only once it is complete, so a reader never sees half an object either. Nothing here
creates folders on an object store: they are key prefixes and exist while an object is under them.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from fsspec.implementations.local import LocalFileSystem

from pipeline.artifacts.atomic_write import write_bytes_atomic
from pipeline.storage.filesystem import filesystem, join

_COPY_CHUNK = 8 << 20  # bytes per read when streaming a file


class Entry(NamedTuple):
    name: str  # base name inside the listed folder
    is_dir: bool
    size: int  # bytes; 0 for a folder


def read_bytes(location: str | Path) -> bytes:
    """The whole file; ``FileNotFoundError`` when there is none."""
    fs, path = filesystem(location)
    return fs.cat_file(path)


def put_bytes(location: str | Path, data: bytes) -> None:
    """Publish ``data`` at ``location`` whole: atomically on a local disk, one PUT on an object store."""
    fs, path = filesystem(location)
    if isinstance(fs, LocalFileSystem):
        write_bytes_atomic(Path(path), data)
    else:
        fs.pipe_file(path, data)


def put_file(local_path: str | Path, location: str | Path) -> None:
    """Copy a local file to ``location`` (a local copy is atomic, an upload is one object)."""
    fs, path = filesystem(location)
    if isinstance(fs, LocalFileSystem):
        write_bytes_atomic(Path(path), Path(local_path).read_bytes())
    else:
        fs.put_file(str(local_path), path)


def open_read(location: str | Path) -> Any:
    """A binary, seekable file object for reading (close it, or use ``with``)."""
    fs, path = filesystem(location)
    return fs.open(path, "rb")


def exists(location: str | Path) -> bool:
    """A file, or a folder (on an object store: a prefix with at least one object under it)."""
    fs, path = filesystem(location)
    return fs.exists(path)


def is_dir(location: str | Path) -> bool:
    fs, path = filesystem(location)
    return fs.isdir(path)


def size(location: str | Path) -> int:
    """Bytes of the file; ``FileNotFoundError`` when there is none."""
    fs, path = filesystem(location)
    return int(fs.size(path))


def list_folder(location: str | Path) -> list[Entry]:
    """The entries directly inside a folder, sorted by name; an empty list when it does not exist."""
    fs, path = filesystem(location)
    try:
        infos = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    entries = []
    for info in infos:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info["name"].rstrip("/") == path.rstrip("/"):
            continue  # some stores list the folder itself
        kind = info.get("type")
        entries.append(Entry(name, kind == "directory", int(info.get("size") or 0) if kind != "directory" else 0))
    return sorted(entries)


def delete_tree(location: str | Path) -> None:
    """Delete a folder and everything under it (or one file)."""
    fs, path = filesystem(location)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return
    fs.rm(path, recursive=True)


def move(source: str | Path, target: str | Path) -> None:
    """Move a file or folder. Local: one rename. Object store: copy every object, then delete the sources
    (S3 has no rename); an interrupted move leaves both copies, never neither."""
    fs, path = filesystem(source)
    _, target_path = filesystem(target)
    if isinstance(fs, LocalFileSystem):
        Path(path).rename(target_path)
        return
    if fs.isdir(path):
        for name in fs.find(path):
            fs.copy(name, join(target_path, name[len(path.rstrip("/")) + 1 :]))
        fs.rm(path, recursive=True)
    else:
        fs.copy(path, target_path)
        fs.rm(path)


def sha256_of(location: str | Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    length = 0
    with open_read(location) as handle:
        while chunk := handle.read(_COPY_CHUNK):
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length
