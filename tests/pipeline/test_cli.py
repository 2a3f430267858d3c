"""Command-line parsing: inputs, options and KEY=VALUE overrides in any order."""

from __future__ import annotations

import pytest

from pipeline.cli import COMMANDS, parse_command_line


def test_inputs_and_overrides_may_follow_options():
    args, command, overrides = parse_command_line(
        ["predict", "--model", "m.pt", "a.jpg", "--min-score", "0.5", "eval.top_k=100", "photos/", "--no-draw"]
    )
    assert command.name == "predict"
    assert args.inputs == ["a.jpg", "photos/"]
    assert overrides == ["eval.top_k=100"]
    assert (str(args.model), args.min_score, args.no_draw) == ("m.pt", 0.5, True)


def test_overrides_only_for_a_stage():
    args, command, overrides = parse_command_line(["train", "train.lr=0.01", "--model-out", "x.pt", "seed=3"])
    assert (command.name, overrides, args.inputs, str(args.model_out)) == ("train", ["train.lr=0.01", "seed=3"], [],
                                                                          "x.pt")  # fmt: skip


def test_inputs_for_a_command_without_inputs_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["train", "stray.jpg"])
    assert exit_info.value.code == 2
    assert "train: unexpected argument(s) ['stray.jpg']; overrides look like KEY=VALUE" in capsys.readouterr().err


def test_an_unknown_option_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["predict", "a.jpg", "--bogus", "0.5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_every_command_has_a_stage_module_with_main():
    import importlib

    for command in COMMANDS:
        assert callable(importlib.import_module(command.module).main), command.name
