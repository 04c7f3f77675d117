"""RemoveExits: a multi-exit model back to its backbone (output f_N, heads and gradient scales gone)."""

import copy

import pytest
import torch

import fxexpand
from fxexpand.core import GradientScale, propagate_shapes
from fxexpand.passes import RemoveExits
from fxexpand.testing import assert_graph_matches, randomize_bn

from .test_insert_early_exits import Backbone, X, build


def traced(multi):
    gm = fxexpand.trace(copy.deepcopy(multi))
    for r in fxexpand.core.persistent_records(multi):
        fxexpand.core.set_record(gm, r)
    propagate_shapes(gm, (X.to(next(multi.parameters()).dtype),))
    return gm


def test_before_expected():
    multi = build()
    gm = traced(multi)
    assert any(isinstance(m, GradientScale) for m in gm.modules())       # Before: exits and scales
    res = RemoveExits()(gm)
    assert res.modified and res.notes[0].action == "removed"
    gm = res.graph_module
    gm.delete_all_unused_submodules()
    assert_graph_matches(gm, Backbone())                                   # Expected: the backbone
    Backbone().load_state_dict(gm.state_dict(), strict=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("boost", [True, False])
def test_output_is_the_raw_last_head(dtype, boost):
    model = randomize_bn(Backbone()).to(dtype).eval()
    multi = build(model, X.to(dtype), boost=boost).eval()
    gm = RemoveExits()(traced(multi)).graph_module.eval()
    with torch.no_grad():
        assert torch.equal(gm(X.to(dtype)), model(X.to(dtype)))
        if boost:
            assert not torch.allclose(gm(X.to(dtype)), multi(X.to(dtype))[-1])  # f_N is not F_N


def test_negative():
    plain = traced(Backbone())
    assert not RemoveExits()(plain).modified                               # no exits: nothing to do
    multi = build()
    gm = traced(multi)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (out.args[0][:2],)                                          # not the recorded exits
    with pytest.raises(fxexpand.PreconditionError, match="exits its record describes"):
        RemoveExits()(gm)
