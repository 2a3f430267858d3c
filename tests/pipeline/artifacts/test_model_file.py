"""The model file: round trip, loadable with plain torch (no Ray, no MLflow), clear errors, hostile files refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.artifacts.model_file import load_model_file, save_model_file
from ssd_core.model import SSD_TINY_PRIORS, build_ssd
from ssd_core.priors import SSD300_COCO, SSD300_VOC, PriorSpec

CLASSES = ["circle", "square", "triangle"]
PARAMS = {"seed": 7, "train": {"lr": 0.01, "milestones": [1, 2]}, "model": {"preset": "ssd_tiny"}}


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = build_ssd("ssd_tiny", len(CLASSES) + 1)
    with torch.no_grad():  # move every weight and buffer away from its initial value
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)
    return net.eval()


def test_round_trip_restores_weights_classes_params_and_outputs(model, tmp_path):
    path = tmp_path / "models" / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    loaded = load_model_file(path)
    assert (loaded.preset, loaded.classes, loaded.params) == ("ssd_tiny", CLASSES, PARAMS)
    assert not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        expected, got = model(images), loaded.model(images)
    assert torch.equal(expected.loc, got.loc) and torch.equal(expected.cls_logits, got.cls_logits)


@pytest.mark.slow
def test_the_file_loads_with_plain_torch_weights_only(model, tmp_path):
    path = tmp_path / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    code = (
        "import sys, torch\n"
        f"d = torch.load({str(path)!r}, weights_only=True)\n"
        "assert not {'ray', 'mlflow', 'pipeline', 'ssd_core'} & set(sys.modules), sorted(sys.modules)\n"
        "print(d['preset'], d['num_classes'], ','.join(d['classes']), len(d['state_dict']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["ssd_tiny", "4", "circle,square,triangle", str(len(model.state_dict()))]


def test_wrong_class_count_and_wrapped_models_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="needs 3 class names; got 2"):
        save_model_file(tmp_path / "a.pt", model, classes=CLASSES[:2], params=PARAMS)

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match="expected an SSD model .unwrapped., got Wrapper"):
        save_model_file(tmp_path / "b.pt", Wrapper(model), classes=CLASSES, params=PARAMS)
    assert not list(tmp_path.iterdir())


def test_torn_and_foreign_files_are_named_in_the_error(model, tmp_path):
    path = tmp_path / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}: not a readable model file"):
        load_model_file(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="expected a 'ssd-pipeline-model' file, found None"):
        load_model_file(path)
    with pytest.raises(FileNotFoundError):
        load_model_file(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------- hostile model files
def _edited(model, tmp_path, edit) -> Path:
    """A model file of ``model`` whose payload ``edit(payload)`` changed (in place), saved as torch would."""
    path = tmp_path / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


@pytest.fixture
def real_builds(monkeypatch):
    """Records every model the loader builds off the meta device, and refuses big ones: a hostile file
    must be refused before anything real is built (and a test of old code must not allocate gigabytes)."""
    import pipeline.artifacts.model_file as model_file

    built: list[tuple[str, int]] = []
    real = model_file.build_ssd

    def spy(preset, num_classes, **kwargs):
        if torch.get_default_device().type != "meta":
            built.append((preset, num_classes))
            assert num_classes <= 100, f"built {preset} with {num_classes} classes for real"
        return real(preset, num_classes, **kwargs)

    monkeypatch.setattr(model_file, "build_ssd", spy)
    return built


def _set(key, value):
    return lambda payload: payload.__setitem__(key, value)


def _reshape(key):
    def edit(payload):
        payload["state_dict"][key] = torch.zeros(3, 1)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("preset", "ssd_huge"), r"preset: expected one of \('ssd_tiny'"),
        (_set("preset", ["ssd_tiny"]), r"preset: expected one of .*got \['ssd_tiny'\]"),
        (_set("classes", "circle"), r"classes: expected a list of 1\.\.10000 names, got 'circle'"),
        (_set("classes", []), r"classes: expected a list of 1\.\.10000 names, got 0 names"),
        (_set("classes", [f"c{i}" for i in range(10_001)]), r"got 10001 names"),
        (_set("classes", ["circle", "", "triangle"]), r"classes\[1\]: expected a non-empty string, got ''"),
        (_set("classes", ["circle", 2, "triangle"]), r"classes\[1\]: expected a non-empty string, got 2"),
        (_set("classes", ["circle", "circle", "square"]), r"classes: expected unique names, got \['circle'\]"),
        # len(classes) must match the head: one name too many would load with a class map off by one.
        (_set("classes", [*CLASSES, "extra"]), r"num_classes: expected len\(classes\) \+ 1 = 5 .*got 4"),
        # A few bytes claiming ten million classes: refused before the model is built (allocated).
        (_set("num_classes", 10_000_000), r"num_classes: expected len\(classes\) \+ 1 = 4 .*got 10000000"),
        (_set("num_classes", "4"), r"num_classes: .*got '4'"),
        (_set("params", ["lr", 1]), r"params: expected a dict with string keys .*got list"),
        (_set("state_dict", [1, 2]), r"state_dict: expected a dict of name -> tensor, got list"),
        (
            lambda p: p["state_dict"].__setitem__("conf.0.weight", [0.0]),
            r"state_dict: expected a dict of name -> tensor",
        ),
        (_reshape("conf.0.weight"), r"weight 'conf\.0\.weight': expected shape \[\d+, 128, 3, 3\], got \[3, 1\]"),
        (_reshape("loc.4.bias"), r"weight 'loc\.4\.bias': expected shape \[16\], got \[3, 1\]"),
        (lambda p: p["state_dict"].pop("conf.0.bias"), r"missing keys \['conf\.0\.bias'\], unexpected keys \[\]"),
        (
            lambda p: p["state_dict"].__setitem__("extra", torch.zeros(1)),
            r"missing keys \[\], unexpected keys \['extra'\]",
        ),
        (lambda p: p.pop("prior_spec"), r"prior_spec: .*expected a mapping, got NoneType"),
        (lambda p: p["prior_spec"].pop("steps"), r"prior_spec: .*missing fields \['steps'\]"),
        (lambda p: p["prior_spec"].__setitem__("min_sizes", [1, 2, "x", 4, 5]), r"prior_spec: .*finite number"),
        # a well-formed spec that the network cannot produce: SSD300's maps on ssd_tiny
        (lambda p: p.__setitem__("prior_spec", SSD300_COCO.to_dict()), r"prior_spec does not fit preset 'ssd_tiny'"),
        # another box count per location than the heads in the file: a weight shape differs
        (
            lambda p: p["prior_spec"].__setitem__("aspect_ratios", [[2, 3]] * 5),
            r"weight 'loc\.0\.weight': expected shape \[24, 128, 3, 3\], got \[16, 128, 3, 3\]",
        ),
    ],
)
def test_a_malformed_model_file_is_refused_before_anything_is_built(model, tmp_path, real_builds, edit, message):
    path = _edited(model, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as caught:
        load_model_file(path)
    assert str(path) in str(caught.value)
    assert real_builds == []


def test_a_head_for_other_classes_is_named_with_both_shapes(model, tmp_path, real_builds):
    """Class names and num_classes agree with each other (5 classes with background) but not with the
    weights (a 4-class head): the first conf weight is named with both shapes."""
    path = _edited(model, tmp_path, lambda p: p.update(classes=[*CLASSES, "star"], num_classes=5))
    anchors = model.conf[0].weight.shape[0] // 4  # boxes per location of the first level
    with pytest.raises(
        ValueError,
        match=rf"weight 'conf\.0\.weight': expected shape \[{anchors * 5}, 128, 3, 3\], "
        rf"got \[{anchors * 4}, 128, 3, 3\]",
    ):
        load_model_file(path)
    assert real_builds == []


def test_a_good_file_is_built_once_for_real(model, tmp_path, real_builds):
    path = tmp_path / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    assert load_model_file(path).classes == CLASSES
    assert real_builds == [("ssd_tiny", 4)]


def test_the_file_records_the_full_prior_spec_and_loads_exactly_it(tmp_path):
    """Custom priors (another first size) survive the round trip: rebuilt from the file, not from the preset."""
    custom = PriorSpec.from_dict({**SSD_TINY_PRIORS.to_dict(), "min_sizes": [10.0, 30.0, 60.0, 90.0, 130.0]})
    net = build_ssd("ssd_tiny", len(CLASSES) + 1, prior_spec=PriorSpec.from_dict(custom.to_dict()))
    save_model_file(tmp_path / "ssd.pt", net, classes=CLASSES, params=PARAMS)
    assert torch.load(tmp_path / "ssd.pt", weights_only=True)["prior_spec"]["min_sizes"][0] == 10.0
    loaded = load_model_file(tmp_path / "ssd.pt")
    assert loaded.prior_spec == custom and torch.equal(loaded.model.priors(), net.priors())


def test_a_version_1_file_loads_with_the_priors_its_code_built(model, tmp_path):
    """Version 1 files have no prior_spec: the code that wrote them always built the preset's own priors
    (VOC boxes for the VGG presets, even under model.priors=coco), so that is what they load with."""
    path = _edited(model, tmp_path, lambda p: (p.pop("prior_spec"), p.__setitem__("version", 1)))
    assert load_model_file(path).prior_spec == SSD_TINY_PRIORS
    assert SSD300_VOC.min_sizes[0] == 30  # what a version-1 ssd300 file gets (PRESET_PRIORS)
    with pytest.raises(ValueError, match=r"model file version 3, this code reads \(1, 2\)"):
        load_model_file(_edited(model, tmp_path, _set("version", 3)))
