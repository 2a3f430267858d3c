"""Every documented recipe validates against the config schema."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params, params_to_dict

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "params").glob("*.yaml")) + [REPO / "params.yaml"]


def test_there_are_recipes_for_voc_coco_and_a_custom_set():
    names = {p.stem for p in RECIPES}
    assert {"voc_ssd300", "voc_ssd512", "coco_ssd300", "coco_ssd512", "raccoon_ssd300"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    params = load_params(recipe)
    assert params.train.max_steps >= 1


def test_paper_recipe_values():
    params = load_params(REPO / "params" / "voc_ssd300.yaml")
    train = params.train
    assert train.batch_size == 32  # the paper's global batch, whatever the number of workers
    assert (train.lr, train.momentum, train.weight_decay) == (1e-3, 0.9, 5e-4)
    assert (train.max_steps, train.milestones, train.schedule) == (120000, [80000, 100000], "multistep")
    assert params.augment.expand and params.model.preset == "ssd300_vgg16"
    assert len(params.data.classes) == 20


# ------------------------------------------------------------------ recipes as DVC experiments (Hydra)
CONF = REPO / "conf"


def _compose(tmp_path, overrides: list[str]):
    """What `dvc exp run -S <overrides>` writes to params.yaml before it runs (DVC's own composition code)."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "config", str(REPO), overrides)
    return load_params(out)


def test_every_recipe_is_an_experiment_option():
    """conf/recipe/<name>.yaml links to params/<name>.yaml, whose first line puts it at the top level."""
    recipes = sorted((REPO / "params").glob("*.yaml"))
    options = {p.name: p for p in (CONF / "recipe").glob("*.yaml") if p.name != "params.yaml"}
    assert sorted(options) == [p.name for p in recipes]
    for recipe in recipes:
        assert options[recipe.name].resolve() == recipe.resolve()
        assert recipe.read_text().splitlines()[0] == "# @package _global_", recipe
    assert (CONF / "workspace.yaml").resolve() == (REPO / "params.yaml").resolve()
    assert (REPO / "params.yaml").read_text().count("@package") == 0  # DVC rewrites it: no header to lose
    assert "enabled = true" in (REPO / ".dvc" / "config").read_text().split("[hydra]")[1]


@pytest.mark.parametrize("recipe", sorted((REPO / "params").glob("*.yaml")), ids=lambda p: p.stem)
def test_exp_run_with_a_recipe_runs_exactly_that_recipe(recipe, tmp_path, monkeypatch):
    for name in ("VOC_ROOT", "COCO_ROOT", "SSD_RACCOON_DIR", "SSD_VGG16_WEIGHTS", "SSD_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    composed = _compose(tmp_path, [f"recipe={recipe.stem}"])
    assert composed == load_params(recipe)
    assert set(yaml.safe_load((tmp_path / "params.yaml").read_text())) == set(params_to_dict(composed))  # whole


def test_exp_run_without_a_recipe_keeps_params_yaml_and_applies_overrides(tmp_path):
    assert _compose(tmp_path, []) == load_params(REPO / "params.yaml")
    changed = _compose(tmp_path, ["train.lr=0.0005", "recipe=raccoon_ssd300"])
    assert changed.train.lr == 0.0005 and changed.data.classes == ["raccoon"]


def test_the_base_under_every_recipe_is_the_schema():
    assert yaml.safe_load((CONF / "schema.yaml").read_text()) == params_to_dict(load_params(None)), (
        "conf/schema.yaml is stale: python -m pipeline check-params --params /dev/null > conf/schema.yaml"
    )
