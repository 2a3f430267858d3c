"""README.md: every `python -m pipeline ...` line in its code blocks is a command line the CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, parse_command_line
from pipeline.config import load_params

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _pipeline_command_lines() -> list[str]:
    """`python -m pipeline` lines of the fenced code blocks: continuations joined, comments and the
    documentation-only ``[optional ...]`` brackets removed."""
    found, joined = [], ""
    for block in re.findall(r"```(?:bash|text)?\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = joined + line.split("  #", 1)[0].rstrip()
            if line.endswith("\\"):
                joined = line[:-1] + " "
                continue
            joined = ""
            start = line.find("python -m pipeline ")
            if start >= 0 and not line.lstrip().startswith("$"):
                found.append(_expand(re.sub(r"\[[^\]]*\]", "", line[start:])))
    return found


# Values for the shell variables of README's command lines: what `infra/local/start`'s env file and README's
# own `export` lines set (the cluster test runs those lines with the real values).
EXAMPLE_ENV = {"SSD_S3_BUCKET": "ssd", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
EXAMPLE_ENV |= dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^export (.*)$", README, flags=re.M))))


def _expand(line: str) -> str:
    return re.sub(r"\$(\w+)", lambda m: EXAMPLE_ENV.get(m[1], m[0]), line)


LINES = _pipeline_command_lines()


def test_the_readme_shows_every_user_command():
    shown = {shlex.split(line)[3] for line in LINES}
    assert {"prepare", "shard", "train", "predict", "export"} <= shown, shown
    assert shown <= {c.name for c in COMMANDS}


@pytest.mark.parametrize("line", LINES)
def test_readme_command_lines_parse_and_their_params_validate(line):
    args, command, overrides = parse_command_line(shlex.split(line)[3:])
    if args.params != Path("params.yaml"):
        assert (REPO / args.params).exists(), f"{line}: {args.params} does not exist"
    load_params(REPO / args.params if args.params != Path("params.yaml") else None, overrides)
    if command.takes_inputs:
        assert args.inputs, f"{line}: {command.name} needs inputs"


def _section_lines(title: str) -> list[str]:
    """The command lines of the code block in README's section ``title``: comments and ``export VAR=...``
    lines (which only name the job, run and node) left out."""
    section = README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split("  #", 1)[0].rstrip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("export ")]


def test_every_laptop_cluster_command_is_one_the_cluster_test_runs():
    from tests.cluster import workflow

    assert _section_lines("Cluster on your laptop") == list(workflow.COMMANDS)


def _ray_job_submit_options(text: str) -> list[set[str]]:
    """The options of every `ray job submit` in ``text``'s code blocks (before its ``--`` entry point)."""
    found = []
    for block in re.findall(r"```(?:bash|text)?\n(.*?)```", text, flags=re.S):
        lines = re.sub(r"\\\n\s*", " ", block).splitlines()
        for index, line in enumerate(lines):
            if "ray job submit" not in line:
                continue
            command = line.split("ray job submit", 1)[1]
            for more in lines[index + 1 :]:  # a quoted argument may go on over the next lines
                try:
                    shlex.split(command)
                    break
                except ValueError:
                    command += " " + more
            words = shlex.split(command)
            words = words[: words.index("--")] if "--" in words else words
            found.append({w.split("=", 1)[0] for w in words if w.startswith("--")})
    return found


@pytest.mark.parametrize("name", ["README.md", "infra/README.md"])
def test_every_ray_job_submit_uses_only_options_the_cluster_test_runs(name):
    """The cluster test submits with these options; elsewhere only ``--address`` is added (the laptop cluster
    gives the job server's address in ``RAY_API_SERVER_ADDRESS``), and ``--no-wait`` may be left out."""
    from tests.cluster import workflow

    tested = _ray_job_submit_options(f"```bash\n{workflow.SUBMIT}\n```")[0] | {"--address"}
    submits = _ray_job_submit_options((REPO / name).read_text(encoding="utf-8"))
    assert submits
    for options in submits:
        assert options <= tested, options - tested
