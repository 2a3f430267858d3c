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
                found.append(re.sub(r"\[[^\]]*\]", "", line[start:]))
    return found


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
