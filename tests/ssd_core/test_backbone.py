"""ssd_core.backbone: ImageNet VGG16 weights (torchvision and reduced-fc layouts) into SSD's base."""

from __future__ import annotations

import gc
import pickle

import pytest
import torch

from ssd_core.backbone import FC6_INDEX, FC7_INDEX, VGG16_CONV_INDICES, load_vgg16_backbone
from ssd_core.model import build_ssd

# VGG16's 13 convs: (out, in) channels in order (Simonyan & Zisserman 2015, configuration D).
CONV_CHANNELS = [
    (64, 3),
    (64, 64),
    (128, 64),
    (128, 128),
    (256, 128),
    (256, 256),
    (256, 256),
    (512, 256),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
]


def _random_convs(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for index, (cout, cin) in zip(VGG16_CONV_INDICES, CONV_CHANNELS, strict=True):
        state[f"{prefix}{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen)
        state[f"{prefix}{index}.bias"] = torch.randn(cout, generator=gen)
    return state


def _reduced_fc_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ssd.pytorch vgg16_reducedfc.pth layout: keys N.weight / N.bias, fc6 at 31, fc7 at 33."""
    gen = torch.Generator().manual_seed(seed)
    state = _random_convs("", gen)
    state["31.weight"] = torch.randn(1024, 512, 3, 3, generator=gen)
    state["31.bias"] = torch.randn(1024, generator=gen)
    state["33.weight"] = torch.randn(1024, 1024, 1, 1, generator=gen)
    state["33.bias"] = torch.randn(1024, generator=gen)
    return state


@pytest.mark.slow
def test_torchvision_layout_converts_fc6_and_fc7_by_subsampling(tmp_path):
    """Full-size torchvision VGG16 state dict (fc6 alone is 4096 x 25088 floats, ~400 MB): the one big test."""
    gen = torch.Generator().manual_seed(0)
    state = _random_convs("features.", gen)
    state["classifier.0.weight"] = torch.randn(4096, 25088, generator=gen)
    state["classifier.0.bias"] = torch.randn(4096, generator=gen)
    state["classifier.3.weight"] = torch.randn(4096, 4096, generator=gen)
    state["classifier.3.bias"] = torch.randn(4096, generator=gen)
    state["classifier.6.weight"] = torch.randn(1000, 4096, generator=gen)  # ImageNet classifier: ignored
    state["classifier.6.bias"] = torch.randn(1000, generator=gen)
    path = tmp_path / "vgg16_torchvision.pth"
    torch.save(state, path)

    model = build_ssd("ssd300_vgg16", 21)
    heads_before = model.conf[0].weight.clone()
    load_vgg16_backbone(model, path)

    for index in VGG16_CONV_INDICES:
        assert torch.equal(model.vgg[index].weight, state[f"features.{index}.weight"]), index
        assert torch.equal(model.vgg[index].bias, state[f"features.{index}.bias"]), index
    # Reference conversion, element by element as the seed's loops: fc6 flattens pool5 as (512, 7, 7);
    # conv6[i, :, h, w] = fc6[4i, :, 3h, 3w]; conv7[i, j] = fc7[4i, 4j]; bias[i] = bias[4i].
    fc6 = state["classifier.0.weight"].view(4096, 512, 7, 7)
    conv6 = model.vgg[FC6_INDEX]
    for i in range(1024):
        for h in range(3):
            for w in range(3):
                assert torch.equal(conv6.weight[i, :, h, w], fc6[4 * i, :, 3 * h, 3 * w]), (i, h, w)
        assert conv6.bias[i] == state["classifier.0.bias"][4 * i]
    fc7 = state["classifier.3.weight"]
    conv7 = model.vgg[FC7_INDEX]
    every_4th = torch.arange(1024) * 4
    for i in range(1024):
        assert torch.equal(conv7.weight[i, :, 0, 0], fc7[4 * i, every_4th]), i
        assert conv7.bias[i] == state["classifier.3.bias"][4 * i]
    assert conv6.dilation == (6, 6)
    assert torch.equal(model.conf[0].weight, heads_before)  # only the base is touched
    del state, fc6, fc7, model
    gc.collect()


@pytest.mark.parametrize("preset", ["ssd300_vgg16", "ssd512_vgg16"])
def test_reduced_fc_layout_loads_unchanged(tmp_path, preset):
    state = _reduced_fc_state()
    path = tmp_path / "vgg16_reducedfc.pth"
    torch.save(state, path)
    model = build_ssd(preset, 21)
    load_vgg16_backbone(model, str(path))
    for key, tensor in state.items():
        index, kind = key.split(".")
        assert torch.equal(getattr(model.vgg[int(index)], kind), tensor), key


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("31.bias"), r"missing keys \['31.bias'\]"),
        (lambda s: s.update({"35.weight": torch.zeros(3)}), r"unexpected keys \['35.weight'\]"),
        (
            lambda s: s.update({"31.weight": torch.zeros(1024, 512, 7, 7)}),
            r"31.weight: expected \[1024, 512, 3, 3\], got \[1024, 512, 7, 7\]",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_reduced_fc_files_fail_listing_the_problem_and_leave_the_model_alone(tmp_path, edit, message):
    state = _reduced_fc_state()
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    model = build_ssd("ssd300_vgg16", 21)
    before = {k: v.clone() for k, v in model.vgg.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_vgg16_backbone(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.vgg.state_dict().items())


def test_bad_torchvision_file_lists_every_problem(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = _random_convs("features.", gen)
    del state["features.28.bias"]
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    state["classifier.0.weight"] = torch.zeros(4096, 16)  # wrong shape, kept small
    state["classifier.0.bias"] = torch.zeros(4096)
    state["classifier.9.weight"] = torch.zeros(1)
    path = tmp_path / "bad_torchvision.pth"  # classifier.3.* missing too
    torch.save(state, path)
    with pytest.raises(ValueError, match="torchvision VGG16 layout") as info:
        load_vgg16_backbone(build_ssd("ssd300_vgg16", 21), path)
    text = str(info.value)
    assert "missing keys ['classifier.3.bias', 'classifier.3.weight', 'features.28.bias']" in text
    assert "unexpected keys ['classifier.9.weight']" in text
    assert "features.0.weight: expected [64, 3, 3, 3], got [64, 3, 5, 5]" in text
    assert "classifier.0.weight: expected [4096, 25088], got [4096, 16]" in text


def test_unknown_layouts_and_non_state_dicts_fail(tmp_path):
    model = build_ssd("ssd300_vgg16", 21)
    path = tmp_path / "x.pth"
    torch.save({"backbone.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="neither the torchvision VGG16 layout"):
        load_vgg16_backbone(model, path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(TypeError, match="expected a state dict"):
        load_vgg16_backbone(model, path)
    torch.save({"0.weight": [1, 2]}, path)
    with pytest.raises(TypeError, match=r"these are not: \['0.weight'\]"):
        load_vgg16_backbone(model, path)


def test_only_vgg_presets_take_a_vgg_backbone(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(_reduced_fc_state(), path)
    with pytest.raises(ValueError, match="fits only the presets .* got a model of preset 'ssd_tiny'"):
        load_vgg16_backbone(build_ssd("ssd_tiny", 3), path)


class NotATensor:
    """Pickled as an arbitrary class: torch.load(weights_only=True) refuses to unpickle it."""


def test_files_are_read_with_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"0.weight": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        load_vgg16_backbone(build_ssd("ssd300_vgg16", 21), path)
