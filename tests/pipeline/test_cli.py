"""Command-line parsing: inputs, options and KEY=VALUE overrides in any order."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
    assert (command.name, overrides, args.inputs, str(args.model_out)) == (
        "train",
        ["train.lr=0.01", "seed=3"],
        [],
        "x.pt",
    )


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


# ------------------------------------------------------------------------- paths come from dvc.yaml
REPO = Path(__file__).resolve().parents[2]


def _dvc_cmd_options(stage: str) -> dict[str, str]:
    """``--option value`` pairs of a stage's cmd, read here independently of pipeline.stage_paths."""
    words = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


@pytest.mark.parametrize("stage", ["prepare", "shard", "train", "evaluate"])
def test_a_stage_run_by_hand_uses_the_paths_of_its_dvc_command(stage, monkeypatch):
    monkeypatch.chdir(REPO)
    args, _, _ = parse_command_line([stage])
    expected = _dvc_cmd_options(stage)
    assert expected, f"dvc.yaml's {stage} cmd names no paths"
    got = {flag: str(getattr(args, flag[2:].replace("-", "_"))) for flag in expected}
    assert got == expected


def test_predict_export_and_summary_default_to_the_pipeline_outputs(monkeypatch):
    monkeypatch.chdir(REPO)
    model = _dvc_cmd_options("train")["--model-out"]
    assert str(parse_command_line(["predict", "x.jpg"])[0].model) == model
    export = parse_command_line(["export"])[0]
    assert (str(export.model), export.out) == (model, Path(model).with_suffix(".onnx"))
    assert str(parse_command_line(["summary"])[0].metrics) == _dvc_cmd_options("evaluate")["--metrics"]
    custom = parse_command_line(["export", "--model", "elsewhere/m.pt"])[0]
    assert custom.out == Path("elsewhere/m.onnx")


def test_without_a_dvc_yaml_a_path_must_be_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["shard", "--out", "s"])
    assert exit_info.value.code == 2
    assert "shard: --index is required here: no dvc.yaml" in capsys.readouterr().err
    args, _, _ = parse_command_line(["shard", "--index", "i", "--out", "s"])
    assert (args.index, args.out) == (Path("i"), Path("s"))


def test_the_command_line_names_no_path_that_dvc_yaml_names():
    # A subcommand's word choice (``upload shards``) names no path; every other quoted value may not repeat one.
    lines = (REPO / "pipeline" / "cli.py").read_text().splitlines()
    source = "\n".join(line for line in lines if "choices=" not in line)
    for stage in ("prepare", "shard", "train", "evaluate"):
        for value in _dvc_cmd_options(stage).values():
            assert f'"{value}"' not in source, f"pipeline/cli.py repeats {value!r} from dvc.yaml"
