"""The paths each stage reads and writes, taken from ``dvc.yaml``'s commands: the command line's defaults.

``dvc.yaml`` is the one place paths are named. Running a stage by hand (``python -m pipeline evaluate``) uses
the paths ``dvc repro`` would pass, read from that stage's ``cmd``, so the command line never repeats them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

DVC_FILE = Path("dvc.yaml")


def stage_options(stage: str, dvc_file: Path = DVC_FILE) -> dict[str, str]:
    """``{"--option": "value"}`` for every ``--option value`` pair in ``stage``'s ``cmd`` in ``dvc_file``.

    Empty when the file does not exist (a stage run outside the repository) or has no such stage; a
    ``dvc.yaml`` that is not a mapping of stages is a ``ValueError`` naming the file.
    """
    if not dvc_file.is_file():
        return {}
    document = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
    stages = document.get("stages") if isinstance(document, dict) else None
    if not isinstance(stages, dict):
        raise ValueError(f"{dvc_file}: expected a mapping with 'stages', got {type(document).__name__}")
    entry = stages.get(stage)
    cmd = entry.get("cmd") if isinstance(entry, dict) else None
    if not isinstance(cmd, str):
        return {}
    words = shlex.split(cmd)
    return {
        word: words[i + 1]
        for i, word in enumerate(words[:-1])
        if word.startswith("--") and not words[i + 1].startswith("-")
    }
