"""pipeline.tracking as a package: the names the rest of the repository imports, and a light import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pipeline.tracking

REPO = Path(__file__).resolve().parents[3]


def _names_imported_from_the_package() -> dict[str, str]:
    """``{name: file}`` for every ``from pipeline.tracking import name`` in pipeline/, tests/ and benchmarks/
    (a submodule, ``from pipeline.tracking import metadata``, left out)."""
    submodules = {path.stem for path in (REPO / "pipeline" / "tracking").glob("*.py")}
    found = {}
    for folder in ("pipeline", "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module == "pipeline.tracking":
                    where = str(path.relative_to(REPO))
                    found.update({alias.name: where for alias in node.names if alias.name not in submodules})
    return found


def test_every_name_imported_from_the_package_is_exported():
    imported = _names_imported_from_the_package()
    assert {"create_tracker", "redact_uri", "detach_credentials", "find_run_by_tag"} <= set(imported)  # the scan works
    missing = {name: where for name, where in imported.items() if name not in pipeline.tracking.__all__}
    assert not missing, f"imported from pipeline.tracking but not exported: {missing}"
    assert all(hasattr(pipeline.tracking, name) for name in pipeline.tracking.__all__)


def test_importing_the_package_loads_neither_mlflow_nor_an_http_client():
    code = (
        "import sys, pipeline.tracking\n"
        "print(','.join(m for m in ('mlflow', 'sqlalchemy', 'fsspec', 'urllib.request', 'ssl') if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "", f"importing pipeline.tracking loaded: {loaded.stdout.strip()}"
