"""ssd_core.model and ssd_core.layers: shapes, prior order, construction checks, precision paths, learning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssd_core.layers import L2Norm, output_side
from ssd_core.loss import multibox_loss
from ssd_core.matching import assign_targets
from ssd_core.model import PRESET_PRIORS, PRESETS, SSD_TINY_PRIORS, SSDOutput, build_ssd
from ssd_core.priors import SSD300_COCO, SSD300_VOC, SSD512_VOC, PriorSpec


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- shapes
def _check_output(out: SSDOutput, batch: int, num_priors: int, num_classes: int) -> None:
    assert isinstance(out, SSDOutput)
    assert out.loc.shape == (batch, num_priors, 4)
    assert out.cls_logits.shape == (batch, num_priors, num_classes)
    assert out.loc.dtype == torch.float32 and out.cls_logits.dtype == torch.float32


@pytest.mark.parametrize("preset", ["ssd_tiny", "ssd300_vgg16"])
def test_forward_shapes_for_batch_1_and_2_and_batch_independence(preset):
    torch.manual_seed(0)
    num_classes = 5
    model = build_ssd(preset, num_classes).eval()
    num_priors = PRESET_PRIORS[preset].num_priors
    images = _images(2, model.image_size)
    with torch.no_grad():
        pair = model(images)
        single = model(images[:1])
    _check_output(pair, 2, num_priors, num_classes)
    _check_output(single, 1, num_priors, num_classes)
    assert torch.isfinite(pair.loc).all() and torch.isfinite(pair.cls_logits).all()
    # Image 0 alone gives what it gives next to image 1 (eval mode): the reshape never mixes the batch.
    torch.testing.assert_close(single.loc[0], pair.loc[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single.cls_logits[0], pair.cls_logits[0], rtol=1e-4, atol=1e-5)
    # The two images differ, so their predictions must too.
    assert not torch.allclose(pair.cls_logits[0], pair.cls_logits[1])


@pytest.mark.slow
def test_ssd512_forward_shapes():
    """SSD512 is ~90 GMAC per image: one real forward at batch 1, batch 2 on the meta device (shapes only)."""
    num_priors = 24564  # 4*64^2 + 6*(32^2 + 16^2 + 8^2 + 4^2) + 4*(2^2 + 1^2)
    model = build_ssd("ssd512_vgg16", 21).eval()
    with torch.no_grad():
        out = model(_images(1, 512))
    _check_output(out, 1, num_priors, 21)
    assert torch.isfinite(out.loc).all() and torch.isfinite(out.cls_logits).all()
    with torch.device("meta"):
        meta_model = build_ssd("ssd512_vgg16", 21)
        _check_output(meta_model(torch.empty(2, 3, 512, 512)), 2, num_priors, 21)


def test_preset_metadata_and_paper_feature_maps():
    assert set(PRESETS) == {"ssd_tiny", "ssd300_vgg16", "ssd512_vgg16"} == set(PRESET_PRIORS)
    # The paper's maps: SSD300 38, 19, 10, 5, 3, 1 -> 8732 priors; SSD512 64..1 -> 24564.
    ssd300 = build_ssd("ssd300_vgg16", 21)
    assert ssd300.source_sides() == (38, 19, 10, 5, 3, 1)
    assert (ssd300.preset, ssd300.num_classes, ssd300.image_size) == ("ssd300_vgg16", 21, 300)
    assert ssd300.prior_spec == SSD300_VOC and ssd300.prior_spec.num_priors == 8732
    ssd512 = build_ssd("ssd512_vgg16", 21)
    assert ssd512.source_sides() == (64, 32, 16, 8, 4, 2, 1)
    assert ssd512.prior_spec == SSD512_VOC and ssd512.image_size == 512
    tiny = build_ssd("ssd_tiny", 4)
    assert tiny.prior_spec == SSD_TINY_PRIORS and tiny.source_sides() == SSD_TINY_PRIORS.feature_maps


def test_ssd300_layers_follow_the_paper_and_count_parameters_by_hand():
    model = build_ssd("ssd300_vgg16", 21)
    fc6, fc7 = model.vgg[31], model.vgg[33]
    assert fc6.weight.shape == (1024, 512, 3, 3) and fc6.dilation == (6, 6) and fc6.padding == (6, 6)
    assert fc7.weight.shape == (1024, 1024, 1, 1)
    assert isinstance(model.vgg[22], nn.ReLU) and model.vgg[21].weight.shape == (512, 512, 3, 3)  # conv4_3
    assert model.vgg[16].ceil_mode and model.vgg[30].kernel_size == 3 and model.vgg[30].stride == 1  # pool3, pool5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the paper's VGG has no BN

    # Parameters, by hand: the 13 VGG16 convs hold 14,714,688 (the published VGG16 figure without its
    # classifier); conv(cin, cout, k) holds k*k*cin*cout + cout.
    def conv(cin, cout, k):
        return k * k * cin * cout + cout

    fc = conv(512, 1024, 3) + conv(1024, 1024, 1)
    extras = (
        conv(1024, 256, 1)
        + conv(256, 512, 3)
        + conv(512, 128, 1)
        + conv(128, 256, 3)
        + 2 * (conv(256, 128, 1) + conv(128, 256, 3))
    )
    boxes = (4, 6, 6, 6, 4, 4)  # per source, the paper
    channels = (512, 1024, 512, 256, 256, 256)
    heads = sum(conv(c, a * 4, 3) + conv(c, a * 21, 3) for c, a in zip(channels, boxes, strict=True))
    expected = 14_714_688 + fc + 512 + extras + heads  # 512: the L2Norm scales
    assert sum(p.numel() for p in model.parameters()) == expected


# ------------------------------------------------------------------------------------------ prior order
@pytest.mark.parametrize("channels_last", [False, True])
def test_predictions_come_in_generate_priors_order(channels_last):
    """Slow reference: walk level, row, column, box and read each head's raw map at that cell."""
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", 3).eval()
    images = _images(2, model.image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    raw_loc, raw_conf = {}, {}
    for k, (loc_head, conf_head) in enumerate(zip(model.loc, model.conf, strict=True)):
        loc_head.register_forward_hook(lambda _m, _i, out, k=k: raw_loc.__setitem__(k, out))
        conf_head.register_forward_hook(lambda _m, _i, out, k=k: raw_conf.__setitem__(k, out))
    with torch.no_grad():
        out = model(images)
    spec = model.prior_spec
    priors = model.priors()
    p = 0
    for k, (side, boxes, step) in enumerate(zip(spec.feature_maps, spec.boxes_per_location, spec.steps, strict=True)):
        for row in range(side):
            for col in range(side):
                # the prior at index p sits at this cell: centre ((col + 0.5) step, (row + 0.5) step) / S
                centre = torch.tensor([(col + 0.5) * step, (row + 0.5) * step]) / spec.image_size
                torch.testing.assert_close(priors[p : p + boxes, :2], centre.expand(boxes, 2))
                for a in range(boxes):
                    assert torch.equal(out.loc[:, p], raw_loc[k][:, 4 * a : 4 * a + 4, row, col])
                    assert torch.equal(out.cls_logits[:, p], raw_conf[k][:, 3 * a : 3 * a + 3, row, col])
                    p += 1
    assert p == out.loc.shape[1] == spec.num_priors


# ------------------------------------------------------------------------------------ construction checks
def test_mismatched_prior_spec_fails_at_construction():
    with pytest.raises(ValueError, match=r"source maps are \(20, 10, 5, 3, 1\).*feature_maps is \(38, 19"):
        build_ssd("ssd_tiny", 5, prior_spec=PriorSpec.from_scales(160, (38, 19, 10, 5, 3), ((2,),) * 5))
    # SSD300's network at 512 input makes 64, 32, 16, 8, 6, 4 - not SSD512's seven levels.
    with pytest.raises(ValueError, match="6 source maps .* 7 levels"):
        build_ssd("ssd300_vgg16", 21, prior_spec=SSD512_VOC)
    # 150 -> 75 -> 38 (stride-2 convs, pad 1) -> 19 (pool) -> 9 (pool, floor) -> 5 -> 3 -> 1
    with pytest.raises(ValueError, match=r"at 150x150 input the network's source maps are \(19, 9, 5, 3, 1\)"):
        build_ssd("ssd_tiny", 5, prior_spec=PriorSpec.from_scales(150, (20, 10, 5, 3, 1), ((2,),) * 5))


def test_another_fitting_prior_spec_is_used():
    model = build_ssd("ssd300_vgg16", 81, prior_spec=SSD300_COCO)
    assert model.prior_spec is SSD300_COCO and model.num_classes == 81
    assert model.conf[0].out_channels == 4 * 81


def test_prior_count_check_catches_heads_that_disagree_with_the_spec():
    model = build_ssd("ssd_tiny", 3)
    model.loc[0] = nn.Conv2d(model.loc[0].in_channels, 6 * 4, 3, padding=1)  # 6 boxes where the spec has 4
    with pytest.raises(ValueError, match=f"heads predict {2390 + 20 * 20 * 2} boxes but prior_spec has 2390"):
        model._check_against_priors()


@pytest.mark.parametrize(
    ("preset", "num_classes", "error", "message"),
    [
        ("ssd_huge", 3, ValueError, "unknown preset 'ssd_huge'"),
        ("ssd_tiny", 1, ValueError, "num_classes counts background too"),
        ("ssd_tiny", 2.0, ValueError, "num_classes"),
    ],
)
def test_bad_build_arguments(preset, num_classes, error, message):
    with pytest.raises(error, match=message):
        build_ssd(preset, num_classes)


def test_bad_inputs_are_rejected():
    model = build_ssd("ssd_tiny", 3)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 160, 160\], got \(1, 3, 128, 128\)"):
        model(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.zeros(3, 160, 160))
    with pytest.raises(TypeError, match="float images"):
        model(torch.zeros(1, 3, 160, 160, dtype=torch.uint8))


def test_output_side_arithmetic():
    # 75 -> ceil((75 - 2) / 2) + 1 = 38 with ceil mode, floor -> 37; dilated 3x3 pad 6 keeps 19.
    assert output_side([nn.MaxPool2d(2, 2, ceil_mode=True)], 75) == 38
    assert output_side([nn.MaxPool2d(2, 2)], 75) == 37
    assert output_side([nn.Conv2d(1, 1, 3, padding=6, dilation=6)], 19) == 19
    assert output_side([nn.Sequential(nn.Conv2d(1, 1, 4, padding=1), nn.ReLU())], 2) == 1  # SSD512's conv12_2
    with pytest.raises(TypeError, match="AvgPool2d"):
        output_side([nn.AvgPool2d(2)], 8)


def test_initialisation():
    model = build_ssd("ssd_tiny", 3)
    assert torch.equal(model.l2norm.weight, torch.full((128,), 20.0))
    for head in [*model.loc, *model.conf]:
        assert head.weight.std() < 0.02 and torch.equal(head.bias, torch.zeros_like(head.bias))
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in batch_norms)


# -------------------------------------------------------------------------------------------- L2Norm
def test_l2norm_golden_values():
    # A location with channels (3, 4) has norm 5: scaled by 20 it becomes (12, 16); all-zero stays 0.
    layer = L2Norm(2)
    x = torch.zeros(1, 2, 1, 2)
    x[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    y = layer(x)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([12.0, 16.0]))
    assert torch.equal(y[0, :, 0, 1], torch.zeros(2))
    y.sum().backward()
    # d/dw_c sum(w_c * x_c / |x|) = x_c / |x| summed over locations: (0.6, 0.8)
    torch.testing.assert_close(layer.weight.grad, torch.tensor([0.6, 0.8]))


def test_l2norm_gradients_match_finite_differences_in_float64():
    layer = L2Norm(5, init_scale=3.0).double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradcheck(
        lambda w: torch.func.functional_call(layer, {"weight": w}, (x,)),
        (layer.weight.detach().clone().requires_grad_(),),
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_l2norm_hand_written_backward_matches_autograd_of_the_formula(channels_last):
    layer = L2Norm(16)
    with torch.no_grad():
        layer.weight.uniform_(5.0, 25.0)
    x = torch.randn(3, 16, 7, 7).relu()  # ReLU'd input with some all-zero locations, as after conv4_3
    x[0, :, 0, 0] = 0.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 16, 7, 7)
    x_fast = x.clone().requires_grad_()
    layer(x_fast).backward(grad_out)
    x_ref = x.clone().requires_grad_()
    weight_ref = layer.weight.detach().clone().requires_grad_()
    reference = weight_ref.view(1, -1, 1, 1) * x_ref / (x_ref.pow(2).sum(1, keepdim=True).sqrt() + layer.eps)
    reference.backward(grad_out)
    with torch.no_grad():  # the inference path
        torch.testing.assert_close(layer(x), reference.detach())
    # At the all-zero location the reference's sqrt has an infinite slope (NaN gradient); ours stays finite
    # there (and ReLU, which made the zeros, passes no gradient back anyway). Compare everywhere else.
    assert torch.isfinite(x_fast.grad).all()
    nonzero = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    nonzero[0, :, 0, 0] = False
    torch.testing.assert_close(x_fast.grad * nonzero, x_ref.grad.nan_to_num() * nonzero)
    torch.testing.assert_close(layer.weight.grad, weight_ref.grad)


def test_l2norm_all_zero_location_is_zero_not_nan_in_every_dtype():
    layer = L2Norm(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.zeros(1, 4, 2, 2, dtype=dtype)
        x[0, :, 1, 1] = torch.tensor([1.0, 2.0, 2.0, 4.0], dtype=dtype)  # norm 5
        y = layer(x.clone().requires_grad_())
        assert torch.equal(y[0, :, 0, 0], torch.zeros(4, dtype=dtype)), dtype
        torch.testing.assert_close(y[0, :, 1, 1].float(), torch.tensor([4.0, 8.0, 8.0, 16.0]), rtol=1e-2, atol=0)


def test_l2norm_bf16_matches_fp32_and_keeps_dtype_and_layout():
    layer = L2Norm(64)
    x = torch.randn(2, 64, 5, 5).abs() * 30
    ref = layer(x)
    low = layer(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=2e-2, atol=1e-2)  # bf16 keeps ~3 significant digits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cl = layer(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl.float(), ref, rtol=2e-2, atol=1e-2)


# -------------------------------------------------------------------------------- layout and precision
def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_channels_last_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    # Eval mode: batch norm on running statistics. (In training mode, BN over a batch of 2 on the 1x1 map
    # normalises every value to +-1 and its gradient is rounding noise, whatever the layout.)
    model = build_ssd("ssd_tiny", 4).eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = _images(2, model.image_size)
    out = model(images)
    out_cl = model_cl(images.contiguous(memory_format=torch.channels_last))
    # Same maths, different summation order inside the convolutions: float32 rounding only.
    torch.testing.assert_close(out_cl.loc, out.loc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_cl.cls_logits, out.cls_logits, rtol=1e-4, atol=1e-4)
    (out.loc.sum() + out.cls_logits.logsumexp(-1).sum()).backward()
    (out_cl.loc.sum() + out_cl.cls_logits.logsumexp(-1).sum()).backward()
    for (name, p), p_cl in zip(model.named_parameters(), model_cl.parameters(), strict=True):
        assert _relative_error(p_cl.grad, p.grad) < 1e-3, name


def test_bf16_autocast_forward_and_backward_agree_with_fp32():
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", 4).to(memory_format=torch.channels_last).eval()  # eval: see the test above
    images = _images(2, model.image_size).contiguous(memory_format=torch.channels_last)
    ref = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images)
    assert low.loc.dtype == torch.float32 and low.cls_logits.dtype == torch.float32  # cast back for the loss
    # bf16 keeps 8 mantissa bits (0.4% per rounding); through ~20 layers the outputs move ~0.5% (measured),
    # the gradients up to ~7% (the first conv's, summed over the most positions); limits have 2-4x margin.
    assert _relative_error(low.loc, ref.loc) < 0.02
    assert _relative_error(low.cls_logits, ref.cls_logits) < 0.02
    low_loss = low.loc.square().sum() + low.cls_logits.logsumexp(-1).sum()
    low_loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (ref.loc.square().sum() + ref.cls_logits.logsumexp(-1).sum()).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(grads[name]).all(), name
        assert _relative_error(grads[name], p.grad) < 0.15, name


# -------------------------------------------------------------------------------------------- learning
def _synthetic_batch(num_images: int, size: int, seed: int):
    """Filled rectangles of three class colours on noise; boxes xyxy normalised."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5]])
    images = 0.3 * torch.randn(num_images, 3, size, size, generator=gen)
    boxes = torch.zeros(num_images, 3, 4)
    labels = torch.zeros(num_images, 3, dtype=torch.int64)
    mask = torch.zeros(num_images, 3, dtype=torch.bool)
    for b in range(num_images):
        for g in range(1 + b % 3):
            side = int(torch.randint(20, 80, (1,), generator=gen))
            x0, y0 = (int(v) for v in torch.randint(0, size - side, (2,), generator=gen))
            cls = int(torch.randint(0, 3, (1,), generator=gen))
            images[b, :, y0 : y0 + side, x0 : x0 + side] = colours[cls, :, None, None]
            boxes[b, g] = torch.tensor([x0, y0, x0 + side, y0 + side]) / size
            labels[b, g], mask[b, g] = cls + 1, True
    return images, boxes, labels, mask


@pytest.mark.slow
def test_ssd_tiny_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", 4)
    images, boxes, labels, mask = _synthetic_batch(4, model.image_size, seed=1)
    targets = assign_targets(boxes, labels, mask, model.priors())
    positives = targets.cls_targets > 0
    assert positives.any()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(40):  # measured: the loss is ~1% of its start after 30 steps, for several seeds
        out = model(images)
        terms = multibox_loss(out.loc, out.cls_logits, targets.loc_targets, targets.cls_targets)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        losses.append(terms.total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    # What was learnt is the task: the matched priors now name their object's class. (Training mode: the
    # batch-norm statistics of this batch, as during fitting; 40 steps are too few for the running averages.)
    with torch.no_grad():
        predicted = model(images).cls_logits.argmax(-1)
    accuracy = (predicted[positives] == targets.cls_targets[positives]).float().mean().item()
    assert accuracy > 0.9, accuracy
