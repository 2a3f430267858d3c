"""Which source files importing a module can run: the import closure, read from the code itself.

The run identity hashes the training code (``pipeline.training.job.TRAINING_CODE``) and ``dvc.yaml`` lists
each stage's code; both are derived from (or checked against) this closure, so a new module is never
left out and a module no longer imported is not kept in.

The closure is read statically with ``ast``: every ``import`` and ``from ... import`` anywhere in a file
(also inside functions, the lazy imports of the stages), resolved against the repository root and kept
when it names a module of the given top-level packages. Importing ``a.b.c`` also runs ``a/__init__.py``
and ``a/b/__init__.py``, so those are part of the closure. A name that is neither a module nor a package
(``from pipeline.config import Params``) adds nothing beyond its module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "ssd_core")  # the repository's own code; everything else is a dependency


def import_closure(entries: Iterable[str], root: Path, packages: Iterable[str] = PROJECT_PACKAGES) -> tuple[str, ...]:
    """Files that importing the modules at ``entries`` executes, within ``packages``.

    Args:
        entries: module files relative to ``root``, posix, e.g. ``("pipeline/training/loop.py",)``.
        root: the folder holding the top-level packages (the repository root).
        packages: top-level package names whose modules are followed; other imports are left out.

    Returns:
        Posix paths relative to ``root``, sorted (a stable order to hash): the entries, every project
        module they import directly or indirectly, and the ``__init__.py`` of every package on the way.

    Raises:
        ValueError: an entry that is not a ``.py`` file under one of ``packages`` in ``root``.
    """
    root = Path(root)
    packages = tuple(packages)
    seen: set[str] = set()
    todo: list[str] = []
    for entry in entries:
        path = root / entry
        parts = Path(entry).parts
        if path.suffix != ".py" or not path.is_file() or not parts or parts[0] not in packages:
            raise ValueError(f"import_closure: expected a .py file under {packages} in {root}, got {entry!r}")
        todo.append(Path(entry).as_posix())
        todo += _package_inits(root, _module_name(entry).split(".")[:-1])
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        todo += [name for name in _imported_files(root, rel, packages) if name not in seen]
    return tuple(sorted(seen))


def _module_name(rel: str) -> str:
    """``pipeline/training/loop.py -> pipeline.training.loop``; a package's ``__init__.py`` is the package."""
    parts = list(Path(rel).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_file(root: Path, dotted: list[str]) -> str | None:
    """The file of module ``dotted`` under ``root`` (module or package ``__init__``), or None."""
    base = Path(*dotted)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / candidate).is_file():
            return candidate.as_posix()
    return None


def _package_inits(root: Path, dotted: list[str]) -> list[str]:
    """The ``__init__.py`` files that importing inside package ``dotted`` runs (namespace packages have none)."""
    inits = (_module_file(root, dotted[:i]) for i in range(1, len(dotted) + 1))
    return [name for name in inits if name is not None and name.endswith("__init__.py")]


def _imported_files(root: Path, rel: str, packages: tuple[str, ...]) -> list[str]:
    """Project files that the import statements of ``rel`` execute (each with its packages' ``__init__``)."""
    tree = ast.parse((root / rel).read_bytes(), filename=rel)
    here = _module_name(rel).split(".")
    is_package = rel.endswith("__init__.py")
    modules: list[list[str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the current package, up level - 1 packages
                package = here if is_package else here[:-1]
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".")
            modules.append(base)
            modules += [[*base, alias.name] for alias in node.names if alias.name != "*"]
    files: list[str] = []
    for dotted in modules:
        if dotted and dotted[0] in packages:
            found = _module_file(root, dotted)
            if found is not None:
                files += [found, *_package_inits(root, dotted[:-1])]
    return files
