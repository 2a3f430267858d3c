"""Every documented recipe validates against the config schema."""

from pathlib import Path

import pytest

from pipeline.config import load_params

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
