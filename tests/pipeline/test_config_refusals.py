"""Values the schema refuses up front, each naming its key: non-finite floats, unbounded ints, seeds out of
range, run names that are paths, malformed schedules and class lists, augmentation ssd_core refuses, more
gradient statistics than a run keeps, and empty override values for keys that are not strings."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import ssd_core.augment
from pipeline.config import MAX_GRAD_STATS_STEPS, RUN_NAME_PATTERN, ConfigError, Params, load_params

REPO = Path(__file__).resolve().parents[2]


def _fields(node: type = Params, prefix: str = "") -> dict[str, tuple[type, dataclasses.Field]]:
    """Every leaf field of the schema by its dotted key: ``{"train.lr": (float, Field)}``."""
    found = {}
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = (hints[f.name], f)
    return found


FIELDS = _fields()
FLOAT_KEYS = sorted(k for k, (t, _) in FIELDS.items() if t is float)
INT_KEYS = sorted(k for k, (t, _) in FIELDS.items() if t is int)
SEED_KEYS = sorted(k for k in INT_KEYS if k.split(".")[-1] == "seed")


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        load_params(None, list(overrides))
    return str(error.value)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_must_be_finite(key, value):
    assert re.fullmatch(rf"{re.escape(key)}: expected a finite number, got -?(inf|nan)", _refused(f"{key}={value}"))


def test_a_non_finite_float_in_a_file_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  weight_decay: .inf\n")
    with pytest.raises(ConfigError, match=r"^train\.weight_decay: expected a finite number, got inf$"):
        load_params(path)


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_has_bounds_with_a_reason(key):
    meta = FIELDS[key][1].metadata
    assert meta["ge"] is not None or meta["gt"] is not None, key
    assert meta["le"] is not None or meta["lt"] is not None, key
    assert meta["help"], key


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_refuses_an_absurd_value(key):
    assert re.fullmatch(rf"{re.escape(key)}: must be <= \d+, got {10**30}", _refused(f"{key}={10**30}"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=100000000000000000000", r"train\.batch_size: must be <= 4194304"),  # 1024 x 4096
        ("eval.top_k=1000000000000", r"eval\.top_k: must be <= 32768"),
        ("train.num_workers=100000", r"train\.num_workers: must be in 1\.\.1024"),
        ("prepare.max_image_pixels=1000000000000000", r"prepare\.max_image_pixels: must be <= 250000000"),
    ],
)
def test_the_reported_absurd_sizes(override, message):
    assert re.match(message, _refused(override))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", r"must be in 1\.\.1024, got 0"),
        ("[0,2]", r"must be in 1\.\.1024, got \[0, 2\]"),
        ("[1,2000]", r"must be in 1\.\.1024, got \[1, 2000\]"),
        ("[3,1]", r"expected \[min, max\] with min <= max, got \[3, 1\]"),
        ("[1,2,3]", r"expected a number of workers or \[min, max\] \(two integers\), got \[1, 2, 3\]"),
        ("[1,x]", r"expected a number of workers or \[min, max\] \(two integers\), got \[1, .x.\]"),
        ("true", r"expected a number of workers or \[min, max\], got True"),
        ("two", r"expected a number of workers or \[min, max\], got 'two'"),
    ],
)
def test_num_workers_is_a_count_or_an_elastic_min_max(value, message):
    assert re.fullmatch(rf"train\.num_workers: {message}", _refused(f"train.num_workers={value}"))
    assert load_params(None, ["train.num_workers=[1,4]"]).train.worker_range == (1, 4)
    assert load_params(None, ["train.num_workers=3"]).train.worker_range == (3, 3)


def test_the_global_batch_must_give_every_worker_an_image():
    message = _refused("train.num_workers=[2,8]", "train.batch_size=6")
    assert message == (
        "train.batch_size: the global batch of 6 images cannot give each of up to 8 workers (train.num_workers) "
        "an image; use at least 8"
    )


@pytest.mark.parametrize("key", SEED_KEYS)
def test_seeds_are_refused_outside_0_to_2_pow_32_minus_1(key):
    assert SEED_KEYS == ["data.synthetic.seed", "seed"]  # every seed of the schema
    for value in (-1, 2**32, 10**23):
        assert re.fullmatch(rf"{re.escape(key)}: must be (>= 0|<= 4294967295), got {value}", _refused(f"{key}={value}"))
    for value in (0, 2**32 - 1):
        params = load_params(None, [f"{key}={value}"])
        assert (params.seed if key == "seed" else params.data.synthetic.seed) == value


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", "..", ".hidden", "a..b", "-x", "a b", "x" * 65, "ü"])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(name):
    message = _refused(f"train.run_name='{name}'")
    assert message.startswith("train.run_name: expected a name matching ") and RUN_NAME_PATTERN in message


def test_only_plain_folder_names_are_run_names():
    for name in ("ssd", "voc-ssd300", "Run_2.b", "x" * 64):
        assert load_params(None, [f"train.run_name={name}"]).train.run_name == name
    for name in ("x/..", "x" * 65):
        assert _refused(f"train.run_name={name}").startswith("train.run_name: ")


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.milestones=[5,3]"],
        ["train.milestones=[3,3]"],
        ["train.milestones=[0,5]"],
        ["train.milestones=[-5]"],
        ["train.schedule=multistep", "train.max_steps=1000", "train.milestones=[500,1001]"],
    ],
    ids=["decreasing", "repeated", "zero", "negative", "beyond-max-steps"],
)
def test_milestones_must_be_increasing_steps_of_the_run(overrides):
    assert _refused(*overrides).startswith("train.milestones: expected strictly increasing steps in 1..")


def test_milestones_are_checked_against_the_run_length_when_the_schedule_uses_them():
    run = ["train.max_steps=1000", "train.milestones=[500,1000]"]
    assert load_params(None, ["train.schedule=multistep", *run]).train.milestones == [500, 1000]
    assert load_params(None, ["train.schedule=cosine", *run, "train.max_steps=10"]).train.milestones == [500, 1000]
    assert _refused("train.schedule=multistep", *run, "train.max_steps=10") == (
        "train.milestones: expected strictly increasing steps in 1..10, got [500, 1000]"
    )


def test_a_tracked_run_keeps_at_most_max_grad_stats_steps_of_gradient_statistics():
    # 1,000,000 steps / 50 = 20,000 steps of per-layer statistics, over 10,000: every >= 100 fits.
    assert _refused("train.max_steps=1000000") == (
        "tracking.grad_stats_every: 50 with train.max_steps=1000000 records 20000 steps of per-layer statistics, "
        f"at most {MAX_GRAD_STATS_STEPS} (set it >= 100, or 0 for off)"
    )
    assert load_params(None, ["train.max_steps=1000000", "tracking.grad_stats_every=100"]).train.max_steps == 1000000
    for off in ("tracking.grad_stats_every=0", "tracking.enabled=false"):
        assert load_params(None, ["train.max_steps=1000000", off]).train.max_steps == 1000000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.final_weights=best"], "train.final_weights: 'best' needs validation (train.val_every_steps > 0)"),
        (["train.final_weights=ema", "train.val_every_steps=5"], "train.final_weights: 'ema' needs an EMA"),
        (["train.patience=3"], "train.patience: 3 needs validation (train.val_every_steps > 0)"),
        (["train.select_metric=val/ap50"], "train.select_metric: must be one of"),
    ],
    ids=["best-without-validation", "ema-without-ema", "patience-without-validation", "unknown-metric"],
)
def test_selection_keys_that_ask_for_what_is_switched_off_are_refused(overrides, message):
    assert _refused(*overrides).startswith(message)


def test_consistent_selection_keys_load():
    params = load_params(
        None,
        ["train.final_weights=ema", "train.ema_decay=0.99", "train.val_every_steps=5", "train.patience=2"],
    )
    assert (params.train.final_weights, params.train.patience) == ("ema", 2)
    assert load_params(None, ["train.final_weights=best", "train.val_every_steps=1"]).train.final_weights == "best"


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("[cat,dog,cat]", r"data\.classes: expected distinct names, got \['cat'\] more than once"),
        ("[cat,'',dog]", r"data\.classes: expected non-empty names"),
    ],
)
def test_class_names_must_be_distinct_and_non_empty(classes, message):
    assert re.match(message, _refused(f"data.classes={classes}"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.source=voc", "data.root=data/raw/voc", "data.tracked=data/raw/coco"],
        ["data.source=voc", "data.root=[data/raw/VOC2007,elsewhere/VOC2012]", "data.tracked=data/raw"],
        ["data.source=voc", "data.root=data/raw-other", "data.tracked=data/raw"],  # a prefix is not a folder
        [
            "data.source=coco",
            "data.coco.train_json=data/coco/a.json",
            "data.coco.val_images=/x",
            "data.tracked=data/coco",
        ],
    ],
)
def test_raw_data_outside_what_dvc_tracks_is_refused(overrides):
    assert re.match(r"data\.tracked: prepare reads \[.*\], outside data\.tracked", _refused(*overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.source=voc", "data.root=[data/raw/VOC2007,data/raw/VOC2012]", "data.tracked=data/raw"],
        ["data.source=voc", "data.root=data/raw/", "data.tracked=./data/raw"],
        ["data.source=voc", "data.root=/elsewhere", "data.tracked="],  # no DVC: no check
        ["data.source=synthetic", "data.tracked=pipeline/sources/synthetic.py"],
        ["data.source=coco", "data.coco.train_json=s3://b/coco/a.json", "data.tracked=s3://b/coco"],
    ],
)
def test_raw_data_inside_what_dvc_tracks_is_accepted(overrides):
    load_params(None, overrides)


def test_augmentation_is_checked_by_ssd_cores_own_options():
    # The message is ssd_core.augment.AugmentOptions's, under the params key.
    refused = _refused("augment.expand_max_ratio=0.5")
    assert refused == "augment.expand_max_ratio: expected a finite number >= 1, got 0.5"
    assert _refused("augment.expand_max_ratio=17") == "augment.expand_max_ratio: must be <= 16.0, got 17.0"


def test_a_rule_added_to_ssd_cores_augment_options_is_enforced_by_load_params(monkeypatch):
    def refuse_flip(self):
        if self.flip:
            raise ValueError("AugmentOptions.flip: expected False, got True")

    monkeypatch.setattr(ssd_core.augment.AugmentOptions, "__post_init__", refuse_flip)
    assert _refused("augment.flip=true") == "augment.flip: expected False, got True"
    assert load_params(None, ["augment.flip=false"]).augment.flip is False


@pytest.mark.parametrize(
    ("key", "read"),
    [
        ("tracking.uri", lambda p: p.tracking.uri),
        ("model.pretrained_backbone", lambda p: p.model.pretrained_backbone),
        ("data.root", lambda p: p.data.root),
    ],
)
def test_an_empty_override_sets_a_string_key_to_the_empty_string(tmp_path, key, read):
    path = tmp_path / "params.yaml"
    section, name = key.split(".")
    path.write_text(f"{section}:\n  {name}: something\n")
    assert read(load_params(path, [f"{key}="])) == ""


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("train.lr", "float"),
        ("train.max_steps", "int"),
        ("train.resume", "bool"),
        ("data.classes", r"list\[str\] \(none: data\.classes=\[\]\)"),
        ("augment", r"a mapping \(section augment\)"),
    ],
)
def test_an_empty_override_of_any_other_key_is_refused_naming_it(key, expected):
    assert re.fullmatch(rf"{re.escape(key)}: expected {expected}, got an empty value", _refused(f"{key}="))


@pytest.mark.slow
def test_check_params_refuses_them_all_before_any_work():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "check-params",
            "--params",
            str(REPO / "params.yaml"),
            "train.run_name=../../x",
            "seed=-1",
            "train.lr=inf",
            "data.classes=[a,a]",
            "eval.top_k=1000000000000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    for key in ("train.run_name", "seed", "train.lr", "data.classes", "eval.top_k"):
        assert f"{key}: " in result.stderr
    assert result.stdout == ""
