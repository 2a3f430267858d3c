"""infra/ray/cluster.yaml, validated offline the way `ray up` validates it before it needs AWS credentials.

`ray up` runs prepare_config (fill in defaults.yaml of the provider, merge setup commands, check the Docker
section, set per-type min/max workers) and validate_config (the JSON schema shipped in the ray package, plus
cross-field rules). Both work without credentials. What follows them, the AWS bootstrap (IAM profiles, key
pairs, subnets, security groups; it needs boto3 and an account), cannot be checked here.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import load_params
from tests.infra._infra import (
    CLUSTER_YAML,
    GPU_PARAMS,
    image_parts,
    image_tag_problem,
    is_secret_name,
    lock_pins,
)

SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def _docker_env(config) -> dict[str, str]:
    env = {}
    for option in config["docker"].get("run_options", []):
        match = re.fullmatch(r"(?:--env|-e)[ =](\w+)=(.*)", option)
        if match:
            env[match[1]] = match[2]
    return env


def test_schema_shipped_with_ray_accepts_it(config):
    jsonschema.Draft7Validator(SCHEMA).validate(config)


def test_schema_is_strict_enough_to_catch_a_typo(config):
    config["max_worker"] = 3  # misspelt max_workers: the schema forbids unknown top-level keys
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.Draft7Validator(SCHEMA).validate(config)


def test_rays_config_preparation_accepts_it(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["max_workers"] == 0
    # setup_commands run on every node: preparation prepends them to the head's and the workers' own lists.
    assert prepared["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


def test_rays_validation_rejects_broken_variants(config):
    too_many = copy.deepcopy(config)
    too_many["available_node_types"]["gpu_worker"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        validate_config(prepare_config(too_many))
    no_head = copy.deepcopy(config)
    no_head["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(no_head))


def test_head_and_an_autoscaling_gpu_worker_type(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs no training rank"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "a GPU worker type"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0 < node_type["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0
    assert config["provider"] == {**config["provider"], "type": "aws", "cache_stopped_nodes": False}


def test_the_gpu_params_fit_one_scale_up(config, monkeypatch):
    env = _docker_env(config)
    for name in ("SSD_STORAGE", "SSD_VGG16_WEIGHTS"):  # what the params file requires, set on every node
        monkeypatch.setenv(name, env[name])
    params = load_params(GPU_PARAMS)
    assert params.train.use_gpu
    assert params.train.storage_path.startswith("s3://"), "checkpoints must be visible from every node"
    most_gpus = max(t["resources"].get("GPU", 0) * t["max_workers"] for t in config["available_node_types"].values())
    assert params.train.worker_range[1] <= most_gpus
    gpu_nodes = [t["resources"] for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    per_node, cpus = max(r["GPU"] for r in gpu_nodes), max(r["CPU"] for r in gpu_nodes)
    # Each rank's loader processes and torch threads must fit the node's CPUs.
    assert per_node * (params.train.loader_workers + params.train.threads_per_worker) <= cpus


def test_image_is_pinned_and_runs_the_locked_ray(config):
    image = config["docker"]["image"]
    assert image_tag_problem(image) is None, image_tag_problem(image)
    _, tag, digest = image_parts(image)
    assert tag and f"-ray{lock_pins()['ray']}-" in tag
    assert digest, "pulled by digest, so a re-pushed tag cannot change what the nodes run (infra/README.md)"
    assert config["docker"]["pull_before_run"] is True


def test_dashboard_is_private_and_token_auth_is_on(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(config)
    env = _docker_env(config)
    assert env["RAY_AUTH_MODE"] == "token"
    token_path = env["RAY_AUTH_TOKEN_PATH"]
    # The token reaches every node through file_mounts, from outside the repository (never committed).
    mounts = {remote: local for remote, local in config["file_mounts"].items() if token_path.startswith(remote + "/")}
    assert len(mounts) == 1, f"{token_path} must lie in a file_mounts directory"
    (local,) = mounts.values()
    assert local.startswith("~/"), f"the token's local side {local} must be in the user's home, not the repo"
    assert any("chmod 600" in c and token_path.replace("/home/ray", "~") in c for c in config["setup_commands"])


def test_no_secret_is_written_in_the_config(config):
    for name, value in _docker_env(config).items():
        assert not is_secret_name(name), f"{name}={value}: credentials come from file_mounts, not the config"
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert not re.search(r"(?i)(aws_secret_access_key|password|RAY_AUTH_TOKEN)\s*[=:]\s*\S", text)
