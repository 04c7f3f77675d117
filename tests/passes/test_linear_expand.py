"""LinearExpand (ExpandNets): the CL / CK / FC chains, the layers each mode refuses, init="preserve"
(the expanded model is the original function) and the round trip expand -> contract."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand.core import find_regions
from fxexpand.passes import LinearExpand
from fxexpand.testing import assert_graph_matches, randomize_bn, rel_error

from ._util import expand_contract

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


# -- Before / Expected -----------------------------------------------------------------------------
class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.big = nn.Conv2d(5, 4, 7, padding=3, stride=2, groups=1, bias=False)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        y = F.relu(self.big(F.relu(self.conv(x))))
        return self.fc(y.mean((2, 3)))


class ExpectedCL(nn.Module):
    """Every conv -> 1x1 (x r, padding p) -> k x k (stride, dilation) -> 1x1; the Linear is left alone."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 1, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 10, 3, stride=2, bias=False)
        self.c3 = nn.Conv2d(10, 5, 1, bias=True)
        self.b1 = nn.Conv2d(5, 10, 1, padding=3, bias=False)
        self.b2 = nn.Conv2d(10, 8, 7, stride=2, bias=False)
        self.b3 = nn.Conv2d(8, 4, 1, bias=False)  # the original has no bias: neither has the chain
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        y = F.relu(self.c3(self.c2(self.c1(x))))
        y = F.relu(self.b3(self.b2(self.b1(y))))
        return self.fc(y.mean((2, 3)))


class ExpectedCK(nn.Module):
    """Only the 7x7 conv: three 3x3 convs, padding on the first, stride on the last; 3x3 is refused.
    Widths as in the paper (Sec. 3.1): p_1 = r·m = 10, p_2 = r·n = 8 (r = 2, m = 5, n = 4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.k1 = nn.Conv2d(5, 10, 3, padding=3, bias=False)
        self.k2 = nn.Conv2d(10, 8, 3, bias=False)
        self.k3 = nn.Conv2d(8, 4, 3, stride=2, bias=False)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        y = F.relu(self.k3(self.k2(self.k1(F.relu(self.conv(x))))))
        return self.fc(y.mean((2, 3)))


class ExpectedFC(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.big = nn.Conv2d(5, 4, 7, padding=3, stride=2, bias=False)
        if layers == 3:  # m -> r·m -> r·n -> n, bias on the last only
            self.chain = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 12, bias=False), nn.Linear(12, 6))
        else:  # m -> r·n -> n
            self.chain = nn.Sequential(nn.Linear(4, 12, bias=False), nn.Linear(12, 6))

    def forward(self, x):
        y = F.relu(self.big(F.relu(self.conv(x))))
        return self.chain(y.mean((2, 3)))


@pytest.mark.parametrize("mode,kwargs,expected,regions", [
    ("CL", {}, ExpectedCL, ["conv", "big"]),
    ("CK", {}, ExpectedCK, ["big"]),
    ("FC", {"fc_layers": 3}, lambda: ExpectedFC(3), ["fc"]),
    ("FC", {"fc_layers": 2}, lambda: ExpectedFC(2), ["fc"]),
])
def test_before_expected_chains(mode, kwargs, expected, regions):
    res = LinearExpand(mode=mode, ratio=2, **kwargs)(fxexpand.trace(Before()))
    assert res.modified
    found = find_regions(res.graph_module)
    assert list(found) == regions
    assert all(r.method == f"LinearExpand[{mode}]" for r in found.values())
    assert_graph_matches(fxexpand.trace(res.graph_module, inline_regions=True), expected())


def test_before_expected_grouped_ck_keeps_groups_and_dilation():
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 5, padding=4, dilation=2, stride=3, groups=2)

        def forward(self, x):
            return self.conv(x)

    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 12, 3, padding=4, dilation=2, groups=2, bias=False)
            self.b = nn.Conv2d(12, 6, 3, dilation=2, stride=3, groups=2, bias=True)

        def forward(self, x):
            return self.b(self.a(x))

    res = LinearExpand(mode="CK", ratio=3)(fxexpand.trace(B()))
    assert_graph_matches(fxexpand.trace(res.graph_module, inline_regions=True), E())


# -- negative ----------------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.k3 = nn.Conv2d(3, 4, 3)
        self.even = nn.Conv2d(4, 4, 4)
        self.rect = nn.Conv2d(4, 4, (5, 7), padding=(2, 3))
        self.shared = nn.Conv2d(4, 4, 5, padding=2)
        self.w = nn.Parameter(torch.randn(4, 4, 5, 5))

    def forward(self, x):
        y = self.shared(self.shared(self.rect(self.even(self.k3(x)))))
        return F.conv2d(y, self.w, padding=2)


def test_negative_ck_refuses_every_layer_with_its_reason():
    gm = fxexpand.trace(Mixed())
    before = gm.code
    res = LinearExpand(mode="CK")(gm)
    assert res.modified is False and res.graph_module.code == before
    reasons = {n.where: n.reason for n in res.notes if n.action == "skipped"}
    assert "not square, odd and larger than 3" in reasons["k3"]
    assert "not square, odd and larger than 3" in reasons["even"]
    assert "not square, odd and larger than 3" in reasons["rect"]
    assert "rule 7" in reasons["shared"]
    assert any("functional op" in r for r in reasons.values())


def test_negative_fc_leaves_convs_alone_and_bad_arguments_raise():
    res = LinearExpand(mode="FC")(fxexpand.trace(Mixed()))
    assert res.modified is False
    assert all("is not nn.Linear (mode FC)" in n.reason for n in res.notes if n.where in ("k3", "even", "rect"))
    with pytest.raises(fxexpand.PassError, match="k3"):
        LinearExpand(mode="CK", targets=["k3"])(fxexpand.trace(Mixed()))
    with pytest.raises(ValueError, match="preserve"):
        LinearExpand(mode="CK", init="preserve")
    with pytest.raises(ValueError):
        LinearExpand(mode="XY")
    with pytest.raises(ValueError):
        LinearExpand(mode="FC", fc_layers=4)


# -- numeric ---------------------------------------------------------------------------------------
def conv_net(conv, act=nn.ReLU):
    bn = (nn.BatchNorm2d if isinstance(conv, nn.Conv2d) else nn.BatchNorm1d)(conv.out_channels)
    return nn.Sequential(conv, bn, act())


PRESERVE = {  # model, input shape, mode
    "CL-strided-grouped-nobias": (lambda: conv_net(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)),
                                  (2, 4, 11, 9), "CL"),
    "CL-rect-dilated": (lambda: conv_net(nn.Conv2d(3, 5, (3, 5), dilation=(2, 1), padding=(2, 2))), (1, 3, 10, 13),
                        "CL"),
    "CL-depthwise": (lambda: conv_net(nn.Conv2d(4, 4, 3, groups=4)), (2, 4, 7, 8), "CL"),
    "CL-conv1d": (lambda: conv_net(nn.Conv1d(3, 4, 5, stride=3, padding=1)), (2, 3, 22), "CL"),
    "FC": (lambda: nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3, bias=False)),
           (4, 7), "FC"),
}


@DTYPES
@pytest.mark.parametrize("case,fc_layers", [(c, 3) for c in PRESERVE] + [("FC", 2)])
def test_preserve_init_is_the_original_function(case, fc_layers, dtype):
    factory, shape, mode = PRESERVE[case]
    model = randomize_bn(factory().to(dtype).eval())
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    expanded = fxexpand.compile(model, [LinearExpand(mode=mode, ratio=2, init="preserve", fc_layers=fc_layers)])
    assert find_regions(expanded)
    expanded.eval()
    with torch.no_grad():
        assert rel_error(model(x), expanded(x)) <= TOL[dtype]
        # the random init (the papers') changes the function: the check above is not vacuous
        rand = fxexpand.compile(model, [LinearExpand(mode=mode, ratio=2, fc_layers=fc_layers)]).eval()
        assert rel_error(model(x), rand(x)) > 1e-2


ROUND_TRIP = {
    "CL-strided-grouped": (lambda: conv_net(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)), (2, 4, 11, 9), "CL"),
    "CK-7x7-strided-nobias": (lambda: conv_net(nn.Conv2d(4, 6, 7, stride=2, padding=3, bias=False)),
                              (1, 4, 15, 13), "CK"),
    "FC": (lambda: nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3, bias=False)), (4, 7), "FC"),
}


@DTYPES
@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_random_init_round_trip_contracts_to_the_original_layer(case, dtype):
    factory, shape, mode = ROUND_TRIP[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    _, expanded, small, restored, xs = expand_contract(lambda: [LinearExpand(mode=mode, ratio=2)],
                                                              factory(), x, dtype)
    with torch.no_grad():
        ref = expanded(xs)
        assert rel_error(ref, small(xs)) <= TOL[dtype]
        assert rel_error(ref, restored(xs)) <= TOL[dtype]
