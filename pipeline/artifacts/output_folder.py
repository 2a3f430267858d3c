"""Output folders the pipeline owns: made by a stage, marked as such, and the only folders it empties.

A stage writes into a folder only when it is missing, empty, or carries the marker file
``.ssd-pipeline`` that the same stage left there: one JSON line, ``{"made_by": "ssd-pipeline", "stage":
"prepare"}``. Anything else (a folder holding the user's files, or another stage's output) is refused with
the folder named, before any work starts, so that nothing the user put there is deleted or overwritten.
On an object store (``predict --ray --out s3://...``) the marker is an object under the prefix
(``marker_stage``, ``write_marker``).

``replacing_folder`` builds a folder's new content in a hidden sibling (``.<name>.build-<pid>-<token>``)
and swaps it in once it is complete: the old folder is renamed aside, the new one renamed into place, and
only then is the old one deleted. A run that fails leaves the old folder as it was. (Between the two
renames the folder is briefly absent; a crash exactly there leaves the old content in ``.<name>.old-...``.)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pipeline.artifacts.atomic_write import fsync_dir, fsync_file, write_text_atomic

logger = logging.getLogger(__name__)

MARKER_NAME = ".ssd-pipeline"
MADE_BY = "ssd-pipeline"
_FSYNC_THREADS = 8  # fsync of many small files overlaps well; each call releases the GIL


class OutputFolderError(ValueError):
    """An output folder the pipeline may not write into or replace; the message names it and says why."""


def marker_stage(folder: str | Path) -> str | None:
    """The stage named by ``folder``'s marker file; None when there is none or it is not the pipeline's.

    ``folder`` may also be an object-store prefix (``s3://bucket/out``, through ``pipeline.storage``)."""
    try:
        if _is_url(folder):
            from pipeline import storage

            text = storage.read_bytes(storage.join(str(folder), MARKER_NAME)).decode("utf-8")
        else:
            text = (Path(folder) / MARKER_NAME).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("made_by") != MADE_BY or not isinstance(data.get("stage"), str):
        return None
    return data["stage"]


def write_marker(folder: str | Path, stage: str) -> None:
    """Mark ``folder`` (which must exist; on an object store, a prefix: one object under it) as made by
    ``stage``."""
    text = json.dumps({"made_by": MADE_BY, "stage": stage}) + "\n"
    if _is_url(folder):
        from pipeline import storage

        storage.put_bytes(storage.join(str(folder), MARKER_NAME), text.encode("utf-8"))
    else:
        write_text_atomic(Path(folder) / MARKER_NAME, text)


def _is_url(folder: str | Path) -> bool:
    return isinstance(folder, str) and "://" in folder and not folder.startswith("file://")


def check_output_folder(folder: str | Path, stage: str, *, option: str = "--out") -> None:
    """Raise unless ``folder`` is missing, an empty folder, or a folder ``stage`` marked. No side effects.

    Raises:
        OutputFolderError: ``folder`` is a file, holds files without the marker, or another stage made it.
    """
    folder = Path(folder)
    if not folder.exists():
        if folder.is_symlink():
            raise OutputFolderError(f"{option} {folder} is a broken symbolic link; expected a folder for {stage}")
        return
    if not folder.is_dir():
        raise OutputFolderError(f"{option} {folder} is a file; expected a folder for {stage}")
    found = marker_stage(folder)
    if found == stage:
        return
    if found is not None:
        raise OutputFolderError(
            f"{option} {folder} holds the output of the {found} stage ({folder / MARKER_NAME}), not of {stage}; "
            "choose another folder"
        )
    entries = sorted(p.name for p in folder.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputFolderError(
            f"{option} {folder} is not empty ({shown}) and was not made by the {stage} stage (no {MARKER_NAME} "
            "marker); refusing to write into it or replace it. Choose a new or empty folder, or move its files away"
        )


def claim_output_folder(folder: str | Path, stage: str, *, option: str = "--out") -> Path:
    """Check ``folder`` (``check_output_folder``), create it if needed and mark it as ``stage``'s."""
    folder = Path(folder)
    check_output_folder(folder, stage, option=option)
    folder.mkdir(parents=True, exist_ok=True)
    if marker_stage(folder) != stage:
        write_marker(folder, stage)
    return folder


def owns(folder: str | Path, stage: str) -> bool:
    """Whether ``folder`` carries ``stage``'s marker (so files in it are the pipeline's to replace)."""
    return marker_stage(folder) == stage


@contextmanager
def replacing_folder(folder: str | Path, stage: str, *, option: str = "--out") -> Iterator[Path]:
    """Yield an empty, marked build folder beside ``folder``; when the block completes, swap it in.

    ``folder`` is checked first (``check_output_folder``) and again just before the swap. A symbolic link
    is followed: the folder it points to is the one replaced. Every file of the build folder is fsynced
    before the swap. On an exception the build folder is deleted and ``folder`` is left as it was.
    """
    given = Path(folder)
    check_output_folder(given, stage, option=option)
    target = given.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    build = _sibling(target, "build")
    build.mkdir()
    try:
        write_marker(build, stage)
        yield build
        check_output_folder(given, stage, option=option)
        fsync_tree(build)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
    try:
        os.rename(build, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(build, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)
    _remove_leftovers(target, stage)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (so that a folder renamed into place is whole on disk)."""
    files, folders = [], []
    for root, _dirs, names in os.walk(folder):
        folders.append(root)
        files += [os.path.join(root, name) for name in names]
    with ThreadPoolExecutor(max_workers=_FSYNC_THREADS) as pool:
        list(pool.map(fsync_file, files))
    for path in reversed(folders):
        fsync_dir(path)


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_leftovers(target: Path, stage: str) -> None:
    """Delete build/old siblings of ``target`` that runs killed mid-way left behind (``stage``'s marker only)."""
    for kind in ("build", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            if path.is_dir() and not path.is_symlink() and marker_stage(path) == stage:
                logger.info("removing %s, left by an interrupted %s run", path, stage)
                shutil.rmtree(path, ignore_errors=True)
