"""Names that come from data (manifests, ImageSets lists, COCO JSON) and are joined to a folder.

Such a name is input like any other: ``../outside.tar`` in a manifest or ``../../outside/evil`` in an
ImageSets list would lead out of the folder it is meant to be in. Each check returns why a name is refused
("" when it is fine), so callers can count or raise with their own context.
"""

from __future__ import annotations

import re

_DRIVE = re.compile(r"^[A-Za-z]:")  # "C:\\..." or "C:/...": absolute on Windows


def plain_name_problem(name: str) -> str:
    """Why ``name`` is not a plain file name inside one folder: empty, ``.`` or ``..``, or holding a ``/``,
    ``\\`` (a separator on Windows) or NUL byte."""
    if name in ("", ".", ".."):
        return f"{name!r} is not a file name"
    for char, what in (("/", "'/'"), ("\\", "'\\'"), ("\0", "a NUL byte")):
        if char in name:
            return f"{name!r} holds {what}"
    return ""


def relative_path_problem(name: str) -> str:
    """Why ``name`` is not a relative path that stays below its folder (subfolders allowed): empty, holding a
    NUL byte, absolute (POSIX, UNC or a drive letter) or with a ``..`` part (either slash)."""
    if not name:
        return "empty path"
    if "\0" in name:
        return f"{name!r} holds a NUL byte"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return f"{name!r} is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return f"{name!r} has a '..' part"
    return ""
