"""ssd_core.static_matching (and multibox_loss's static path): the same targets, loss and gradients as the packed
CPU forms, and ``torch.compile(fullgraph=True)`` of assignment + loss + backward without a graph break."""

import pytest
import torch

from ssd_core.loss import multibox_loss
from ssd_core.matching import assign_targets
from ssd_core.static_matching import wants_static_shapes
from tests.ssd_core.test_matching import QUADRANTS, SMALL_PRIORS, SSD300_PRIORS, random_batch

PRIORS = {"ssd300": SSD300_PRIORS, "small": SMALL_PRIORS, "quadrants": QUADRANTS}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("priors", ["ssd300", "small", "quadrants"])
def test_static_targets_equal_the_packed_ones_bit_for_bit(seed, priors):
    gen = torch.Generator().manual_seed(seed)
    num_gt = (1, 3, 8, 20)[seed % 4]  # quadrants with 8 or 20 boxes: more boxes than priors
    boxes, labels, mask, difficult = random_batch(gen, 4, num_gt, difficult_rate=0.25 if seed % 2 else 0.0)
    kwargs = {"gt_difficult": difficult} if seed % 2 else {}
    packed = assign_targets(boxes, labels, mask, PRIORS[priors], static_shapes=False, **kwargs)
    static = assign_targets(boxes, labels, mask, PRIORS[priors], static_shapes=True, **kwargs)
    assert torch.equal(static.cls_targets, packed.cls_targets)
    assert torch.equal(static.loc_targets, packed.loc_targets)


def test_static_targets_break_forced_ties_like_the_packed_form():
    # Three identical boxes want the same best prior: the later box wins each round (rounds 1, 2, 3).
    box = torch.tensor([[0.1, 0.1, 0.4, 0.4]]).expand(1, 3, 4).clone()
    labels, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
    packed = assign_targets(box, labels, mask, SSD300_PRIORS, static_shapes=False)
    static = assign_targets(box, labels, mask, SSD300_PRIORS, static_shapes=True)
    assert torch.equal(static.cls_targets, packed.cls_targets)
    assert sorted(static.cls_targets[static.cls_targets > 0].unique().tolist()) == [1, 2, 3]


def test_static_targets_of_empty_images_and_float64():
    boxes, labels, mask, _ = random_batch(torch.Generator().manual_seed(1), 3, 5)
    mask[1] = False
    for dtype in (torch.float32, torch.float64):
        packed = assign_targets(boxes.to(dtype), labels, mask, SMALL_PRIORS, static_shapes=False)
        static = assign_targets(boxes.to(dtype), labels, mask, SMALL_PRIORS, static_shapes=True)
        assert torch.equal(static.cls_targets, packed.cls_targets) and torch.equal(
            static.loc_targets, packed.loc_targets
        )
        assert not static.cls_targets[1].any()
    none = assign_targets(
        torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), mask[:2, :0], SMALL_PRIORS, static_shapes=True
    )
    assert none.cls_targets.shape == (2, len(SMALL_PRIORS)) and not none.cls_targets.any()


@pytest.mark.parametrize("normalize", ["batch", "per_image"])
def test_static_loss_equals_the_sparse_loss_and_gradients(normalize):
    gen = torch.Generator().manual_seed(3)
    boxes, labels, mask, difficult = random_batch(gen, 4, 6, difficult_rate=0.2)
    targets = assign_targets(boxes, labels, mask, SSD300_PRIORS, gt_difficult=difficult)
    loc = torch.randn(4, len(SSD300_PRIORS), 4, generator=gen, requires_grad=True)
    logits = (torch.randn(4, len(SSD300_PRIORS), 21, generator=gen) * 3).requires_grad_()
    results = []
    for static in (False, True):
        terms = multibox_loss(loc, logits, *targets, normalize=normalize, static_shapes=static)
        results.append((terms, *torch.autograd.grad(terms.total, (loc, logits))))
    (sparse, sparse_loc, sparse_cls), (dense, dense_loc, dense_cls) = results
    assert dense.num_positives == sparse.num_positives > 0
    for name in ("total", "loc", "conf"):  # only the summation order differs
        torch.testing.assert_close(getattr(dense, name), getattr(sparse, name), rtol=2e-6, atol=0)
    assert torch.equal(dense_loc, sparse_loc) and torch.equal(dense_cls, sparse_cls)


def test_static_loss_without_positives_is_zero():
    loc = torch.randn(2, 10, 4, requires_grad=True)
    terms = multibox_loss(
        loc, torch.randn(2, 10, 3), torch.zeros(2, 10, 4), torch.zeros(2, 10, dtype=torch.long), static_shapes=True
    )
    assert terms.total.item() == 0.0 and terms.num_positives.item() == 0


def test_the_default_is_packed_on_cpu_and_static_elsewhere():
    cpu = torch.zeros(1)
    assert not wants_static_shapes(cpu, None) and wants_static_shapes(cpu, True)
    assert wants_static_shapes(torch.zeros(1, device="meta"), None)


def _assign_and_loss(boxes, labels, mask, difficult, priors, loc, logits):
    targets = assign_targets(boxes, labels, mask, priors, gt_difficult=difficult)
    terms = multibox_loss(loc, logits, targets.loc_targets, targets.cls_targets)
    return terms.total, targets.cls_targets


def test_assignment_and_loss_compile_to_one_graph_with_their_backward():
    """``fullgraph=True`` raises on any graph break (a host read, a data-dependent shape, a Python branch on a
    tensor). ``aot_eager`` traces forward and backward (AOTAutograd) like inductor does, without generating
    C++ (which takes minutes on this machine; ``train.compile``'s test runs inductor)."""
    gen = torch.Generator().manual_seed(0)
    boxes, labels, mask, difficult = random_batch(gen, 2, 4, difficult_rate=0.3)
    loc = torch.randn(2, len(SMALL_PRIORS), 4, generator=gen, requires_grad=True)
    logits = torch.randn(2, len(SMALL_PRIORS), 21, generator=gen, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(_assign_and_loss, fullgraph=True, backend="aot_eager")
    loss, cls_targets = compiled(boxes, labels, mask, difficult, SMALL_PRIORS, loc, logits)
    grads = torch.autograd.grad(loss, (loc, logits))
    eager_loss, eager_cls = _assign_and_loss(boxes, labels, mask, difficult, SMALL_PRIORS, loc, logits)
    eager_grads = torch.autograd.grad(eager_loss, (loc, logits))
    assert torch.equal(cls_targets, eager_cls)
    torch.testing.assert_close(loss, eager_loss, rtol=2e-6, atol=0)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_the_forced_rounds_are_traced_once_not_unrolled():
    """``train.max_boxes`` (100) forced-match rounds unrolled made one 6.3 MB C++ source that GCC 12 crashed on.
    The round is a nested compile region: the traced graph holds one round's code, called once per slot."""
    boxes, labels, mask, _ = random_batch(torch.Generator().manual_seed(0), 2, 40)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(
        lambda b, lab, m: assign_targets(b, lab, m, SMALL_PRIORS, static_shapes=True).cls_targets,
        fullgraph=True,
        backend=capture,
    )
    assert torch.equal(compiled(boxes, labels, mask), assign_targets(boxes, labels, mask, SMALL_PRIORS).cls_targets)
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and "invoke_subgraph" in str(n.target)]
    assert len(calls) == 40  # one per box slot
    assert len({n.args[0].target for n in calls}) == 1  # all the same subgraph
    assert len(graph.graph.nodes) < 400  # unrolled, each round's ~20 operations would make > 800


def test_the_packed_forms_break_the_graph():
    """The check above can fail: the packed CPU forms read counts back, which ``fullgraph`` refuses."""
    boxes, labels, mask, difficult = random_batch(torch.Generator().manual_seed(0), 2, 4)

    def packed(boxes, labels, mask):
        return assign_targets(boxes, labels, mask, SMALL_PRIORS, static_shapes=False).cls_targets

    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)graph break|data.dependent|unsupported|nonzero"):
        torch.compile(packed, fullgraph=True, backend="aot_eager")(boxes, labels, mask)


@pytest.mark.parametrize("normalize", ["batch", "per_image"])
def test_static_loss_takes_the_global_denominator_like_the_sparse_loss(normalize):
    gen = torch.Generator().manual_seed(4)
    boxes, labels, mask, _ = random_batch(gen, 3, 5)
    targets = assign_targets(boxes, labels, mask, SMALL_PRIORS)
    loc = torch.randn(3, len(SMALL_PRIORS), 4, generator=gen)
    logits = torch.randn(3, len(SMALL_PRIORS), 21, generator=gen)
    denominator = torch.tensor(7.5)
    sparse = multibox_loss(loc, logits, *targets, normalize=normalize, denominator=denominator, static_shapes=False)
    dense = multibox_loss(loc, logits, *targets, normalize=normalize, denominator=denominator, static_shapes=True)
    own = multibox_loss(loc, logits, *targets, normalize=normalize, static_shapes=True)
    torch.testing.assert_close(dense.total, sparse.total, rtol=2e-6, atol=0)
    assert not torch.isclose(dense.total, own.total)  # the denominator is used
