"""ssd_core is a pure PyTorch library: it imports only torch, numpy and the standard library."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ssd_core

PACKAGE_DIR = Path(ssd_core.__file__).parent
ALLOWED_ROOTS = {"torch", "numpy", "ssd_core"} | set(sys.stdlib_module_names)
FORBIDDEN = ("pipeline", "ray", "mlflow", "webdataset", "dvc", "omegaconf")


def _imported_roots(source: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_checker_sees_a_forbidden_import():
    assert "ray" in _imported_roots("import os\nfrom ray import train\n")
    assert "mlflow" in _imported_roots("def f():\n    import mlflow.pytorch\n")


def test_ssd_core_sources_import_only_torch_numpy_and_stdlib():
    offenders = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        bad = _imported_roots(path.read_text()) - ALLOWED_ROOTS
        if bad:
            offenders[str(path.relative_to(PACKAGE_DIR.parent))] = sorted(bad)
    assert not offenders, f"ssd_core must not import these: {offenders}"


@pytest.mark.slow
def test_importing_every_ssd_core_module_loads_no_pipeline_dependency():
    parts = [p.relative_to(PACKAGE_DIR).with_suffix("").parts for p in sorted(PACKAGE_DIR.rglob("*.py"))]
    modules = [".".join(("ssd_core", *(part for part in path if part != "__init__"))) for path in parts]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "", f"importing ssd_core loaded: {loaded.stdout.strip()}"
