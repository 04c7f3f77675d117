"""GrowWidth (Network Expansion, width): channel groups grow to the planned widths, init="preserve"
keeps the function (float64 and float32), new filters are orthogonal, and models without a width
plan (or with a record that does not fit) are refused before any change."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand.core import GrowthRecord, get_record, set_record
from fxexpand.passes import GrowWidth
from fxexpand.testing import (
    assert_graph_matches,
    assert_unchanged,
    randomize_bn,
    rel_error,
    snapshot,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class Net(nn.Module):
    """Two channel groups (stem + depthwise + residual: ``a``; ``down``: ``b``); the head is frozen."""

    def __init__(self, a=8, b=6):
        super().__init__()
        self.stem = nn.Conv2d(3, a, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(a)
        self.dw = nn.Conv2d(a, a, 3, padding=1, groups=a)
        self.down = nn.Conv2d(a, b, 3, stride=2)
        self.fc = nn.Linear(b, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + F.relu(self.dw(y))
        y = F.relu(self.down(y))
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(0))


def start_model(dtype=torch.float32, init="preserve"):
    full = randomize_bn(Net()).to(dtype)
    plan = fxexpand.GrowthPlan(full, width_factor=0.5, stages=3, example_inputs=(X[:1].to(dtype),), init=init)
    assert plan.groups == {"stem": 8, "down": 6} and plan.alphas == [0.5, 0.75, 1.0]
    return randomize_bn(plan.initial_model(), seed=1)  # the start model's own BN statistics


def test_before_expected_widths_per_stage():
    small = start_model()
    assert_graph_matches(small, Net(4, 3))  # Before: floor(0.5 * C) channels
    mid = fxexpand.compile(small, [GrowWidth(to=0.75)])
    assert_graph_matches(mid, Net(6, 4))    # floor(0.75 * C)
    assert sorted((n.where, n.reason) for n in mid.fxexpand_notes) == [
        ("down", "3 -> 4 channels"), ("stem", "4 -> 6 channels")]
    full = fxexpand.compile(mid, [GrowWidth(to=1.0)])
    assert_graph_matches(full, Net())       # the full model's architecture
    Net().load_state_dict(full.state_dict(), strict=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_preserve_keeps_the_function_at_every_stage(dtype):
    model = start_model(dtype).eval()
    x = X.to(dtype)
    for to in (0.75, 1.0):
        grown = fxexpand.compile(model, [GrowWidth(to=to, seed=7)]).eval()
        with torch.no_grad():
            assert rel_error(model(x), grown(x)) <= TOL[dtype]
        # the new output filters of the stem are orthogonal to the old ones and to each other
        old, new = model.stem.weight.shape[0], grown.stem.weight.detach().double().flatten(1)
        w = F.normalize(new, dim=1)
        gram = w[old:] @ w.T
        gram[:, old:] -= torch.eye(new.shape[0] - old, dtype=torch.float64)
        assert float(gram.abs().max()) <= 1e-5
        model = grown


def test_orthogonal_init_changes_the_function():
    model = start_model(torch.float64, init="orthogonal").eval()
    grown = fxexpand.compile(model, [GrowWidth(to=1.0, init="orthogonal")]).eval()
    with torch.no_grad():
        assert rel_error(model(X.double()), grown(X.double())) > 1e-4


# -- negative ----------------------------------------------------------------------------------------
def test_negative_models_without_a_width_plan_are_refused_unchanged():
    gm = fxexpand.trace(Net())
    snap = snapshot(gm)
    with pytest.raises(fxexpand.PreconditionError, match="width_factor"):
        GrowWidth()(gm)
    assert_unchanged(gm, snap, "GrowWidth")
    set_record(gm, GrowthRecord("depth"))  # a depth plan's record is not a width plan
    with pytest.raises(fxexpand.PreconditionError, match="width_factor"):
        GrowWidth()(gm)


def test_negative_record_that_does_not_match_the_graph():
    small = start_model()
    rec = get_record(small, GrowthRecord)
    bad = copy.deepcopy(small)
    set_record(bad, GrowthRecord("width", groups={**rec.groups, "no_such_layer": 4}, depthwise=list(rec.depthwise),
                                 inputs=list(rec.inputs)))
    snap = snapshot(bad)
    with pytest.raises(fxexpand.PreconditionError, match="do not match its growth record.*no_such_layer"):
        GrowWidth(to=1.0)(bad)
    assert_unchanged(bad, snap, "GrowWidth")  # checked before any change


def test_negative_already_at_the_target_width_and_bad_arguments():
    small = start_model()
    code = small.code
    res = GrowWidth(to=0.5)(small)
    assert res.modified is False and small.code == code
    assert [n.action for n in res.notes] == ["skipped"] and "already at 0.5" in res.notes[0].reason
    for bad in ({"to": 0.0}, {"to": 1.5}, {"init": "zeros"}):
        with pytest.raises(ValueError):
            GrowWidth(**bad)
