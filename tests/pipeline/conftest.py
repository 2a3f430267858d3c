"""Shared fixtures for the data-stage tests: a small prepared + sharded dataset with uneven shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.fixtures import make_params, prepare_and_shard


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """13 training samples in shards of 5, 5 and 3 (uneven), 5 validation samples; 48 x 48 synthetic images."""
    params = make_params(
        **{
            "data.synthetic.num_train": 13,
            "data.synthetic.num_val": 5,
            "data.synthetic.image_size": 48,
            "shard.maxcount": 5,
        }
    )
    _, shards = prepare_and_shard(params, tmp_path_factory.mktemp("uneven"))
    return shards
