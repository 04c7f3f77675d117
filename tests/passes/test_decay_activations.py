"""DecayActivations: which activations are wrapped (only inside expanded regions), with which kind,
that alpha = 0 keeps the function, and the round trip expand -> alpha = 1 -> contract."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand import DecayActivation, ExpandedRegion
from fxexpand.passes import DecayActivations, InsertInvertedResidual
from fxexpand.testing import assert_graph_matches, randomize_bn, rel_error

from ._util import expand_contract

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


def block(act1=nn.ReLU6, act2=nn.GELU):
    """An expanded region for Conv2d(3, 4, 3, padding=1): 1x1 (padded) -> act -> depthwise 3x3 -> BN -> act -> 1x1."""
    body = nn.Sequential(nn.Conv2d(3, 6, 1, padding=1), act1(), nn.Conv2d(6, 6, 3, groups=6, bias=False),
                         nn.BatchNorm2d(6), act2(), nn.Conv2d(6, 4, 1))
    return ExpandedRegion(body, nn.Conv2d(3, 4, 3, padding=1), method="test")


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = block()
        self.act = nn.ReLU()  # outside any region: never wrapped

    def forward(self, x):
        return self.act(self.block(x))


class Expected(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 1, padding=1)
        self.a1 = DecayActivation(nn.ReLU6(), kind="leaky")
        self.c2 = nn.Conv2d(6, 6, 3, groups=6, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.a2 = DecayActivation(nn.GELU(), kind="blend")
        self.c3 = nn.Conv2d(6, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.c3(self.a2(self.bn(self.c2(self.a1(self.c1(x)))))))


@pytest.mark.parametrize("kind,kinds", [("auto", ["leaky", "blend"]), ("blend", ["blend", "blend"])])
def test_before_expected_activations_in_regions_are_wrapped(kind, kinds):
    gm = fxexpand.trace(Before())
    top = gm.code
    res = DecayActivations(kind=kind)(gm)
    assert res.modified
    assert res.graph_module.code == top  # the region stays one call; its body changed
    assert_graph_matches(fxexpand.trace(res.graph_module, inline_regions=True), Expected())
    wrapped = {n: m for n, m in res.graph_module.named_modules() if isinstance(m, DecayActivation)}
    assert list(wrapped) == ["block.body.1", "block.body.4"]
    assert [m.kind for m in wrapped.values()] == kinds
    assert all(float(m.alpha) == 0.0 for m in wrapped.values())
    assert type(res.graph_module.act) is nn.ReLU


def test_before_expected_only_listed_regions():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = block(), ExpandedRegion(nn.Sequential(nn.Conv2d(4, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1)),
                                                     nn.Conv2d(4, 4, 1))

        def forward(self, x):
            return self.b(self.a(x))

    class TwoExpected(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Expected()
            self.a.act = nn.Identity()
            self.b1, self.b2, self.b3 = nn.Conv2d(4, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a = self.a
            y = a.c3(a.a2(a.bn(a.c2(a.a1(a.c1(x))))))
            return self.b3(self.b2(self.b1(y)))

    res = DecayActivations(targets=["a"])(fxexpand.trace(Two()))
    assert_graph_matches(fxexpand.trace(res.graph_module, inline_regions=True), TwoExpected())


# -- negative ----------------------------------------------------------------------------------------
def test_negative_leaky_does_not_apply_to_gelu():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = ExpandedRegion(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GELU(), nn.Conv2d(3, 3, 1)), nn.Conv2d(3, 3, 1))

        def forward(self, x):
            return self.r(x)

    gm = fxexpand.trace(M())
    res = DecayActivations(kind="leaky")(gm)
    assert res.modified is False
    assert type(res.graph_module.r.body[1]) is nn.GELU
    assert [(n.action, n.where) for n in res.notes] == [("skipped", "r.body.1")]
    assert "kind='leaky' does not apply to GELU" in res.notes[0].reason


def test_negative_no_regions_missing_targets_and_bad_arguments():
    gm = fxexpand.trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    before = gm.code
    res = DecayActivations()(gm)
    assert res.modified is False and res.graph_module.code == before
    assert type(res.graph_module.get_submodule("1")) is nn.ReLU
    assert any("no expanded regions" in n.reason for n in res.notes)
    with pytest.raises(fxexpand.PassError, match="not expanded regions"):
        DecayActivations(targets=["block.body"])(fxexpand.trace(Before()))
    with pytest.raises(ValueError):
        DecayActivations(kind="tanh")
    with pytest.raises(TypeError):
        DecayActivations(targets=3)


def test_negative_already_wrapped_activations_are_not_wrapped_twice():
    gm = DecayActivations()(fxexpand.trace(Before())).graph_module
    keys = set(gm.state_dict())
    res = DecayActivations()(gm)
    assert not any(isinstance(m.activation, DecayActivation) for m in gm.modules() if isinstance(m, DecayActivation))
    assert set(res.graph_module.state_dict()) == keys
    assert res.modified is False


# -- numeric ---------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("kind", ["auto", "blend"])
def test_alpha_zero_keeps_the_function(kind, dtype):
    model = randomize_bn(Before().to(dtype).eval())
    x = torch.randn(2, 3, 9, 7, dtype=dtype)
    wrapped = DecayActivations(kind=kind)(fxexpand.trace(copy.deepcopy(model))).graph_module
    with torch.no_grad():
        assert rel_error(model(x), wrapped(x)) <= TOL[dtype]


@DTYPES
def test_intermediate_alpha_interpolates(dtype):
    """At alpha = 0.25 (exact in the float32 alpha buffer): leaky ReLU6 and 0.25·x + 0.75·GELU(x),
    checked against a hand-written forward."""
    torch.manual_seed(0)  # not the global RNG state other tests leave (an all-zero output compares equal)
    model = randomize_bn(Before().to(dtype).eval())
    x = torch.randn(2, 3, 9, 7, dtype=dtype)
    wrapped = DecayActivations()(fxexpand.trace(copy.deepcopy(model))).graph_module
    assert fxexpand.set_decay(wrapped, 0.25) == 2
    body = model.block.body
    with torch.no_grad():
        y = body[0](x)
        y = torch.where(y < 6, torch.maximum(0.25 * y, y), 6 + 0.25 * (y - 6))
        y = body[3](body[2](y))
        y = 0.25 * y + 0.75 * F.gelu(y)
        want = F.relu(body[5](y))
        assert want.abs().max() > 0.1
        assert rel_error(want, wrapped(x)) <= TOL[dtype]
        assert rel_error(model(x), wrapped(x)) > 1e-3


ROUND_TRIP = {
    "hand-built-region": (Before, (2, 3, 9, 7), None),
    "ir-relu6-leaky": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU6()), (2, 4, 7, 6), "leaky"),
    "ir-silu-blend": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.SiLU()),
                      (1, 4, 11, 8), "auto"),
    "ir-leakyrelu": (lambda: nn.Sequential(nn.Conv1d(3, 3, 3, padding=1), nn.LeakyReLU(0.1)), (2, 3, 13), "auto"),
}


@DTYPES
@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_round_trip_at_alpha_one_contracts(case, dtype):
    factory, shape, kind = ROUND_TRIP[case]
    if kind is None:  # the model already has a region: only wrap its activations
        passes = lambda: [DecayActivations()]
    else:
        passes = lambda: [InsertInvertedResidual(ratio=2, fraction=1.0, kernel_size="match"),
                          DecayActivations(kind=kind)]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    _, expanded, small, restored, xs = expand_contract(passes, factory(), x, dtype)
    assert any(isinstance(m, DecayActivation) for m in expanded.modules())
    with torch.no_grad():
        ref = expanded(xs)
        assert rel_error(ref, small(xs)) <= TOL[dtype]
        if restored is not None:
            assert rel_error(ref, restored(xs)) <= TOL[dtype]
        else:  # the hand-built region came back as the layer it records
            assert type(small.block) is nn.Conv2d and small.block.padding == (1, 1)
