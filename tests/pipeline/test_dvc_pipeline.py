"""The real `dvc repro` on a copy of this repository: the data stages run, then a second run does nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.dvc]

REPO = Path(__file__).resolve().parents[2]


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this venv's
    env["DVC_NO_ANALYTICS"] = "1"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _pipeline_copy(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the code, ``dvc.yaml`` and the default params (returned to be shrunk) under ``tmp_path``."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("pipeline", "ssd_core"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(REPO / "requirements.lock", work / "requirements.lock")  # the MLflow model's pins
    return work, yaml.safe_load((REPO / "params.yaml").read_text())


def test_dvc_repro_runs_the_data_stages_once(tmp_path):
    work, params = _pipeline_copy(tmp_path)
    params["data"]["synthetic"].update(num_train=24, num_val=8, num_test=4, image_size=64)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    _dvc(work, "init", "--no-scm", "-q")

    first = _dvc(work, "repro", "shard")
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'shard'" in first.stdout
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == 36  # 24 train + 8 val + 4 test
    report = json.loads((work / "reports" / "prepare.json").read_text())
    assert report["images"] == {**report["images"], "in": 36, "kept": 36, "rejected": 0}

    second = _dvc(work, "repro", "shard")
    assert "Running stage" not in second.stdout, second.stdout

    boxes = _dvc(work, "repro", "boxes")
    assert "Running stage 'boxes'" in boxes.stdout and "Running stage 'prepare'" not in boxes.stdout
    assert json.loads((work / "reports" / "boxes.json").read_text())["boxes"] > 0
    assert (work / "reports" / "boxes" / "sizes.png").is_file()

    shown = _dvc(work, "metrics", "show", "--json")
    assert "reports/prepare.json" in shown.stdout and "reports/boxes.json" in shown.stdout

    params["data"]["synthetic"]["num_val"] = 9  # a changed param re-runs its stage and what follows
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    third = _dvc(work, "repro", "shard")
    assert "Running stage 'prepare'" in third.stdout and "Running stage 'shard'" in third.stdout


def _git(cwd: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=60)


def _mlflow_runs(database: Path) -> list[dict[str, str]]:
    """Every run in the SQLite store: its id and its logged ``train.lr`` (read with sqlite3, no server)."""
    import sqlite3

    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT r.run_uuid, p.value FROM runs r "
            "LEFT JOIN params p ON p.run_uuid = r.run_uuid AND p.key = 'train.lr'"
        ).fetchall()
    return [{"run_id": run_id, "lr": lr} for run_id, lr in rows]


def test_the_whole_pipeline_under_dvc_repro_and_dvc_exp_run(tmp_path):
    """All four stages (train on local Ray with 2 workers), nothing re-runs, an experiment gets its own run."""
    work, params = _pipeline_copy(tmp_path)
    params["data"]["synthetic"].update(num_train=16, num_val=6, num_test=4, image_size=64)
    params["train"].update(batch_size=4, max_steps=3, warmup_steps=1, checkpoint_every_steps=2, loader_workers=0)
    params["eval"].update(num_workers=0, num_sample_images=2)
    params["tracking"]["grad_stats_every"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / ".gitignore", work / ".gitignore")  # the repository's own: metrics must reach git
    _git(work, "init", "-q")
    _dvc(work, "init", "-q")
    _dvc(work, "config", "core.analytics", "false")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "pipeline")

    first = _dvc(work, "repro")
    for stage in ("prepare", "shard", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    assert metrics["num_images"] == 4 and 0.0 <= metrics["map_voc07"] <= 1.0  # evaluate scores the 4 test images
    assert "Running stage" not in _dvc(work, "repro").stdout  # nothing changed, nothing runs

    shown = json.loads(_dvc(work, "metrics", "show", "--json").stdout)
    assert "metrics/eval.json" in json.dumps(shown)
    classes = json.loads((work / "shards" / "manifest.json").read_text())["classes"]
    plots = json.loads(_dvc(work, "plots", "show", "--json").stdout)["data"]
    assert len([name for name in plots if name.startswith("plots/pr/")]) == len(classes)  # a PR curve per class
    per_class = plots["plots/per_class_ap.csv"][0]["content"]["data"]["values"]
    assert sorted(row["class"] for row in per_class) == sorted(classes)
    _dvc(work, "plots", "show", "-o", "plots_html")
    assert "vegaEmbed('#plots_per_class_ap_csv'" in (work / "plots_html" / "index.html").read_text()

    runs_before = _mlflow_runs(work / "mlflow.db")
    assert len(runs_before) == 1 and float(runs_before[0]["lr"]) == pytest.approx(params["train"]["lr"])
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "first run")
    experiment = _dvc(work, "exp", "run", "-S", "train.lr=0.0005")
    assert "Running stage 'train'" in experiment.stdout and "Running stage 'prepare'" not in experiment.stdout
    runs_after = _mlflow_runs(work / "mlflow.db")
    new = [r for r in runs_after if r["run_id"] != runs_before[0]["run_id"]]
    assert len(runs_after) == 2 and len(new) == 1 and float(new[0]["lr"]) == pytest.approx(0.0005)
    shown = json.loads(_dvc(work, "exp", "show", "--json").stdout)
    experiments = [rev for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]]
    assert len(experiments) == 1 and experiments[0]["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.0005
    assert "map_voc07" in experiments[0]["data"]["metrics"]["metrics/eval.json"]["data"]  # its metrics are kept


# ------------------------------------------------------------------ raw data and recipes through DVC
TINY_RECIPE = """# @package _global_
seed: 0
data:
  source: voc
  root: raw/boxes
  tracked: raw/boxes
  classes: [box]
  strict_classes: true
  val_fraction: 0.25
  voc: {annotations_dir: annotations, images_dir: images}
shard: {maxcount: 4}
train: {run_name: tiny-voc}
"""


def _voc_flat(root: Path, count: int) -> None:
    """``count`` 64 x 64 JPEGs with one white box each and their VOC XML, in the flat layout."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(count):
        x1, y1, x2, y2 = 8 + i, 10, 40 + i, 50
        image = Image.new("RGB", (64, 64), (40, 40, 40))
        ImageDraw.Draw(image).rectangle([x1, y1, x2, y2], fill=(250, 250, 250))
        image.save(root / "images" / f"b{i}.jpg")
        (root / "annotations" / f"b{i}.xml").write_text(
            f"<annotation><filename>b{i}.jpg</filename><size><width>64</width><height>64</height><depth>3</depth>"
            f"</size><object><name>box</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>"
        )


def test_raw_data_is_a_dependency_and_recipes_run_as_experiments(tmp_path):
    """A recipe runs through `dvc exp run -S recipe=...` without editing a file; its raw data folder (added
    with `dvc add`) is prepare's dependency, so a changed annotation re-runs prepare and all after it; and
    `dvc exp show` puts the two recipes side by side."""
    work, params = _pipeline_copy(tmp_path)
    params["data"]["synthetic"].update(num_train=12, num_val=4, image_size=48)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "conf", work / "conf", symlinks=True)
    (work / "params").mkdir()
    (work / "params" / "tiny_voc.yaml").write_text(TINY_RECIPE)
    (work / "conf" / "recipe" / "tiny_voc.yaml").symlink_to("../../params/tiny_voc.yaml")
    _voc_flat(work / "raw" / "boxes", 8)
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    _git(work, "init", "-q")
    _dvc(work, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")  # the repository's: Hydra composition on
    _dvc(work, "add", "-q", "raw/boxes")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "pipeline and raw data")

    voc = _dvc(work, "exp", "run", "shard", "-S", "recipe=tiny_voc")
    assert "Running stage 'prepare'" in voc.stdout and "Running stage 'shard'" in voc.stdout, voc.stdout
    assert json.loads((work / "shards" / "manifest.json").read_text())["classes"] == ["box"]
    assert yaml.safe_load((work / "params.yaml").read_text())["data"]["tracked"] == "raw/boxes"
    assert "Running stage" not in _dvc(work, "repro", "shard").stdout  # nothing changed

    xml = work / "raw" / "boxes" / "annotations" / "b3.xml"
    xml.write_text(xml.read_text().replace("<xmin>11</xmin>", "<xmin>12</xmin>"))  # one raw annotation
    rerun = _dvc(work, "repro", "shard")
    assert "Running stage 'prepare'" in rerun.stdout and "Running stage 'shard'" in rerun.stdout, rerun.stdout
    status = _dvc(work, "status", "train", "evaluate").stdout  # and what follows would run next
    assert "train:" in status and "evaluate:" in status and "modified:           shards" in status, status

    _git(work, "checkout", "--", "params.yaml")  # back to the default; the next exp run starts from it
    xml.write_text(xml.read_text().replace("<xmin>12</xmin>", "<xmin>11</xmin>"))
    synthetic = _dvc(work, "exp", "run", "shard")  # the recipe "params": params.yaml as committed
    assert "Running stage 'prepare'" in synthetic.stdout, synthetic.stdout
    shown = json.loads(_dvc(work, "exp", "show", "--json").stdout)
    runs = [rev for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]]
    data = sorted((r["data"]["params"]["params.yaml"]["data"]["data"] for r in runs), key=lambda d: d["source"])
    assert [(d["source"], d["tracked"]) for d in data] == [
        ("synthetic", "pipeline/sources/synthetic.py"),
        ("voc", "raw/boxes"),
    ]
    table = _dvc(work, "exp", "show", "--csv", "--only-changed").stdout
    assert "data.source" in table.splitlines()[0] and "synthetic" in table and "voc" in table, table
