"""benchmarks/gpu_check.py on CPU with the tiny preset and 2 steps, so the GPU check never rots where no GPU is.

It runs in a fresh interpreter in which importing pipeline, Ray, MLflow, DVC, webdataset or OmegaConf fails,
as on the GPU host, which has none of them."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"pipeline", "ray", "mlflow", "dvc", "webdataset", "omegaconf"}:
            raise ImportError(f"gpu_check must not import {name}")
sys.meta_path.insert(0, Block())
sys.argv = ["gpu_check.py", *sys.argv[1:]]
import runpy
runpy.run_path(sys.argv[0].replace("gpu_check.py", %r), run_name="__main__")
"""


def test_gpu_check_imports_only_torch_numpy_ssd_core_and_the_standard_library():
    roots = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch", "numpy", "ssd_core"}


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_gpu_check_runs_on_cpu_with_the_tiny_preset(tmp_path):
    out = tmp_path / "gpu_check.json"
    args = [
        "--preset",
        "ssd_tiny",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batches",
        "2",
        "--loss-batch",
        "2",
    ]
    args += ["--compile-backend", "eager", "--budget-s", "3600", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", BLOCK % str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=2900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {k: v for k, v in {**report, **report["train"]}.items() if isinstance(v, str) and v.startswith("failed")}
    assert not failed, failed
    assert report["correctness"]["passed"] and report["correctness"]["loss_rel_error"] == 0.0
    assert set(report["train"]) == {"batch2_eager", "batch2_compiled", "batch2_compiled_over_eager"}
    assert report["train"]["batch2_compiled"]["images_per_s"] > 0
    assert report["assign_loss_ms"] > 0 and report["eval"]["postprocess_ms_per_image"] > 0
    assert report["flops"]["forward_gflop_per_image"] > 0 and report["flops"]["bf16_peak_tflops"] is None
