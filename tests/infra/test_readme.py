"""infra/README.md: covers zero to a cluster run, its commands are real, and its GPU-hour arithmetic adds up."""

from __future__ import annotations

import re
import shlex

import pytest

from pipeline.cli import build_parser
from pipeline.config import load_params
from tests.infra._infra import INFRA, REPO

README = (INFRA / "README.md").read_text(encoding="utf-8")


def _code_lines() -> list[str]:
    """Shell lines of the fenced code blocks, continuation backslashes joined."""
    lines, joined = [], ""
    for block in re.findall(r"```(?:bash|text)?\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            lines.append(joined + line)
            joined = ""
    return lines


@pytest.mark.parametrize(
    "step",
    [
        "docker build -f infra/docker/Dockerfile",  # build ...
        'docker push "$IMAGE"',  # ... and push the image
        "dvc push",  # shards to a DVC remote ...
        "aws s3 sync shards/",  # ... or to the object store
        "ray up -y infra/ray/cluster.yaml",  # start a cluster
        "kubectl -n ssd create -f infra/k8s/rayjob.yaml",
        "ray job submit --address",  # submit
        "docker compose -f infra/mlflow/docker-compose.yaml",  # watch in MLflow
        "ray down -y infra/ray/cluster.yaml",  # tear down
        "kubectl delete -k infra/k8s",
        "Nothing here has started a cloud cluster",
        "infra/local/start",  # the same workflow, for real, on a loopback cluster
    ],
)
def test_readme_walks_from_zero_to_a_run(step):
    assert step in README


def test_every_pipeline_command_in_the_readme_parses():
    commands = [line for line in _code_lines() if "python -m pipeline" in line]
    assert len(commands) >= 4
    for line in commands:
        argv = shlex.split(line.split("python -m pipeline", 1)[1])
        argv = argv[: argv.index("|")] if "|" in argv else argv
        build_parser().parse_args(argv)  # exits (SystemExit) on an unknown command or option


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_gpu_hour_arithmetic_follows_from_the_recipe():
    params = load_params(REPO / "params" / "voc_ssd300.yaml")
    steps, batch = params.train.max_steps, params.train.batch_size  # the global batch
    match = re.search(r"([\d,]+) steps x (\d+) images = ([\d,]+) images", README)
    assert match, "the work must be shown as steps x batch = images"
    assert (_number(match[1]), _number(match[2]), _number(match[3])) == (steps, batch, steps * batch)
    images = steps * batch

    flop = re.search(r"([\d,]+) x (\d+) GFLOP = ([\d.]+) x 10\^(\d+) FLOP", README)
    assert _number(flop[1]) == images
    assert _number(flop[3]) * 10 ** int(flop[4]) == pytest.approx(images * _number(flop[2]) * 1e9, rel=0.01)

    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \| (.+?) \| ([\d.]+) GPU-h \| \*\*([\d.]+) GPU-h\*\* \|", README, re.M)
    assert len(rows) >= 3, "a table of GPUs with images/s, training GPU-hours, x1.25, and the total"
    startup = 4 * 0.25  # 4 GPUs x 15 minutes, as the README states
    for name, per_gpu, training, with_overhead, total in rows:
        hours = images / _number(per_gpu) / 3600
        shown = float(re.findall(r"([\d.]+) GPU-h", training)[-1])
        assert shown == pytest.approx(hours, abs=0.051), name
        assert float(with_overhead) == pytest.approx(hours * 1.25, abs=0.051), name
        assert float(total) == pytest.approx(hours * 1.25 + startup, abs=0.051), name
