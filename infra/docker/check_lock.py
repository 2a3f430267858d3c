"""Check that the running Python environment matches ``requirements.lock`` (run at the end of the image build).

    python infra/docker/check_lock.py requirements.lock --require-cuda cu128

Fails (exit 1, one line per problem) when
  - a distribution the project needs at run time (``ssd-pipeline``'s requirements, their requirements and so
    on, extras followed) has another version than the lock pins (``torch 2.13.0+cu128`` matches the pin
    ``torch==2.13.0``: PEP 440 ignores the local label when the pin has none);
  - a runtime requirement of the installed project (extras such as [dev] excluded) is missing or unmet;
  - ``--require-cuda cuXYZ`` is given and torch is not a CUDA X.YZ build (``cu128`` means CUDA 12.8).
Not problems: what the lock does not list (the nvidia-* wheels of CUDA torch), and what the project does not
need (the base image's own tools, such as conda, may keep their versions of packages the lock pins only for
the dev tools).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PROJECT = "ssd-pipeline"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:#.*)?$")


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines of a pip-freeze style lock -> {canonical name: version}; comments skipped."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


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
