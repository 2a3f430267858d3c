"""infra/params/gpu_ssd300_voc.yaml: valid, strict about cluster storage, and the paper's recipe unchanged."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, flatten, load_params, params_to_dict
from tests.infra._infra import GPU_PARAMS, REPO

CLUSTER_ENV = {"SSD_STORAGE": "s3://bucket/ssd/runs", "SSD_VGG16_WEIGHTS": "/mnt/ssd/weights/vgg16.pth"}
# Keys the cluster file may set differently from params/voc_ssd300.yaml, each for a reason given in its header.
CLUSTER_KEYS = {"train.storage_path", "model.pretrained_backbone", "train.loader_workers", "train.threads_per_worker"}


@pytest.fixture
def cluster_env(monkeypatch):
    for name, value in CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)


def test_validates_against_the_schema(cluster_env):
    params = load_params(GPU_PARAMS)
    assert params.train.use_gpu and params.model.preset == "ssd300_vgg16"
    assert params.train.storage_path == CLUSTER_ENV["SSD_STORAGE"]
    assert params.model.pretrained_backbone == CLUSTER_ENV["SSD_VGG16_WEIGHTS"]
    assert params.train.batch_size == 32  # the paper's global batch, split over the workers


@pytest.mark.parametrize("missing", sorted(CLUSTER_ENV))
def test_a_cluster_run_must_name_its_shared_storage(monkeypatch, missing):
    # Without it a run would write checkpoints to a node-local "runs" folder that other nodes cannot see.
    for name, value in CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(missing)
    with pytest.raises(ConfigError, match=missing):
        load_params(GPU_PARAMS)


def test_recipe_values_are_the_papers_recipe(cluster_env):
    cluster = flatten(params_to_dict(load_params(GPU_PARAMS)))
    recipe = flatten(params_to_dict(load_params(REPO / "params" / "voc_ssd300.yaml")))
    differ = {key for key in cluster.keys() | recipe.keys() if cluster.get(key) != recipe.get(key)}
    assert differ <= CLUSTER_KEYS, f"differs from params/voc_ssd300.yaml: {sorted(differ - CLUSTER_KEYS)}"
