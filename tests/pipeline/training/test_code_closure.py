"""The import closure, and the two places that depend on it: the run identity's code and dvc.yaml's deps."""

from __future__ import annotations

import modulefinder
from pathlib import Path

import pytest
import yaml

from pipeline.training.code_closure import PROJECT_PACKAGES, import_closure
from pipeline.training.job import TRAINING_CODE, TRAINING_ENTRY, code_digest

REPO = Path(__file__).resolve().parents[3]
STAGE_ENTRIES = {"train": "pipeline/stages/train.py", "evaluate": "pipeline/stages/evaluate.py"}


def _reference_closure(entry: str) -> set[str]:
    """The standard library's bytecode-scanning ``modulefinder``, searching the repository only (so it stops
    at torch, ray and the standard library): the project files that importing ``entry``'s module loads."""
    finder = modulefinder.ModuleFinder(path=[str(REPO)])
    finder.import_hook(".".join(Path(entry).with_suffix("").parts))
    files = (Path(m.__file__).resolve() for m in finder.modules.values() if m.__file__)
    return {f.relative_to(REPO).as_posix() for f in files if f.suffix == ".py"}


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("entry", [TRAINING_ENTRY, *STAGE_ENTRIES.values(), "pipeline/stages/predict.py"])
def test_closure_agrees_with_modulefinder(entry):
    assert set(import_closure([entry], REPO)) == _reference_closure(entry)


def test_closure_follows_relative_lazy_and_from_imports_and_runs_package_inits(tmp_path):
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/entry.py": "import os\nfrom . import sibling\n\ndef later():\n    from pkg.sub.deep import x\n",
            "pkg/sibling.py": "from .sub import helper as _h\nfrom pkg.sub.helper import name\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/helper.py": "name = 1\n",
            "pkg/sub/deep.py": "import other.thing\nx = 1\n",
            "pkg/unused.py": "",
            "other/thing.py": "",
        },
    )
    assert import_closure(["pkg/entry.py"], root, packages=("pkg",)) == (
        "pkg/__init__.py",
        "pkg/entry.py",
        "pkg/sibling.py",
        "pkg/sub/__init__.py",
        "pkg/sub/deep.py",
        "pkg/sub/helper.py",
    )
    assert "other/thing.py" in import_closure(["pkg/entry.py"], root, packages=("pkg", "other"))


def test_closure_refuses_an_entry_outside_the_packages(tmp_path):
    _write(tmp_path, {"elsewhere/x.py": ""})
    with pytest.raises(ValueError, match=r"expected a \.py file under .* got 'elsewhere/x\.py'"):
        import_closure(["elsewhere/x.py"], tmp_path)


def test_training_code_is_the_closure_of_the_worker_loop():
    assert TRAINING_CODE == tuple(sorted(_reference_closure(TRAINING_ENTRY)))
    assert "pipeline/shards/jpeg.py" in TRAINING_CODE  # the loader's decoder decides the pixels a run trains on
    assert "pipeline/sources/images.py" not in TRAINING_CODE  # prepare's reader: training does not import it
    assert "pipeline/training/launcher.py" not in TRAINING_CODE  # the driver: how a run starts, not what it computes


def test_a_decoder_change_changes_the_code_digest(tmp_path, monkeypatch):
    import pipeline

    for entry in TRAINING_CODE:
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry).write_bytes((REPO / entry).read_bytes())
    monkeypatch.setattr(pipeline, "__file__", str(tmp_path / "pipeline" / "__init__.py"))
    before = code_digest()
    assert code_digest() == before  # deterministic
    jpeg = tmp_path / "pipeline" / "shards" / "jpeg.py"
    jpeg.write_text(jpeg.read_text() + "\n# changed\n")
    assert code_digest() != before


def _covered(dep: str) -> set[str]:
    """The Python files a ``dvc.yaml`` dep stands for: a file itself, a folder every ``.py`` under it."""
    path = REPO / dep
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return {f.relative_to(REPO).as_posix() for f in files}


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_dvc_stage_deps_are_exactly_the_code_its_entry_imports(stage):
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code_deps = [d for d in deps if Path(d).parts[0] in PROJECT_PACKAGES]
    closure = set(import_closure([STAGE_ENTRIES[stage]], REPO))
    listed = set().union(*(_covered(d) for d in code_deps))
    unlisted, unused = sorted(closure - listed), sorted(listed - closure)
    assert not unlisted, f"dvc.yaml {stage}: {STAGE_ENTRIES[stage]} imports these, add them to deps: {unlisted}"
    assert not unused, f"dvc.yaml {stage}: {STAGE_ENTRIES[stage]} never imports these, drop them: {unused}"
    absent = [d for d in code_deps if not (REPO / d).exists()]
    assert not absent, f"dvc.yaml {stage}: deps that do not exist: {absent}"
