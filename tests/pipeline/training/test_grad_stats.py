"""pipeline.training.grad_stats: per-layer statistics against hand values and a slow reference; the summary
metrics; the bounded set of artifacts of a long run and its table; the history across a checkpoint."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_metric_name
from torch import nn

from pipeline.tracking import GRAD_METRIC_PREFIX, legal_metric_name
from pipeline.training.grad_stats import STAT_NAMES, SUMMARY_KEYS, GradStats, GradStatsRow, layer_name


def test_hand_computed_single_layer():
    # weight [3, 4] -> weight norm 5; gradient [.6, -.8] -> norm 1, mean -.1,
    # deviations from the mean +.7 and -.7 -> population std .7; max |g| .8.
    # SGD lr .5: update = .5 * [.6, -.8], norm .5 -> update/weight = .5 / 5 = .1.
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    model.weight.grad = torch.tensor([[0.6, -0.8]])
    stats = GradStats(model)
    stats.before_step()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    summary = stats.after_step(step=7)
    expected = {"norm": 1.0, "mean": -0.1, "std": 0.7, "max_abs": 0.8, "weight_norm": 5.0, "update_ratio": 0.1}
    (row,) = stats.table_rows
    assert (row.step, row.layer_index, row.layer) == (7, 0, "weight")  # a root-owned parameter keeps its name
    for key, value in expected.items():
        assert getattr(row, key) == pytest.approx(value, abs=1e-6), key
    # One layer: the global norm is its norm, the largest update ratio is its ratio, at layer_index 0.
    assert summary.metrics() == pytest.approx(
        {"grad_norm": 1.0, "grad_max_update_ratio": 0.1, "grad_max_update_layer": 0.0}, abs=1e-6
    )


def test_the_summary_norm_is_the_one_handed_over_before_clipping():
    # train_step hands over the total norm before clipping; the table keeps the clipped gradients' norms.
    model = nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[0.6, -0.8]])  # norm 1: as if clipped from 4
    stats = GradStats(model)
    stats.before_step(torch.tensor(4.0))
    assert stats.after_step(1).global_norm == 4.0 and stats.table_rows[0].norm == pytest.approx(1.0)


def test_summary_keys_are_legal_have_no_section_prefix_and_sort_after_no_headline_section():
    # MLflow 3's run page groups chart keys by the part before the last '/', sorts those sections by name
    # (JavaScript's default sort) and appends "Model metrics", the section of keys without any '/'
    # (getBaseChartAndSectionConfigs in mlflow/server/js). Keys without '/' come after train/ and val/.
    assert all(key.startswith(GRAD_METRIC_PREFIX) and "/" not in key for key in SUMMARY_KEYS)
    for key in SUMMARY_KEYS:
        _validate_metric_name(key)
        assert legal_metric_name(key) == key


def reference_stats(params_before, grads, params_after):
    """Slow reference: concatenate the layer's tensors and use torch's own reductions."""
    g = torch.cat([x.flatten() for x in grads]).double()
    w = torch.cat([x.flatten() for x in params_before]).double()
    w2 = torch.cat([x.flatten() for x in params_after]).double()
    return {
        "norm": g.norm().item(),
        "mean": g.mean().item(),
        "std": g.std(unbiased=False).item(),
        "max_abs": g.abs().max().item(),
        "weight_norm": w.norm().item(),
        "update_ratio": ((w2 - w).norm() / w.norm()).item(),
    }


class Wrapper(nn.Module):
    """Stands in for DDP: the model under ``module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def reference_summary(per_layer_grads, ratios):
    """Slow reference of the summary: every layer's gradient in one vector; the first largest ratio."""
    g = torch.cat([x.flatten() for grads in per_layer_grads for x in grads]).double()
    return g.norm().item(), max(ratios), ratios.index(max(ratios))


def test_matches_reference_on_a_real_training_step_with_momentum_and_ddp_style_names():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    model = Wrapper(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stats = GradStats(model, every=2)
    assert stats.layers == ["0", "2", "4"]
    for step in range(1, 5):
        optimizer.zero_grad()
        model.module(torch.randn(4, 3, 6, 6)).square().mean().backward()
        if stats.is_due(step):
            before = {name: [p.detach().clone() for p in net[int(name)].parameters()] for name in stats.layers}
            grads = {name: [p.grad.clone() for p in net[int(name)].parameters()] for name in before}
            stats.before_step()
        optimizer.step()
        if stats.is_due(step):
            summary = stats.after_step(step)
            rows = stats.table_rows[-3:]
            refs = [reference_stats(before[n], grads[n], list(net[int(n)].parameters())) for n in stats.layers]
            for row, name, ref in zip(rows, stats.layers, refs, strict=True):
                assert (row.step, row.layer) == (step, name)
                for stat, value in ref.items():
                    assert getattr(row, stat) == pytest.approx(value, rel=1e-9, abs=1e-12), (name, stat)
            norm, ratio, index = reference_summary(grads.values(), [ref["update_ratio"] for ref in refs])
            assert summary.global_norm == pytest.approx(norm, rel=1e-9)
            assert summary.max_update_ratio == pytest.approx(ratio, rel=1e-9) and summary.max_update_layer == index
    assert [(row.step, row.layer_index) for row in stats.table_rows] == [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)]
    steps, layers, values = stats.norm_history()
    assert steps == [2, 4] and layers == ["0", "2", "4"] and values.shape == (3, 2)
    assert values[1, 1] == stats.table_rows[4].norm
    assert stats.norm_history(up_to=3)[0] == [2] and stats.norm_history(up_to=1)[2].shape == (3, 0)


def test_missing_gradient_counts_as_zero_and_frozen_layers_are_left_out():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[2].requires_grad_(False)
    stats = GradStats(model)
    assert stats.layers == ["0", "1"]
    model(torch.ones(1, 2))  # no backward: every grad is None
    stats.before_step()
    summary = stats.after_step(1)
    assert summary == (0.0, 0.0, 0)  # no optimiser step either
    assert all(row.norm == row.max_abs == row.update_ratio == 0.0 for row in stats.table_rows)


def test_misuse_is_refused():
    stats = GradStats(nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="without before_step"):
        stats.after_step(1)
    stats.before_step()
    stats.after_step(5)
    stats.before_step()
    with pytest.raises(ValueError, match="steps must increase, got 5 after 5"):
        stats.after_step(5)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradStats(nn.ReLU())
    with pytest.raises(ValueError, match="every must be >= 0"):
        GradStats(nn.Linear(1, 1), every=-1)
    assert not GradStats(nn.Linear(1, 1), every=0).is_due(0)


def test_layer_names():
    assert layer_name("module.backbone.conv4_3.weight") == "backbone.conv4_3"
    assert layer_name("module._orig_mod.heads.0.bias") == "heads.0"
    assert layer_name("scale") == "scale"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_legal_metric_name_always_passes_mlflow_validation(name):
    legal = legal_metric_name(f"grad/{name}/norm")
    _validate_metric_name(legal)  # raises MlflowException if illegal
    assert len(legal) <= 250


def test_legal_metric_name_keeps_legal_names():
    for name in ("train/loss", "grad/backbone.conv1_1/update_ratio", "val/ap_small", "a b-c.d"):
        assert legal_metric_name(name) == name
    assert legal_metric_name("grad/x:y[0]/norm") == "grad/x_y_0_/norm"
    assert legal_metric_name("//a/./../b/") == "a/_/_/b"


def _train(model, optimizer, stats, steps, *, first=1, epoch_steps=None, out=None, reference=None, also=()):
    """Train ``model`` on random data, steps ``first`` .. ``first + steps - 1``; statistics where due (also
    into every GradStats in ``also``), the slow reference of each due step into ``reference``
    {(step, layer_index): stats}, and ``write_artifacts`` into ``out`` after every ``epoch_steps`` with new
    rows. Returns the artifact paths logged, one entry per file logged."""
    logged = []
    for step in range(first, first + steps):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        due = stats.is_due(step)
        if due:
            layers = [model[int(name)] for name in stats.layers]
            before = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
            grads = [[p.grad.clone() for p in layer.parameters()] for layer in layers]
            for s in (stats, *also):
                s.before_step()
        optimizer.step()
        if due:
            for s in (stats, *also):
                s.after_step(step)
            if reference is not None:
                for index, layer in enumerate(layers):
                    ref = reference_stats(before[index], grads[index], list(layer.parameters()))
                    reference[(step, index)] = ref
        if epoch_steps and step % epoch_steps == 0 and stats.has_unwritten_rows:
            logged += [f"{folder}/{path.name}" for path, folder in stats.write_artifacts(out)]
    return logged


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def test_a_600_step_run_of_short_epochs_logs_five_files_and_its_table_holds_every_due_step(tmp_path):
    # 600 steps, statistics every 50, an "epoch" of 5 steps: 120 epoch ends, 12 due steps. Artifacts are
    # written at the epoch ends that follow new statistics (12 times), always under the same two names,
    # plus one heatmap snapshot each at 25/50/75 % of max_steps (steps 150, 300, 450).
    model, optimizer = _tiny()
    stats, reference = GradStats(model, every=50, max_steps=600), {}
    logged = _train(model, optimizer, stats, 600, epoch_steps=5, out=tmp_path / "out", reference=reference)
    assert len(logged) == 12 * 2 + 3
    assert sorted(set(logged)) == [
        "grad_stats/grad_norm_heatmap.png",
        "grad_stats/grad_stats.csv",
        "grad_stats/snapshots/grad_norm_heatmap_step000150.png",
        "grad_stats/snapshots/grad_norm_heatmap_step000300.png",
        "grad_stats/snapshots/grad_norm_heatmap_step000450.png",
    ]
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) == 5
    with open(tmp_path / "out" / "grad_stats.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(GradStatsRow._fields)
    due = list(range(50, 601, 50))
    assert [(int(r["step"]), int(r["layer_index"])) for r in rows] == [(s, i) for s in due[::-1] for i in (0, 1)]
    assert {r["layer"] for r in rows if r["layer_index"] == "1"} == {"2"}  # the second Linear: model[2]
    for row in rows:  # every due step's per-layer values, as the slow reference computed them
        ref = reference[(int(row["step"]), int(row["layer_index"]))]
        for stat in STAT_NAMES:
            assert float(row[stat]) == pytest.approx(ref[stat], rel=1e-12, abs=1e-15), (row["step"], stat)
    assert (tmp_path / "out" / "grad_norm_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_snapshots_hold_the_steps_up_to_their_fraction_and_are_never_repeated(tmp_path):
    # max_steps 10, every 3: fractions at ceil(2.5)=3, 5 and ceil(7.5)=8 -> last due steps 3, 3 (the same
    # snapshot: written once) and 6. One write at the end of the run covers all three.
    model, optimizer = _tiny()
    stats = GradStats(model, every=3, max_steps=10)
    assert _train(model, optimizer, stats, 10, epoch_steps=10, out=tmp_path) == [
        "grad_stats/grad_stats.csv",
        "grad_stats/grad_norm_heatmap.png",
        "grad_stats/snapshots/grad_norm_heatmap_step000003.png",
        "grad_stats/snapshots/grad_norm_heatmap_step000006.png",
    ]
    assert not stats.has_unwritten_rows
    assert [p.name for p, _ in stats.write_artifacts(tmp_path)] == ["grad_stats.csv", "grad_norm_heatmap.png"]
    empty = GradStats(model, every=3, max_steps=10)
    assert [p.name for p, _ in empty.write_artifacts(tmp_path / "e")] == ["grad_stats.csv"]  # a header only
    assert (tmp_path / "e" / "grad_stats.csv").read_text().strip() == ",".join(GradStatsRow._fields)


def test_the_history_survives_a_checkpoint_round_trip(tmp_path):
    # One training run watched twice: "full" throughout; "first" for 6 steps, then saved with torch.save and
    # loaded (weights_only, as checkpoints are) into "second", which watches the rest. Same table, and the
    # snapshots written before the checkpoint are not written again.
    model, optimizer = _tiny()
    full = GradStats(model, every=2, max_steps=12)
    first = GradStats(model, every=2, max_steps=12)
    _train(model, optimizer, first, 6, epoch_steps=3, out=tmp_path / "a", also=(full,))
    buffer = io.BytesIO()
    torch.save({"grad_stats": first.state_dict()}, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["grad_stats"]
    assert state["snapshots"] == [2, 6]  # 25 and 50 % of 12 = steps 3 and 6 -> their last due steps 2 and 6
    second = GradStats(model, every=2, max_steps=12)
    second.load_state_dict(state)
    assert second.has_unwritten_rows  # a resumed job rewrites the table (its history included) at once
    logged = _train(model, optimizer, second, 6, first=7, epoch_steps=3, out=tmp_path / "b", also=(full,))
    assert second.table_rows == full.table_rows and [r.step for r in full.table_rows][::2] == [2, 4, 6, 8, 10, 12]
    assert [n for n in logged if "snapshots" in n] == ["grad_stats/snapshots/grad_norm_heatmap_step000008.png"]
    other = GradStats(nn.Sequential(nn.Linear(3, 4)), every=2)
    with pytest.raises(ValueError, match=r"for layers \['0', '2'\], this model has \['0'\]"):
        other.load_state_dict(state)
