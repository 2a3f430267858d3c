"""The house rules a newcomer relies on: files of modest size, imports that flow one way, a test per module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ssd_core", "pipeline")
MAX_LINES = 400
# A file may be longer only if one of its first lines says why.
LONG_FILE_NOTE = "# Longer than 400 lines because"

# Layers, lowest first: a module may import from its own layer or a lower one, never from a higher one.
# ``pipeline.training`` runs the job the stages start; ``pipeline.stages`` are the commands; ``cli`` parses them.
LAYERS = (
    ("ssd_core",),
    (
        "pipeline.file_names",
        "pipeline.config",
        "pipeline.config_schema",
        "pipeline.model_builder",
        "pipeline.stage_paths",
        "pipeline.artifacts",
        "pipeline.shards",
        "pipeline.sources",
        "pipeline.report",
        "pipeline.tracking",
        "pipeline.serving",
        "pipeline.storage",
    ),
    ("pipeline.training",),
    ("pipeline.stages",),
    ("pipeline.cli", "pipeline.__main__"),
)

# Modules without a mirrored tests/<package>/test_<module>.py, and where they are tested instead.
TESTED_ELSEWHERE = {
    "pipeline/artifacts/onnx_verify.py": "the onnxruntime check: artifacts/test_onnx_export.py, stages/test_export.py",
    "pipeline/config_schema.py": "every field's bounds: test_config.py and test_config_refusals.py",
    "pipeline/stages/predict_outputs.py": "the detections document and drawn copies: stages/test_predict.py",
    "pipeline/report/plots.py": "its PNGs are checked by stages/test_evaluate.py and training/test_grad_stats.py",
    "pipeline/sources/records.py": "the index every source writes: sources/test_*.py, stages/test_prepare_hostile.py",
    "pipeline/sources/report.py": "the report's counts: stages/test_prepare_hostile.py (in = kept + rejected)",
    "pipeline/stage_paths.py": "the CLI's defaults from dvc.yaml: test_cli.py",
    "pipeline/stages/check_params.py": "test_config.py and test_config_refusals.py run check-params",
    "pipeline/stages/prepare.py": "stages/test_prepare_hostile.py and sources/test_*.py run the stage's main()",
    "pipeline/stages/shard.py": "shards/test_write.py and the fixtures' prepare_and_shard run the stage",
    "pipeline/stages/train.py": "training/test_job.py (before Ray), training/test_ray.py, test_secrets.py",
    "pipeline/training/launcher.py": "needs a Ray cluster: training/test_ray.py and training/test_ray_job.py",
    "pipeline/training/loop.py": "needs Ray Train: training/test_ray.py; its parts in test_step.py, test_state.py",
    "pipeline/training/progress.py": "rank 0's progress lines: training/test_step_log.py",
    "ssd_core/augment/options.py": "the options' checks: augment/test_plan.py, test_render.py, test_config_refusals.py",
    "ssd_core/deploy.py": "the deployable network: stages/test_export.py and artifacts/test_onnx_export.py",
    "ssd_core/layers.py": "the SSD heads and L2Norm: ssd_core/test_model.py",
    "ssd_core/reference.py": "the slow references are what the fast code's tests compare against",
}


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _dotted(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    if module == "pipeline":
        return 0  # the package's __init__ imports nothing of its own
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def _imports(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of a project module in ``path``, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    dotted = _dotted(path, root)
    package = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names] or [(node.lineno, base)]
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_file_is_too_big_to_live_in(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) > MAX_LINES:
        assert any(line.startswith(LONG_FILE_NOTE) for line in lines[:10]), (
            f"{path.relative_to(REPO)}: {len(lines)} lines; split it by concern, or say why at its top "
            f"({LONG_FILE_NOTE!r})"
        )


def test_imports_never_point_up_a_layer():
    upward = []
    for path in _modules():
        own = _layer(_dotted(path))
        assert own is not None, f"{path.relative_to(REPO)} belongs to no layer of tests/test_layout.py"
        for line, name in _imports(path):
            target = _layer(name)
            if target is not None and target > own:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a shard module importing a stage, or lazily the training loop, is reported."""
    module = tmp_path / "pipeline" / "shards" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("from pipeline.stages import evaluate\n\n\ndef f():\n    from ..training import loop\n")
    names = [name for _, name in _imports(module, tmp_path)]
    assert names == ["pipeline.stages.evaluate", "pipeline.training.loop"]
    assert [_layer(n) for n in names] == [3, 2] and _layer(_dotted(module, tmp_path)) == 1


def test_every_module_has_a_test_file_or_a_reason():
    missing = []
    for path in _modules():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(REPO)
        mirrored = REPO / "tests" / rel.parent / f"test_{rel.name}"
        if not mirrored.exists() and rel.as_posix() not in TESTED_ELSEWHERE:
            missing.append(f"{rel}: expected {mirrored.relative_to(REPO)} or an entry in TESTED_ELSEWHERE")
    assert not missing, "\n".join(missing)


def test_every_reason_names_a_module_that_still_lacks_a_mirrored_test():
    stale = [
        rel
        for rel in TESTED_ELSEWHERE
        if not (REPO / rel).exists() or (REPO / "tests" / Path(rel).parent / f"test_{Path(rel).name}").exists()
    ]
    assert not stale, f"TESTED_ELSEWHERE lists modules that moved or gained a test file: {stale}"
