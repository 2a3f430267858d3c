"""The real `dvc repro` on a copy of this repository: the data stages run, then a second run does nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this venv's
    env["DVC_NO_ANALYTICS"] = "1"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_dvc_repro_runs_the_data_stages_once(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("pipeline", "ssd_core"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["synthetic"].update(num_train=24, num_val=8, image_size=64)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    _dvc(work, "init", "--no-scm", "-q")

    first = _dvc(work, "repro", "shard")
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'shard'" in first.stdout
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == 32
    report = json.loads((work / "reports" / "prepare.json").read_text())
    assert report["images"] == {**report["images"], "in": 32, "kept": 32, "rejected": 0}

    second = _dvc(work, "repro", "shard")
    assert "Running stage" not in second.stdout, second.stdout

    shown = _dvc(work, "metrics", "show", "--json")
    assert "reports/prepare.json" in shown.stdout

    params["data"]["synthetic"]["num_val"] = 9  # a changed param re-runs its stage and what follows
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    third = _dvc(work, "repro", "shard")
    assert "Running stage 'prepare'" in third.stdout and "Running stage 'shard'" in third.stdout
