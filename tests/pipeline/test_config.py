"""params.yaml validation: every mistake fails before work starts, naming the key path."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, Params, load_params, params_from_dict, params_to_dict

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "synthetic"


def test_unknown_key_suggests_the_close_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown key; did you mean train\.lr\?$"):
        load_params(write(tmp_path, "train:\n  lrr: 0.01\n"))


def test_unknown_section_suggests_the_close_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^trian: unknown key; did you mean train\?$"):
        load_params(write(tmp_path, "trian:\n  lr: 0.01\n"))


def test_unknown_nested_key_names_the_full_path(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^data\.synthetic\.num_trian: unknown key; did you mean "
        r"data\.synthetic\.num_train\?$",
    ):
        load_params(write(tmp_path, "data:\n  synthetic:\n    num_trian: 3\n"))


def test_unknown_key_without_a_close_name_lists_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval\.zzz: unknown key; allowed keys in eval: batch_size, "):
        load_params(write(tmp_path, "eval:\n  zzz: 1\n"))


def test_wrong_type_names_key_expected_and_got(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.lr: expected float, got 'fast' \(str\)$"):
        load_params(write(tmp_path, "train:\n  lr: fast\n"))


def test_wrong_type_in_override(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.max_steps: expected int, got 'many' \(str\)$"):
        load_params(None, ["train.max_steps=many"])


def test_out_of_range_value_names_the_bound(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.lr: must be > 0\.0, got -0\.1$"):
        load_params(write(tmp_path, "train:\n  lr: -0.1\n"))


def test_choice_outside_the_allowed_set(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.source: must be one of 'synthetic', 'voc', 'coco', got 'kitti'$"):
        load_params(None, ["data.source=kitti"])


def test_several_problems_are_all_reported(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_params(None, ["train.lr=-1", "eval.nms_iou=2"])
    assert "train.lr: must be > 0.0" in str(error.value)
    assert "eval.nms_iou: must be <= 1.0" in str(error.value)


def test_dotlist_override_wins_over_the_file(tmp_path):
    params = load_params(write(tmp_path, "train:\n  lr: 0.5\n"), ["train.lr=0.01"])
    assert params.train.lr == pytest.approx(0.01)


def test_malformed_override_is_named():
    with pytest.raises(ConfigError, match=r"override 'train\.lr': expected KEY=VALUE"):
        load_params(None, ["train.lr"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: parameter file not found"):
        load_params(tmp_path / "nope.yaml")


def test_environment_interpolation_is_resolved_once_on_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_TEST_EXPERIMENT", "from-env")
    params = load_params(write(tmp_path, "tracking:\n  experiment: ${oc.env:SSD_TEST_EXPERIMENT}\n"))
    monkeypatch.setenv("SSD_TEST_EXPERIMENT", "changed-later")
    assert params.tracking.experiment == "from-env"  # a plain string now, not a live interpolation


def test_data_root_accepts_one_path_or_a_list(tmp_path):
    one = load_params(write(tmp_path, "data:\n  root: /a\n"))
    assert one.data.roots == ["/a"]
    many = load_params(write(tmp_path, "data:\n  root: [/a, /b]\n"))
    assert many.data.roots == ["/a", "/b"]
    with pytest.raises(ConfigError, match=r"^data\.root: expected a path or a list of paths"):
        load_params(write(tmp_path, "data:\n  root: 3\n"))


def test_round_trip_through_a_plain_dict(tmp_path):
    params = load_params(None, ["train.lr=0.02", "train.milestones=[10,20]", "data.root=[/x,/y]"])
    again = params_from_dict(params_to_dict(params))
    assert again == params


def test_cli_reports_invalid_params_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "check-params", "train.lrr=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "train.lrr: unknown key; did you mean train.lr?" in result.stderr


def test_cli_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for command in ("prepare", "shard", "train", "evaluate", "check-params"):
        assert command in result.stdout
