"""The benchmarks call the project's functions as they are now.

Most benchmarks take minutes on real data, so the suite does not run them; a renamed or removed keyword in
``pipeline`` or ``ssd_core`` would leave them broken until someone next measured. This check reads each
benchmark's source and binds every call of a function or class it imports from ``pipeline``, ``ssd_core``,
``tests`` or the ``benchmarks/_*.py`` helpers to that object's current signature (``inspect.Signature.bind``,
with placeholders for the values): a keyword that no longer exists, a missing required argument or too many
positional arguments fails here, naming the benchmark and line.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
OURS = ("pipeline", "ssd_core", "tests", "_raccoon", "_torchvision_reference")  # the last two: benchmarks/ helpers
sys.path.append(str(REPO / "benchmarks"))  # as ``python benchmarks/x.py`` has it, for the helpers


def _imported_callables(tree: ast.Module) -> dict[str, object]:
    """Local name -> the object, for ``from <ours>... import name [as alias]`` at any level of the file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            module = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(module, alias.name, None)  # None: a submodule (``from pipeline.x import y``)
                if callable(value):
                    names[alias.asname or alias.name] = value
    return names


def _problems(path: Path) -> tuple[int, list[str]]:
    """(calls checked, one line per call that does not bind)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = _imported_callables(tree)
    checked, problems = 0, []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue  # *args or **kwargs: the count is not known from the source
        target = imported[node.func.id]
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue  # a builtin without a signature
        try:
            signature.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
        except TypeError as error:
            problems.append(f"{path.name}:{node.lineno}: {node.func.id}(...): {error}")
        checked += 1
    return checked, problems


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_every_call_of_our_code_binds_to_its_current_signature(path):
    _, problems = _problems(path)
    assert not problems, "\n".join(problems)


def test_the_check_sees_the_calls_and_catches_a_stale_keyword(tmp_path):
    checked, problems = _problems(REPO / "benchmarks" / "bench_loader_core.py")
    assert checked == 3  # raccoon_shards, train_loader, AugmentOptions
    stale = tmp_path / "stale.py"
    stale.write_text(
        "from pipeline.shards.loader import train_loader\n"
        "train_loader('s', rank=0, world_size=1, batch_size=8, image_size=300, augment=None, seed=0,\n"
        "             num_workers=0)\n"
    )
    _, problems = _problems(stale)
    assert len(problems) == 1 and "stale.py:2: train_loader" in problems[0], problems
