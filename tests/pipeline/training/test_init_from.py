"""Fine-tuning sources: class rows matched by name, new classes fresh, the table, the identity, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.artifacts.model_file import save_model_file
from pipeline.training import checkpoint
from pipeline.training.init_from import (
    CLASS_ROWS,
    LOADED,
    REINITIALISED,
    read_source,
    source_digest,
    transfer_table,
    transfer_weights,
)
from pipeline.training.job import identity_digest
from ssd_core.model import SSD_TINY_PRIORS, build_ssd
from ssd_core.priors import PriorSpec
from tests.pipeline.fixtures import make_params, random_tiny_ssd

SOURCE_CLASSES = ["circle", "square", "triangle"]


def _source_file(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = random_tiny_ssd(len(SOURCE_CLASSES) + 1, seed=3)
    path = tmp_path / "source.pt"
    save_model_file(path, model, classes=SOURCE_CLASSES, params={})
    return path, model


def _conf_rows(tensor: torch.Tensor, classes: int) -> torch.Tensor:
    return tensor.reshape(-1, classes, *tensor.shape[1:])  # [A, C, ...]


def test_class_rows_follow_the_names_and_new_classes_start_fresh(tmp_path):
    path, source_model = _source_file(tmp_path)
    classes = ["triangle", "star", "circle"]  # reordered, one new, one left out
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", len(classes) + 1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    rows = transfer_weights(model, read_source(str(path)), classes)
    by_name = {row.name: row for row in rows}
    got, src = model.state_dict(), source_model.state_dict()
    for k in range(5):
        name = f"conf.{k}.weight"
        assert by_name[name].action == CLASS_ROWS and "new: ['star']" in by_name[name].detail
        here, there, new = _conf_rows(got[name], 4), _conf_rows(src[name], 4), _conf_rows(fresh[name], 4)
        assert torch.equal(here[:, 0], there[:, 0])  # background from background
        assert torch.equal(here[:, 1], there[:, 3])  # triangle: source label 3
        assert torch.equal(here[:, 3], there[:, 1])  # circle: source label 1
        assert torch.equal(here[:, 2], new[:, 2])  # star: as freshly initialised
        bias = f"conf.{k}.bias"
        assert torch.equal(_conf_rows(got[bias], 4)[:, 1], _conf_rows(src[bias], 4)[:, 3])
    for name in ("vgg.0.weight", "loc.0.weight", "extras.0.1.running_mean", "l2norm.weight"):
        assert by_name[name].action == LOADED and torch.equal(got[name], src[name]), name
    table = transfer_table(rows, read_source(str(path)))
    assert table.splitlines()[0].endswith(f"{len(rows) - 10} loaded, 10 class rows, 0 re-initialised, 0 skipped")


def test_a_checkpoint_folder_is_a_source_too(tmp_path):
    model = random_tiny_ssd(len(SOURCE_CLASSES) + 1, seed=4)
    folder = tmp_path / "run" / checkpoint.dir_name(7)
    state = {"step": 7, "model": model.state_dict(), "preset": "ssd_tiny", "classes": SOURCE_CLASSES}
    state["prior_spec"] = SSD_TINY_PRIORS.to_dict()
    checkpoint.write_checkpoint(folder, state, {"step": 7, "epoch": 0, "params": {}, "world_size": 1})
    source = read_source(str(folder))
    assert (source.kind, source.classes) == ("checkpoint", SOURCE_CLASSES)
    target = build_ssd("ssd_tiny", 4)
    transfer_weights(target, source, SOURCE_CLASSES)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items())
    assert source_digest(str(folder)) != source_digest(str(_source_file(tmp_path)[0]))


def test_heads_of_other_priors_are_reinitialised(tmp_path):
    path, _ = _source_file(tmp_path)
    wider = PriorSpec.from_dict({**SSD_TINY_PRIORS.to_dict(), "aspect_ratios": [[2, 3]] * 5})  # 6 boxes everywhere
    model = build_ssd("ssd_tiny", 4, prior_spec=wider)
    rows = {row.name: row for row in transfer_weights(model, read_source(str(path)), SOURCE_CLASSES)}
    assert rows["loc.0.weight"].action == REINITIALISED and rows["conf.0.weight"].action == REINITIALISED
    assert rows["loc.1.weight"].action == LOADED  # level 1 had ratios (2, 3) already
    assert rows["conf.1.weight"].action == CLASS_ROWS and rows["vgg.0.weight"].action == LOADED


def test_refusals_name_the_key(tmp_path):
    path, _ = _source_file(tmp_path)
    with torch.device("meta"):
        other = build_ssd("ssd300_vgg16", 4)
    with pytest.raises(ValueError, match="model.init_from: .* is a ssd_tiny model, this run trains ssd300_vgg16"):
        transfer_weights(other, read_source(str(path)), SOURCE_CLASSES)
    with pytest.raises(ValueError, match="model.init_from: no model file or checkpoint folder at"):
        read_source(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="model.init_from: .*not a readable model file"):
        read_source(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="registered-model URIs are not resolved here"):
        read_source("models:/ssd@champion")


def test_the_sources_digest_joins_the_run_identity(tmp_path):
    params = make_params(**{"model.init_from": "models/ssd.pt"})
    a, b = identity_digest(params, "0" * 64, "code", "1" * 64), identity_digest(params, "0" * 64, "code", "2" * 64)
    assert a != b and identity_digest(params, "0" * 64, "code", "1" * 64) == a
    path, _ = _source_file(tmp_path)
    before = source_digest(str(path))
    save_model_file(path, random_tiny_ssd(4, seed=9), classes=SOURCE_CLASSES, params={})
    assert source_digest(str(path)) != before  # same path, other weights: another run
