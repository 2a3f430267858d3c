"""ssd_core.loss: the seed notebook's worked example, ssd_core.reference (values and gradients), edge cases."""

import pytest
import torch

from ssd_core.loss import LossTerms, background_rank_key, hard_negative_mask, multibox_loss
from ssd_core.reference import reference_hard_negative_mask, reference_multibox_loss

# ../shared/seeds/003_90fd92c1ab64e943.txt: 3 images x 5 anchors, 3 classes with BACKGROUND IN THE LAST
# COLUMN of the one-hot targets, and the per-anchor cross-entropy `conf` it mines from.
SEED_GT_CL = torch.tensor(
    [
        [[0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]],
        [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]],
        [[0, 0, 1], [0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]],
    ]
)
SEED_CONF = torch.tensor(
    [
        [0.39282098, 0.4600574, 0.01153591, 0.14568441, 0.85366163],
        [0.33491521, 0.18863397, 0.18936157, 0.18933312, 0.09754541],
        [0.71655552, 0.89165631, 0.28296348, 0.45780019, 0.41719255],
    ]
)
SEED_GT_LOC = torch.tensor(
    [
        [
            [1.9740728, 0.00531998, 0.05073944, 1.9181988],
            [0.9836687, 0.70806366, 0.47138602, -0.11364946],
            [-0.7118693, -0.9339045, 0.21746619, 1.0575892],
            [-0.26124918, -0.02741667, -1.823249, 0.07471395],
            [-1.289948, 1.1268674, 1.3789265, -0.07503923],
        ],
        [
            [1.65405, 2.0445502, -1.3374531, -0.706513],
            [-0.24702965, 1.5699501, 2.0597308, -0.26911816],
            [-0.37924895, -1.8115596, -0.7363666, 1.2832676],
            [-0.89154685, 1.0267923, 0.44763702, -0.05752175],
            [-1.6820769, -0.88885796, -0.07986308, 0.46741524],
        ],
        [
            [-1.7251089, 1.1858717, -2.1313174, 3.0536988],
            [0.3876682, 0.818881, 0.3098628, 1.6061039],
            [-0.7169859, 0.2832111, -0.21452603, 1.2144817],
            [-0.33307076, -0.4277424, -1.0602584, 0.8980847],
            [1.0648307, -1.0960479, 1.1318891, -0.932937],
        ],
    ]
)
# The seed's printed results: per-image confidence sums (positives + mined negatives) and their batch mean.
SEED_SUMS = torch.tensor([1.8637604, 0.9022439, 2.766168])
SEED_MEAN = 1.8440574


def seed_classes() -> torch.Tensor:
    """Seed one-hot (background last) -> our class ids (background 0): seed column 2 -> 0, column j -> j + 1."""
    column = SEED_GT_CL.argmax(dim=-1)  # [3, 5]
    return torch.where(column == SEED_GT_CL.shape[-1] - 1, 0, column + 1)


def logits_with_loss(classes: torch.Tensor, losses: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose cross-entropy against ``classes`` is exactly ``losses``.

    With the target logit 0 and the other C - 1 logits a = log((e^c - 1) / (C - 1)), the softmax of the target is
    1 / (1 + (C - 1) e^a) = 1 / e^c, so the cross-entropy is c.
    """
    other = torch.log((torch.exp(losses.double()) - 1) / (num_classes - 1))  # [B, P]
    logits = other[..., None].expand(*losses.shape, num_classes).clone()
    logits.scatter_(-1, classes[..., None], 0.0)
    return logits.float()


def test_seed_example_mining():
    classes = seed_classes()
    positive = classes > 0
    # Positives per image: 4, 1, 2. Negatives kept: min(3 * 4, 1) = 1, min(3 * 1, 4) = 3, min(3 * 2, 3) = 3; in
    # image 1 the three highest of 0.18863, 0.18936, 0.18933, 0.09755 leave out anchor 4.
    negative = hard_negative_mask(SEED_CONF, positive)
    assert negative.tolist() == [
        [True, False, False, False, False],
        [False, True, True, True, False],
        [True, True, False, True, False],
    ]
    sums = (SEED_CONF * (positive | negative)).sum(dim=1)
    torch.testing.assert_close(sums, SEED_SUMS)
    torch.testing.assert_close(sums.mean(), torch.tensor(SEED_MEAN))


def test_seed_example_through_multibox_loss():
    classes = seed_classes()
    logits = logits_with_loss(classes, SEED_CONF, num_classes=3).requires_grad_()
    positive = classes > 0
    # Localisation: predictions off by 0.5 on every coordinate in images 0 and 2, by 2.0 in image 1; smooth-L1
    # gives 0.5 * 0.5^2 = 0.125 and 2.0 - 0.5 = 1.5 per coordinate, so 0.5 and 6.0 per positive anchor.
    # Background rows get absurd predictions that must not count.
    delta = torch.tensor([0.5, 2.0, 0.5])[:, None, None].expand(3, 5, 4)
    loc_pred = torch.where(positive[..., None], SEED_GT_LOC + delta, 100.0)
    n = torch.tensor([4.0, 1.0, 2.0])  # positives per image, N = 7
    loc_per_image = torch.tensor([4 * 0.5, 1 * 6.0, 2 * 0.5])

    # The seed's normalisation: each image by its own N, then the mean over images:
    # (1.8637604 / 4 + 0.9022439 / 1 + 2.766168 / 2) / 3 = 0.9170893; loc (0.5 + 6 + 0.5) / 3 = 7/3.
    terms = multibox_loss(loc_pred, logits, SEED_GT_LOC, classes, normalize="per_image", alpha=2.0)
    assert isinstance(terms, LossTerms)
    torch.testing.assert_close(terms.conf, (SEED_SUMS / n).mean())
    torch.testing.assert_close(terms.conf, torch.tensor(0.9170893))
    torch.testing.assert_close(terms.loc, torch.tensor(7 / 3))
    torch.testing.assert_close(terms.total, terms.conf + 2.0 * terms.loc)
    assert int(terms.num_positives) == 7

    # The paper's normalisation: everything by N = 7: 5.5321723 / 7 = 0.7903103; loc 9 / 7.
    terms = multibox_loss(loc_pred, logits, SEED_GT_LOC, classes)
    torch.testing.assert_close(terms.conf, SEED_SUMS.sum() / 7)
    torch.testing.assert_close(terms.loc, loc_per_image.sum() / 7)
    torch.testing.assert_close(terms.total, terms.conf + terms.loc)


def random_problem(seed: int, num_images=3, num_priors=300, num_classes=6, empty_image=False, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    loc_pred = torch.randn(num_images, num_priors, 4, generator=gen)
    logits = torch.randn(num_images, num_priors, num_classes, generator=gen) * scale
    loc_targets = torch.randn(num_images, num_priors, 4, generator=gen)
    draw = torch.rand(num_images, num_priors, generator=gen)
    cls_targets = torch.where(draw < 0.06, torch.randint(1, num_classes, draw.shape, generator=gen), 0)
    cls_targets = torch.where(draw > 0.97, -1, cls_targets)
    if empty_image:
        cls_targets[1] = torch.where(cls_targets[1] > 0, 0, cls_targets[1])
    return loc_pred, logits, loc_targets, cls_targets


@pytest.mark.parametrize(
    ("seed", "normalize", "ratio", "empty_image"),
    [
        (0, "batch", 3, False),
        (1, "per_image", 3, False),
        (2, "batch", 2.5, True),
        (3, "per_image", 3, True),
        (4, "batch", 0, False),
        (5, "per_image", 100, False),
    ],
)
def test_multibox_loss_matches_the_reference_values_and_gradients(seed, normalize, ratio, empty_image):
    loc_pred, logits, loc_targets, cls_targets = random_problem(seed, empty_image=empty_image)
    ours_loc, ours_logits = loc_pred.clone().requires_grad_(), logits.clone().requires_grad_()
    ref_loc, ref_logits = loc_pred.clone().requires_grad_(), logits.clone().requires_grad_()
    terms = multibox_loss(
        ours_loc, ours_logits, loc_targets, cls_targets, neg_pos_ratio=ratio, alpha=1.5, normalize=normalize
    )
    total, loc, conf = reference_multibox_loss(ref_loc, ref_logits, loc_targets, cls_targets, ratio, 1.5, normalize)
    torch.testing.assert_close(terms.loc.double(), loc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.conf.double(), conf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.total.double(), total, rtol=1e-5, atol=1e-6)
    terms.total.backward()
    total.backward()
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad.float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours_loc.grad, ref_loc.grad.float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_hard_negative_mask_matches_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    conf_loss = torch.rand(5, 400, generator=gen) * 5
    positive = torch.rand(5, 400, generator=gen) < (0.02, 0.1, 0.3, 0.5)[seed]
    positive[0] = False  # an image without positives mines nothing
    ignore = (torch.rand(5, 400, generator=gen) < 0.05) & ~positive if seed % 2 else None
    ratio = (3, 2.5, 3, 1)[seed]
    mask = hard_negative_mask(conf_loss, positive, ratio, ignore_mask=ignore)
    assert torch.equal(mask, reference_hard_negative_mask(conf_loss, positive, ratio, ignore))
    assert not bool((mask & positive).any()) and not bool(mask[0].any())


def test_ignored_priors_are_never_mined():
    conf_loss = torch.tensor([[9.0, 1.0, 2.0, 3.0, 0.5]])
    positive = torch.tensor([[False, True, False, False, False]])
    ignore = torch.tensor([[True, False, False, False, False]])  # the hardest prior is ignored
    mask = hard_negative_mask(conf_loss, positive, 2, ignore_mask=ignore)
    assert mask.tolist() == [[False, False, True, True, False]]


def test_background_rank_key_orders_like_the_background_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 7, generator=gen) * 4
    exact = -torch.log_softmax(logits.double(), dim=-1)[..., 0]
    torch.testing.assert_close(background_rank_key(logits).double(), exact.exp(), rtol=2e-6, atol=0)
    # Logits too large for float32 exponentials take the log_softmax path: the loss itself, still finite.
    huge = logits * 60
    key = background_rank_key(huge)
    assert bool(torch.isfinite(key).all())
    torch.testing.assert_close(key.double(), -torch.log_softmax(huge.double(), dim=-1)[..., 0], rtol=1e-5, atol=1e-5)


def test_huge_logits_give_the_reference_loss():
    loc_pred, logits, loc_targets, cls_targets = random_problem(7, scale=150.0)
    terms = multibox_loss(loc_pred, logits, loc_targets, cls_targets)
    total, _, _ = reference_multibox_loss(loc_pred, logits, loc_targets, cls_targets)
    assert bool(torch.isfinite(terms.total))
    torch.testing.assert_close(terms.total.double(), total, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("normalize", ["batch", "per_image"])
@pytest.mark.parametrize("fill", [0, -1])
def test_no_positives_gives_zero_not_nan(normalize, fill):
    loc_pred, logits, loc_targets, _ = random_problem(3)
    loc_pred.requires_grad_()
    logits.requires_grad_()
    cls_targets = torch.full(logits.shape[:2], fill)
    terms = multibox_loss(loc_pred, logits, loc_targets, cls_targets, normalize=normalize)
    assert terms.loc.item() == 0.0 and terms.conf.item() == 0.0 and terms.total.item() == 0.0
    assert int(terms.num_positives) == 0
    terms.total.backward()
    assert bool((logits.grad == 0).all()) and bool((loc_pred.grad == 0).all())


def test_mining_carries_no_gradient():
    loc_pred, logits, loc_targets, cls_targets = random_problem(4)
    logits.requires_grad_()
    conf_loss = -torch.log_softmax(logits, dim=-1)[..., 0]
    assert not hard_negative_mask(conf_loss, cls_targets > 0).requires_grad
    terms = multibox_loss(loc_pred, logits, loc_targets, cls_targets)
    terms.total.backward()
    # Only positives and mined negatives receive gradient; each of their rows sums to 0 (softmax - one-hot).
    touched = logits.grad.abs().sum(-1) > 0  # [B, P]
    mined = hard_negative_mask(conf_loss.detach(), cls_targets > 0, ignore_mask=cls_targets < 0)
    assert torch.equal(touched, (cls_targets > 0) | mined)
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(touched.shape), atol=1e-7, rtol=0)


def test_inputs_are_not_modified():
    problem = random_problem(6)
    copies = [t.clone() for t in problem]
    multibox_loss(*problem, normalize="per_image")
    for before, after in zip(copies, problem, strict=True):
        assert torch.equal(before, after)


def test_errors_say_what_was_expected():
    loc_pred, logits, loc_targets, cls_targets = random_problem(0)
    with pytest.raises(ValueError, match=r"loc_pred must be \[B, P, 4\] = \[3, 300, 4\], got \[3, 299, 4\]"):
        multibox_loss(loc_pred[:, 1:], logits, loc_targets, cls_targets)
    with pytest.raises(ValueError, match=r"cls_targets must be \[B, P\]"):
        multibox_loss(loc_pred, logits, loc_targets, cls_targets[:2])
    with pytest.raises(TypeError, match="cls_targets must be int64"):
        multibox_loss(loc_pred, logits, loc_targets, cls_targets.float())
    with pytest.raises(ValueError, match="normalize must be one of"):
        multibox_loss(loc_pred, logits, loc_targets, cls_targets, normalize="image")
    with pytest.raises(ValueError, match="neg_pos_ratio must be >= 0"):
        multibox_loss(loc_pred, logits, loc_targets, cls_targets, neg_pos_ratio=-1)
    with pytest.raises(ValueError, match="bool positive_mask"):
        hard_negative_mask(logits[..., 0], cls_targets)


def test_mining_orders_any_float_values_correctly():
    # Negative losses, zeros of both signs and infinities (mining ranks float32 on integer keys internally).
    #          0     1     2    3      4       5     6             7             8    9
    values = [-3.5, -0.0, 0.0, 1e-30, -1e-30, 7.25, float("inf"), float("-inf"), 2.0, -2.0]
    conf_loss = torch.tensor([values])

    def mined(positives, ratio):
        positive = torch.zeros(1, 10, dtype=torch.bool)
        positive[0, positives] = True
        return hard_negative_mask(conf_loss, positive, ratio).nonzero()[:, 1].tolist()

    assert mined([3], 3) == [5, 6, 8]  # inf, 7.25, 2.0
    assert mined([5, 6], 1) == [3, 8]  # 2.0, 1e-30
    assert mined([6], 5) == [1, 2, 3, 5, 8]  # 7.25, 2.0, 1e-30 and both zeros
    assert mined([6], 7) == [1, 2, 3, 4, 5, 8, 9]  # then -1e-30 and -2.0; not -3.5 or -inf
    assert mined([6], 100) == [0, 1, 2, 3, 4, 5, 7, 8, 9]  # every negative, -inf included


def test_certain_background_is_mined_not_the_positives():
    # Logit gaps of 200 overflow float32 exponentials, so the exact log_softmax path ranks the priors. The negatives
    # are certain background (loss exactly 0), the positives certain of their class; all 4 negatives are kept
    # (3 x 4 positives > 4) and nothing else, so the loss is 0 and no positive is counted as a negative.
    logits = torch.zeros(1, 8, 2)
    cls_targets = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0]])
    logits[0, cls_targets[0] == 0, 0] = 200.0
    logits[0, cls_targets[0] == 1, 1] = 200.0
    logits.requires_grad_()
    terms = multibox_loss(torch.zeros(1, 8, 4), logits, torch.zeros(1, 8, 4), cls_targets)
    assert terms.conf.item() == 0.0
    terms.total.backward()
    assert bool((logits.grad == 0).all())
