"""torchvision as a benchmark reference only: ``.bench`` (``make bench-deps``) behind the CPU shim.

Call ``require_torchvision(script)`` before importing anything from torchvision. It puts ``.bench`` and
``../shared/tools`` on ``sys.path``, imports ``torchvision_cpu_shim`` (which must precede torchvision), and
exits with the install command when either is missing. Never import this from project code.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def require_torchvision(script: str) -> None:
    sys.path[:0] = [str(REPO / ".bench"), str(REPO.parent / "shared" / "tools")]
    try:
        importlib.import_module("torchvision_cpu_shim")  # must come first: it patches torch for torchvision
        importlib.import_module("torchvision")
    except ImportError as error:
        sys.exit(
            f"{script}: torchvision is needed as the reference ({error}). Install it for benchmarks only with\n"
            "    make bench-deps   (pip install --no-deps --target .bench torchvision==0.28.0)\n"
            "and keep ../shared/tools/torchvision_cpu_shim.py in place."
        )
