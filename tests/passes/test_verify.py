"""Verify (the pass): never changes the graph, accepts an exact rewrite in float64 and float32, and
raises EquivalenceError for a rewrite that changed the function (or inputs that do not fit)."""

import copy

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand import PassManager
from fxexpand.passes import FoldBatchNorm, Verify
from fxexpand.testing import assert_graph_matches, assert_unchanged, snapshot

from ._util import apply


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1, bias=False)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ExpectedFolded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)

    def forward(self, x):
        return torch.relu(self.conv(x))


def folded(dtype):
    """(reference in eval mode with random BN statistics, the FoldBatchNorm result, an input)."""
    ref, res, _, x = apply(FoldBatchNorm(), Before(), torch.randn(2, 3, 11, 9), dtype)
    return ref, res.graph_module, x


def test_before_expected_graph_is_left_as_it_is():
    ref, gm, x = folded(torch.float64)
    code = gm.code
    snaps = snapshot(ref), snapshot(gm)
    res = Verify(reference=ref, example_inputs=(x,))(gm)
    assert res.modified is False and res.graph_module is gm and gm.code == code
    assert_graph_matches(res.graph_module, ExpectedFolded())
    assert_unchanged(ref, snaps[0], "Verify (reference)")
    assert_unchanged(gm, snaps[1], "Verify (candidate)")
    assert [(n.action, n.where) for n in res.notes] == [("info", "verified")]


@pytest.mark.parametrize("dtype,rtol,small,large", [
    # float64: a tight tolerance; a 1e-7 relative change of one weight is far above it
    (torch.float64, 1e-12, 1e-15, 1e-7),
    # float32: the default tolerance; a change below it is accepted, one above is not
    (torch.float32, 1e-4, 1e-7, 1e-2),
], ids=["float64", "float32"])
def test_accepts_exact_rewrites_and_catches_small_changes(dtype, rtol, small, large):
    ref, gm, x = folded(dtype)
    Verify(reference=ref, example_inputs=(x,), rtol=rtol)(gm)
    for scale, ok in ((small, True), (large, False)):
        bad = copy.deepcopy(gm)
        with torch.no_grad():
            w = bad.conv.weight
            w[0, 0, 0, 0] += scale * float(w.abs().max())
        if ok:
            Verify(reference=ref, example_inputs=(x,), rtol=rtol)(bad)
        else:
            with pytest.raises(fxexpand.EquivalenceError, match="outputs diverged") as info:
                Verify(reference=ref, example_inputs=(x,), rtol=rtol)(bad)
            assert info.value.report is not None and not info.value.report.passed


# -- negative ----------------------------------------------------------------------------------------
def test_negative_a_pass_that_breaks_the_function_is_named():
    class Zero(fxexpand.Pass):
        def call(self, gm):
            with torch.no_grad():
                gm.conv.bias.zero_()
            return fxexpand.PassResult(gm, True)

    ref, gm, x = folded(torch.float32)
    pm = PassManager(passes=[Zero(), Verify(reference=ref, example_inputs=(x,))])
    with pytest.raises(fxexpand.EquivalenceError, match="pass Verify failed .*passes run before it: Zero"):
        pm(gm)


def test_negative_bad_inputs_and_arguments():
    ref, gm, x = folded(torch.float32)
    with pytest.raises(fxexpand.InputError):
        Verify(reference=ref, example_inputs=(torch.randn(2, 4, 8, 8),))(gm)  # 4 channels, not 3
    with pytest.raises(TypeError, match="nn.Module"):
        Verify(reference=lambda t: t, example_inputs=(x,))
    with torch.no_grad():
        gm.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxexpand.EquivalenceError, match="NaN or Inf"):
        Verify(reference=ref, example_inputs=(x,))(gm)
    with pytest.raises(fxexpand.PassError, match="cannot be built by name.*reference"):
        fxexpand.build_pass("verify")


def test_negative_output_shape_differs():
    ref, _, x = folded(torch.float64)
    other = fxexpand.trace(nn.Sequential(nn.Conv2d(3, 5, 3, stride=1, padding=1)).double())
    with pytest.raises(fxexpand.EquivalenceError, match="shape"):
        Verify(reference=ref, example_inputs=(x,))(other)
