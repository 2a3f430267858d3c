"""Check that the running Python environment matches ``requirements.lock`` (run at the end of the image build).

    python infra/docker/check_lock.py requirements.lock --require-cuda cu128

Fails (exit 1, one line per problem) when
  - a distribution the project needs at run time (``ssd-pipeline``'s requirements, their requirements and so
    on, extras followed) has another version than the lock pins (``torch 2.13.0+cu128`` matches the pin
    ``torch==2.13.0``: PEP 440 ignores the local label when the pin has none);
  - a runtime requirement of the installed project (extras such as [dev] excluded) is missing or unmet;
  - ``--require-cuda cuXYZ`` is given and torch is not a CUDA X.YZ build (``cu128`` means CUDA 12.8).
Not problems: what the lock does not list (the nvidia-* wheels of CUDA torch, the base image's own tools such
as conda), and pins of what the project does not need at run time (the dev tools).

The lock itself must be pip-compile's hashed format (read_locked): a malformed entry is an error, not a skip.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PROJECT = "ssd-pipeline"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#\\]+)$")
_HASH = re.compile(r"^--hash=sha256:([0-9a-f]{64})$")
_EXPECTED = "expected 'name==version' followed by '--hash=sha256:<64 hex digits>' options"


class LockedPin(NamedTuple):
    """One entry of the lock: the exact version and the sha256 digests of the files pip may install for it."""

    version: str
    hashes: tuple[str, ...]  # hex digests, in the lock's order; empty only in a lock without hashes
    line: int  # where the entry starts in the file (1-based), for messages


def read_locked(path: Path) -> dict[str, LockedPin]:
    """Entries of a pip-compile lock -> {canonical name: LockedPin}.

    The lock is pip's requirements format as ``pip-compile --generate-hashes`` writes it: one entry per package,
    ``name==version`` and its ``--hash=sha256:...`` options joined by backslash continuations, and comments
    (``# via ...``) on lines of their own. Anything else (another operator, another option, a second entry for
    the same name) is refused with its line, because ``pip install --require-hashes`` would install something
    other than what the lock seems to say.
    """
    pins: dict[str, LockedPin] = {}
    entry, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not entry:
            start = number
        if line.endswith("\\"):
            entry += line[:-1] + " "
            continue
        entry += line
        if entry.strip():
            name, pin = _parse_entry(entry, f"{path}:{start}")
            if name in pins:
                raise ValueError(f"{path}:{start}: {name} pinned twice (first on line {pins[name].line})")
            pins[name] = pin._replace(line=start)
        entry = ""
    if entry.strip():
        raise ValueError(f"{path}:{start}: the last entry ends with a backslash, got {entry!r}")
    return pins


def _parse_entry(entry: str, where: str) -> tuple[str, LockedPin]:
    first, *options = entry.split()
    match = _PIN.match(first)
    if match is None:
        raise ValueError(f"{where}: {_EXPECTED}, got {entry!r}")
    hashes = []
    for option in options:
        digest = _HASH.match(option)
        if digest is None:
            raise ValueError(f"{where}: {_EXPECTED}, got {option!r} in {first}")
        hashes.append(digest.group(1))
    return canonicalize_name(match.group(1)), LockedPin(match.group(2), tuple(hashes), 0)


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of every entry of the lock (see read_locked)."""
    return {name: pin.version for name, pin in read_locked(path).items()}


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution importable from this interpreter."""
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(canonicalize_name(name), dist.version)
    return versions


def runtime_closure(project: str = PROJECT) -> set[str]:
    """Canonical names of the installed distributions ``project`` needs at run time, transitively.

    Follows each requirement's extras (``ray[default,train]`` brings ray's "default" and "train" requirements)
    and skips requirements whose markers do not hold here. Requirements that are not installed end the walk
    on that branch; requirement_problems reports the project's own.
    """
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(project), frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {name for name, _ in seen} - {canonicalize_name(project)}


def lock_problems(pins: dict[str, str], installed: dict[str, str], only: set[str] | None = None) -> list[str]:
    """Installed distributions (of ``only``, when given) whose version does not satisfy their pin."""
    problems = []
    for name, pinned in sorted(pins.items()):
        if only is not None and name not in only:
            continue
        have = installed.get(name)
        if have is not None and not SpecifierSet(f"=={pinned}").contains(have, prereleases=True):
            problems.append(f"{name}: requirements.lock pins {pinned}, installed {have}")
    return problems


def requirement_problems(requirements: Iterable[str], installed: dict[str, str]) -> list[str]:
    """Runtime requirements (no extras markers) that are missing or unmet."""
    problems = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra such as [dev], or another platform
        have = installed.get(canonicalize_name(req.name))
        if have is None:
            problems.append(f"{req.name}: required by {PROJECT} ({text}), not installed")
        elif not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name}: required by {PROJECT} ({text}), installed {have}")
    return problems


def cuda_problems(expected: str) -> list[str]:
    """``expected`` like ``cu128``: torch must be a CUDA 12.8 build."""
    import torch

    built = torch.version.cuda
    got = "cpu" if not built else "cu" + "".join(built.split(".")[:2])
    if got != expected:
        return [f"torch: expected a {expected} build, got torch {torch.__version__} ({got})"]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="requirements.lock")
    parser.add_argument("--require-cuda", metavar="cuXYZ", help="torch must be built for this CUDA, e.g. cu128")
    args = parser.parse_args(argv)

    installed = installed_versions()
    problems = lock_problems(read_lock(args.lock), installed, only=runtime_closure())
    try:
        problems += requirement_problems(metadata.requires(PROJECT) or [], installed)
    except metadata.PackageNotFoundError:
        problems.append(f"{PROJECT}: the project itself is not installed")
    if args.require_cuda:
        problems += cuda_problems(args.require_cuda)

    for problem in problems:
        print(f"check_lock: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_lock: the project's runtime dependencies match {args.lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
