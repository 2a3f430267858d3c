"""Shared readers and checks for the offline tests of infra/ (manifests, cluster config, image, compose)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CLUSTER_YAML = INFRA / "ray" / "cluster.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
GPU_PARAMS = INFRA / "params" / "gpu_ssd300_voc.yaml"

# Environment variable names that hold credentials: their values must come from a Secret, an env file or a
# required Compose variable, never be written in a file. *_PATH / *_FILE / *_MODE name where or how, not what.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY", re.IGNORECASE)
NOT_SECRET_SUFFIX = re.compile(r"_(PATH|FILE|MODE|URI|URL)$", re.IGNORECASE)
# user:password@ inside a URL, e.g. postgresql://mlflow:hunter2@db/mlflow
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not NOT_SECRET_SUFFIX.search(name)


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path`` (yaml.safe_load_all)."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


@cache
def k8s_docs() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """(file, document) for every manifest under infra/k8s, kustomization.yaml included."""
    return tuple((path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_docs(path))


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") == kind]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in k8s_objects(kind) if doc["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} in infra/k8s, found {len(found)}"
    return found[0]


def pod_specs(node: Any) -> Iterator[dict[str, Any]]:
    """Every pod spec (a mapping with a ``containers`` list) anywhere inside ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_specs(value)


def containers(node: Any) -> Iterator[dict[str, Any]]:
    for spec in pod_specs(node):
        yield from spec["containers"]
        yield from spec.get("initContainers", [])


def strings(node: Any) -> Iterator[str]:
    """Every string value (not key) inside ``node``."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def image_tag_problem(ref: str) -> str | None:
    """Why ``ref`` is not a pinned image reference (None when it is): it needs a tag or digest, never latest."""
    if "@sha256:" in ref:
        return None
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:  # no colon, or the colon belongs to a registry port
        return f"{ref}: no tag"
    if "latest" in tag.lower() or tag.lower() in {"nightly", "master", "main", "edge", "stable"}:
        return f"{ref}: tag {tag!r} moves"
    return None


IMAGE_REF = re.compile(r"^(?P<name>[^@\s]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?$")
# The digest the files carry until the image exists (infra/README.md, section 1): no registry serves it.
PLACEHOLDER_DIGEST = "0" * 64


def image_parts(ref: str) -> tuple[str, str | None, str | None]:
    """``registry/name:tag@sha256:hex`` -> (registry/name, tag or None, hex digest or None)."""
    match = IMAGE_REF.match(ref)
    assert match, f"not an image reference: {ref!r}"
    return match["name"], match["tag"], match["digest"]


@cache
def lock_module() -> ModuleType:
    """infra/docker/check_lock.py, imported from its path (infra/ is not a package)."""
    path = INFRA / "docker" / "check_lock.py"
    spec = importlib.util.spec_from_file_location("infra_check_lock", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@cache
def lock_pins() -> dict[str, str]:
    return lock_module().read_lock(REPO / "requirements.lock")


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: instruction left open at the end: {pending!r}"
    return instructions


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Default values of every ARG (both before and after FROM), later ones substituted with earlier ones."""
    values: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            values[name.strip()] = substitute(default.strip().strip('"'), values)
    return values


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                values[name] = value
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace ``${NAME}`` / ``$NAME`` with ``values``; an unknown name fails the test."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"${name} used before it has a value"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def our_image() -> str:
    """The training image reference the Ray cluster launcher config uses (the one every manifest must use)."""
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))["docker"]["image"]
