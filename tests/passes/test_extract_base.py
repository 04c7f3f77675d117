"""ExtractBase: dynamic (NetAug) layers become the original layers with the base slice; refuses a
model left in an augmented configuration before changing anything."""

import copy

import pytest
import torch

import fxexpand
from fxexpand.core import ContractionError, DynamicLayer, propagate_shapes
from fxexpand.passes import AugmentWidth, ExtractBase
from fxexpand.testing import assert_graph_matches, randomize_bn, rel_error

from .test_augment_width import Net, X


def traced(aug, x):
    gm = fxexpand.trace(copy.deepcopy(aug))
    propagate_shapes(gm, (x,))
    return gm


def test_before_expected():
    aug = fxexpand.compile(Net(), passes=[AugmentWidth()], example_inputs=(X,))
    gm = traced(aug, X)
    assert sum(isinstance(m, DynamicLayer) for m in gm.modules()) == 8      # Before: dynamic layers
    res = ExtractBase()(gm)
    assert res.modified and len([n for n in res.notes if n.action == "extracted"]) == 8
    assert_graph_matches(res.graph_module, Net())                          # Expected: the original graph
    Net().load_state_dict(res.graph_module.state_dict(), strict=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_function_preserved_after_training_steps(dtype):
    model = randomize_bn(Net()).to(dtype)
    x = X.to(dtype)
    aug = fxexpand.compile(model, passes=[AugmentWidth()], example_inputs=(x,))
    sampler = fxexpand.WidthSampler(aug, seed=0, total_steps=4)
    opt = torch.optim.SGD(aug.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        fxexpand.netaug_loss(aug, sampler, step, x, None, lambda out, _: out.square().mean()).backward()
        opt.step()
    aug.eval()
    gm = ExtractBase()(traced(aug, x)).graph_module.eval()
    with torch.no_grad():
        assert rel_error(aug(x), gm(x)) <= (1e-12 if dtype == torch.float64 else 1e-6)


def test_negative():
    aug = fxexpand.compile(Net(), passes=[AugmentWidth()], example_inputs=(X,))
    fxexpand.set_width(aug, "max")
    gm = traced(aug, X)
    before = gm.code
    with pytest.raises(ContractionError, match="set_width"):
        ExtractBase()(gm)
    assert gm.code == before and sum(isinstance(m, DynamicLayer) for m in gm.modules()) == 8
    plain = traced(Net(), X)
    assert not ExtractBase()(plain).modified                               # nothing to extract
