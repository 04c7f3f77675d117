import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxexpand
from fxexpand.core import propagate_shapes
from fxexpand.passes import FoldBatchNorm, FuseLinear
from fxexpand.testing import assert_graph_matches, randomize_bn

from ._util import apply, check_equivalent, max_rel, op_types

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def n_linear_ops(gm) -> int:
    return sum(t in ("Conv1d", "Conv2d", "Linear", "conv2d", "linear") for t in op_types(gm))


def fuses_to_one_op(model, x, **fuse_kwargs):
    """FuseLinear(**fuse_kwargs) keeps ``model``'s function (float64 to 1e-10, float32 to 1e-5) and
    leaves one linear op; returns the float64 result."""
    res = check_equivalent(lambda: FuseLinear(**fuse_kwargs), model, x)
    assert n_linear_ops(res.graph_module) == 1, [str(n) for n in res.notes]
    return res


def refuses(model, x, reason=None, **fuse_kwargs):
    """FuseLinear(**fuse_kwargs) leaves the graph as it was and, if ``reason`` is given, a note says
    why; returns the result."""
    _, res, before, _ = apply(FuseLinear(**fuse_kwargs), model, x)
    assert not res.modified and res.graph_module.code == before
    if reason is not None:
        assert any(reason in n.reason for n in res.notes), [str(n) for n in res.notes]
    return res


# -- sequential ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias1,bias2", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize(
    "nd,c1,c2,shape",
    [
        # 1x1 ∘ kxk, kxk ∘ 1x1, kxk ∘ kxk, with stride / dilation / groups / depthwise
        (2, dict(in_channels=4, out_channels=8, kernel_size=1), dict(in_channels=8, out_channels=6, kernel_size=3), (2, 4, 9, 10)),
        (2, dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, stride=2), dict(in_channels=8, out_channels=6, kernel_size=1), (2, 4, 9, 10)),
        (2, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, stride=2), dict(in_channels=6, out_channels=5, kernel_size=3, stride=2), (1, 4, 15, 13)),
        (2, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), dilation=2, padding=(1, 3)), dict(in_channels=6, out_channels=4, kernel_size=(2, 3), dilation=(1, 2)), (2, 4, 14, 12)),
        (2, dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1), dict(in_channels=6, out_channels=6, kernel_size=3, groups=6), (2, 6, 9, 9)),
        (2, dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, padding=1), dict(in_channels=8, out_channels=4, kernel_size=3, groups=2, stride=2), (2, 4, 11, 9)),
        (2, dict(in_channels=4, out_channels=8, kernel_size=1, groups=4), dict(in_channels=8, out_channels=6, kernel_size=3, groups=2), (1, 4, 8, 8)),
        (1, dict(in_channels=3, out_channels=12, kernel_size=1), dict(in_channels=12, out_channels=5, kernel_size=5, stride=3, padding=0), (2, 3, 31)),
        (1, dict(in_channels=3, out_channels=4, kernel_size=4, stride=2, padding=3, dilation=2), dict(in_channels=4, out_channels=5, kernel_size=3, dilation=3), (2, 3, 40)),
    ],
)
def test_sequential_conv_conv(nd, c1, c2, shape, bias1, bias2):
    model = nn.Sequential(CONV[nd](**c1, bias=bias1), CONV[nd](**c2, bias=bias2))
    fuses_to_one_op(model, torch.randn(*shape), allow_flop_increase=True)


def test_stride_grows_kernel_rule_2():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Conv2d(3, 4, 3))
    res = fuses_to_one_op(model, torch.randn(1, 2, 15, 15), allow_flop_increase=True)
    conv = next(m for m in res.graph_module.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (3 + 2 * (3 - 1),) * 2 and conv.stride == (2, 2)


def test_padding_on_second_conv_is_refused_rule_1():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1))
    refuses(model, torch.randn(1, 3, 8, 8), "rule 1", allow_flop_increase=True)


def test_padded_second_after_pointwise_without_bias_is_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 5, 3, padding=1))
    fuses_to_one_op(model, torch.randn(2, 3, 8, 7), allow_flop_increase=True)


def test_padded_second_after_biased_pointwise_is_refused():
    # a biased first conv: the intermediate border would need the bias value, not zero
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=True), nn.Conv2d(4, 5, 3, padding=1))
    refuses(model, torch.randn(1, 3, 8, 8), "bias", allow_flop_increase=True)


def test_bn_bias_counts_as_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1))
    ref, res, _, x = apply(FoldBatchNorm(), model, torch.randn(1, 3, 8, 8))
    res2 = FuseLinear(allow_flop_increase=True)(res.graph_module)
    assert not res2.modified and any("bias" in n.reason for n in res2.notes)


def test_linear_linear_and_functional():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 12)
            self.w = nn.Parameter(torch.randn(4, 12))
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.linear(self.a(x), self.w, self.b)

    fuses_to_one_op(M(), torch.randn(3, 5, 6), allow_flop_increase=True)


def test_functional_conv_chain():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 4, 1, 1))
            self.w2 = nn.Parameter(torch.randn(5, 8, 3, 3))
            self.b2 = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return torch.conv2d(F.conv2d(x, self.w1), self.w2, self.b2, 2)

    fuses_to_one_op(M(), torch.randn(2, 4, 9, 9), allow_flop_increase=True)


def test_flop_increase_is_refused_outside_regions():
    # a 1x1 bottleneck 16->2->16: fusing would make a 16x16 op (more MACs)
    model = nn.Sequential(nn.Conv2d(16, 2, 1), nn.Conv2d(2, 16, 1))
    refuses(model, torch.randn(1, 16, 8, 8), "increase MACs")
    # the other way round (16->32->4) saves MACs and is fused
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Conv2d(32, 4, 1))
    check_equivalent(lambda: FuseLinear(), model, torch.randn(1, 16, 8, 8))


def test_shared_module_is_not_fused_rule_7():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)) + self.a(x)

    _, res, _, _ = apply(FuseLinear(allow_flop_increase=True), M(), torch.randn(1, 4, 5, 5))
    assert any("rule 7" in n.reason for n in res.notes)
    assert not any(n.action == "fused" and "a -> b" in n.where for n in res.notes)


def test_negative_nonlinear_between():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    refuses(model, torch.randn(1, 3, 8, 8), allow_flop_increase=True)


# -- residual and parallel ----------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, conv, order="x+f"):
        super().__init__()
        self.conv, self.order = conv, order

    def forward(self, x):
        return x + self.conv(x) if self.order == "x+f" else torch.add(self.conv(x), x)


@pytest.mark.parametrize("order", ["x+f", "f+x"])
@pytest.mark.parametrize(
    "conv,shape",
    [
        (lambda: nn.Conv2d(4, 4, 3, padding=1), (2, 4, 7, 6)),
        (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 7, 6)),
        (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), (2, 4, 9, 9)),
        (lambda: nn.Conv1d(3, 3, 5, padding=2), (2, 3, 11)),
        (lambda: nn.Linear(5, 5), (3, 5)),
    ],
)
def test_identity_residual_rule_4(conv, shape, order):
    res = fuses_to_one_op(Residual(conv(), order), torch.randn(*shape))
    assert "add" not in op_types(res.graph_module)


def test_residual_through_another_op_is_not_fused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return x + torch.flip(self.conv(x), dims=[3])

    refuses(M(), torch.randn(1, 4, 5, 5))


def test_residual_broadcast_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)  # 5x5 -> 3x3: shapes differ from x

        def forward(self, x):
            return self.conv(x) + x[..., :3, :3]

    refuses(M(), torch.randn(1, 1, 5, 5))


class Parallel(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(
    "a,b,shape",
    [
        (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: nn.Conv2d(4, 6, 1), (2, 4, 8, 9)),  # RepVGG-style
        (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2),
          lambda: nn.Conv2d(4, 6, 1, stride=2, bias=False), (2, 4, 9, 9)),
        (lambda: nn.Conv2d(4, 4, 5, padding=2, groups=4),
          lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (1, 4, 9, 9)),
        (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), lambda: nn.Conv2d(4, 6, 3, padding=1), (1, 4, 10, 9)),
        (lambda: nn.Conv1d(3, 5, 3, padding=1), lambda: nn.Conv1d(3, 5, 5, padding=2), (2, 3, 12)),
        (lambda: nn.Linear(4, 6), lambda: nn.Linear(4, 6, bias=False), (3, 4)),
        # nested groupings: the finer branch is written into the coarser one's blocks
        (lambda: nn.Conv2d(4, 4, 3, padding=1), lambda: nn.Conv2d(4, 4, 1, groups=4), (2, 4, 7, 6)),
        (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=2),
          lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 7, 7)),
        (lambda: nn.Conv2d(6, 12, 3, padding=1, stride=2, groups=3),
          lambda: nn.Conv2d(6, 12, 1, stride=2, groups=6), (2, 6, 9, 8)),
        (lambda: nn.Conv2d(8, 4, 3, padding=1, groups=2),
          lambda: nn.Conv2d(8, 4, 3, padding=1, groups=4), (1, 8, 6, 6)),
        # not nested (groups 2 and 3): the dense path
        (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=2), lambda: nn.Conv2d(6, 6, 1, groups=3), (1, 6, 5, 5)),
    ],
)
def test_parallel_branches(a, b, shape):
    fuses_to_one_op(Parallel(a(), b()), torch.randn(*shape), allow_flop_increase=True)


def test_misaligned_parallel_branches_are_refused():
    # 4x4/pad 1 and 1x1/pad 0 at stride 2 agree in shape on 8x8 inputs but not on 9x9 ones
    model = Parallel(nn.Conv2d(3, 4, 4, padding=1, stride=2), nn.Conv2d(3, 4, 1, stride=2))
    assert model.a(torch.randn(1, 3, 9, 9)).shape != model.b(torch.randn(1, 3, 9, 9)).shape
    refuses(model, torch.randn(1, 3, 8, 8), "not aligned", allow_flop_increase=True)


def test_three_branches_and_identity_reach_one_op():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 4, 3, padding=1, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x) + x

    model = M().double().eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    small = fxexpand.contract(model, (x,), target="deploy")
    assert n_linear_ops(small) == 1
    assert max_rel(model, small, x) <= 1e-10


# -- Before / Expected -----------------------------------------------------------------------------
class SeqBefore(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.b = nn.Conv2d(8, 5, 3, stride=2)
        self.c = nn.Conv2d(5, 5, 3, padding=1)  # after a ReLU: not fused

    def forward(self, x):
        return self.c(F.relu(self.b(self.a(x))))


class SeqExpected(nn.Module):
    def __init__(self):
        super().__init__()
        self.ab = nn.Conv2d(3, 5, 3, stride=2, bias=True)
        self.c = nn.Conv2d(5, 5, 3, padding=1)

    def forward(self, x):
        return self.c(F.relu(self.ab(x)))


def test_before_expected_sequential():
    _, res, _, _ = apply(FuseLinear(), SeqBefore(), torch.randn(2, 3, 9, 8))
    assert_graph_matches(res.graph_module, SeqExpected())
    assert [(n.action, n.where) for n in res.notes] == [("fused", "a -> b")]


class RepVGGBefore(nn.Module):
    """RepVGG's training-time block: 3x3 + 1x1 + BN identity branch."""

    def __init__(self, c=4):
        super().__init__()
        self.k3, self.k1, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.k3(x) + self.k1(x) + self.bn(x))


class RepVGGExpected(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=True)

    def forward(self, x):
        return F.relu(self.conv(x))


def test_before_expected_parallel_branches_with_bn_identity():
    _, res, _, _ = apply(FuseLinear(), RepVGGBefore(), torch.randn(2, 4, 7, 6))
    assert_graph_matches(res.graph_module, RepVGGExpected())


# -- BN branch, float64 and float32 ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_bn_branch_fuses_exactly(dtype):
    ref, res, _, x = apply(FuseLinear(), RepVGGBefore(6), torch.randn(2, 6, 9, 7), dtype)
    assert op_types(res.graph_module) == ["Conv2d", "relu"]
    assert max_rel(ref, res.graph_module, x) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_linear_plus_bn1d_branch_fuses_exactly(dtype):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(x) + self.fc(x)

    ref, res, _, x = apply(FuseLinear(), M(), torch.randn(7, 5), dtype)
    assert op_types(res.graph_module) == ["Linear"]
    assert max_rel(ref, res.graph_module, x) <= TOL[dtype]


def test_negative_bn_branch_in_training_mode_or_on_3d_linear_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.fc(x) + self.bn(x)

    # (N, 5, 5): BatchNorm1d normalises dim 1, the linear acts on the last dim
    refuses(M(), torch.randn(2, 5, 5))
    gm = fxexpand.trace(RepVGGBefore().train())
    propagate_shapes(gm, (torch.randn(2, 4, 6, 6),))
    res = FuseLinear()(gm)
    assert "BatchNorm2d" in op_types(res.graph_module)  # a training-mode BN is not an affine map


# -- property test over random conv chains -----------------------------------------------------
@st.composite
def conv_pair(draw):
    nd = draw(st.sampled_from([1, 2]))
    cin = draw(st.integers(1, 4))
    g1 = draw(st.sampled_from(["1", "2", "dw"]))
    mult = draw(st.integers(1, 3))

    def groups(kind, cin_, cout_hint):
        if kind == "dw":
            return cin_, cin_ * mult
        if kind == "2" and cin_ % 2 == 0:
            return 2, 2 * cout_hint
        return 1, cout_hint

    cin = cin * 2
    g1v, c1 = groups(g1, cin, draw(st.integers(1, 4)))
    g2v, c2 = groups(draw(st.sampled_from(["1", "2", "dw"])), c1, draw(st.integers(1, 4)))

    def geom():
        k = tuple(draw(st.integers(1, 4)) for _ in range(nd))
        s = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        d = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        return k, s, d

    k1, s1, d1 = geom()
    k2, s2, d2 = geom()
    p1 = tuple(draw(st.integers(0, k)) for k in k1)
    first = CONV[nd](cin, c1, k1, stride=s1, padding=p1, dilation=d1, groups=g1v, bias=draw(st.booleans()))
    pointwise = all(k == 1 for k in k1) and all(s == 1 for s in s1) and not any(p1) and first.bias is None
    p2 = tuple(draw(st.integers(0, k)) for k in k2) if pointwise else (0,) * nd
    second = CONV[nd](c1, c2, k2, stride=s2, padding=p2, dilation=d2, groups=g2v, bias=draw(st.booleans()))
    size = tuple(draw(st.integers(16, 24)) for _ in range(nd))
    return nn.Sequential(first, second), (2, cin) + size


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(conv_pair())
def test_property_random_conv_chains_fuse_exactly(case):
    model, shape = case
    fuses_to_one_op(model, torch.randn(*shape), allow_flop_increase=True)


# -- a per-channel scale (a depthwise 1x1 conv) composed without a dense intermediate ------------
SCALED = [
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=8, kernel_size=(3, 2), stride=2, dilation=(2, 1), padding=(2, 0), groups=2),
    dict(in_channels=6, out_channels=12, kernel_size=3, groups=6, padding=1, stride=2),
    dict(in_channels=6, out_channels=6, kernel_size=1, groups=6),
]


@pytest.mark.parametrize("bias1,bias2", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("conv", SCALED)
@pytest.mark.parametrize("scale_first", [False, True], ids=["conv-scale", "scale-conv"])
def test_channel_scale_composes_with_any_conv(conv, scale_first, bias1, bias2):
    """A diagonal conv (depthwise, 1x1, stride 1, no padding: layer scale, a folded BatchNorm)
    before or after a conv of any geometry; the composed op keeps that conv's geometry."""
    torch.manual_seed(0)
    c = conv["in_channels"] if scale_first else conv["out_channels"]
    scale = nn.Conv2d(c, c, 1, groups=c, bias=bias1 if scale_first else bias2)
    layer = nn.Conv2d(**conv, bias=bias2 if scale_first else bias1)
    if scale_first and layer.padding != (0, 0) and scale.bias is not None:
        scale.bias = None  # a biased first op before a padded conv is refused (rule 1)
    model = nn.Sequential(scale, layer) if scale_first else nn.Sequential(layer, scale)
    res = check_equivalent(lambda: FuseLinear(), model, torch.randn(2, 6, 11, 9))
    mods = [m for m in res.graph_module.modules() if isinstance(m, nn.Conv2d)]
    assert len(mods) == 1
    assert (mods[0].groups, mods[0].kernel_size, mods[0].stride, mods[0].padding) == (
        layer.groups, layer.kernel_size, layer.stride, layer.padding)


# -- issue 16: subtracted branches, constant scales, BatchNorm before a linear op, timm-style blocks --
class Sub(nn.Module):
    """``A(x) - B(x)``, ``x - A(x)`` and ``A(x) - x`` (FastViT's RepMixer subtracts a BN branch)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1, groups=2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if self.form == "conv-conv":
            return self.a(x) - self.b(x)
        if self.form == "conv-bn":
            return self.a(x) - self.bn(x)
        if self.form == "x-conv":
            return x - self.a(x)
        return self.a(x) - x


@pytest.mark.parametrize("form", ["conv-conv", "conv-bn", "x-conv", "conv-x"])
def test_subtracted_branches_fuse_exactly(form):
    res = fuses_to_one_op(Sub(form), torch.randn(2, 4, 7, 6))
    assert "sub" not in op_types(res.graph_module)


class Scaled(nn.Module):
    """A conv or linear followed by a constant scale: a layer-scale ``gamma`` ([C,1,1] or viewed to
    [1,C,1,1]), a Python number, a division (RepViT averages its two heads with ``/ 2``)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(3, 6)
        self.gamma = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.g1 = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        if self.form == "gamma":
            return self.conv(x) * self.gamma
        if self.form == "gamma.view":
            return self.g1.view(1, -1, 1, 1) * self.conv(x)
        if self.form == "number":
            return 0.25 * self.conv(x)
        if self.form == "div":
            return self.fc(x.mean((2, 3))) / 2
        return self.fc(x.mean((2, 3))) * self.g1


@pytest.mark.parametrize("form", ["gamma", "gamma.view", "number", "div", "linear-gamma"])
def test_constant_scale_joins_the_op_before_it(form):
    res = check_equivalent(lambda: FuseLinear(), Scaled(form), torch.randn(2, 3, 6, 7))
    assert not {"mul", "truediv"} & set(op_types(res.graph_module))


class SpatialScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.s = nn.Parameter(torch.rand(1, 1, 6, 1))  # varies along a spatial dim: not a per-channel map

    def forward(self, x):
        return self.conv(x) * self.s


def test_negative_scale_along_a_spatial_dim_is_not_fused():
    refuses(SpatialScale(), torch.randn(2, 3, 6, 7))


def test_negative_scale_that_promotes_the_dtype_is_not_fused():
    class Promotes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("s", torch.rand(4, 1, 1, dtype=torch.float64))

        def forward(self, x):
            return self.conv(x) * self.s  # float32 * float64 is float64

    model = Promotes()
    gm = fxexpand.trace(model)
    propagate_shapes(gm, (torch.randn(1, 3, 5, 5),))
    res = FuseLinear()(gm)
    assert not res.modified


class BNFirst(nn.Module):
    """RepViT's classifier: BatchNorm1d then Linear; and BN before a 1x1 / an unpadded / a padded conv."""

    def __init__(self, conv_kwargs):
        super().__init__()
        self.bn1, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.bn2, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, **conv_kwargs)

    def forward(self, x):
        y = self.conv(self.bn2(F.relu(x)))
        return self.fc(self.bn1(y.mean((2, 3))))


@pytest.mark.parametrize("conv_kwargs", [dict(kernel_size=1), dict(kernel_size=3, groups=2, stride=2)])
def test_batchnorm_before_a_linear_op_is_folded_into_it(conv_kwargs):
    res = check_equivalent(lambda: FuseLinear(), BNFirst(conv_kwargs), torch.randn(2, 4, 9, 8))
    assert not any("BatchNorm" in t for t in op_types(res.graph_module))


def test_negative_batchnorm_before_a_padded_conv_is_refused_rule_1():
    _, res, _, _ = apply(FuseLinear(), BNFirst(dict(kernel_size=3, padding=1)), torch.randn(2, 4, 9, 8))
    assert "BatchNorm2d" in op_types(res.graph_module)
    assert any(n.where == "bn2 -> conv" and "padded" in n.reason for n in res.notes), [str(n) for n in res.notes]


class MobileOneLike(nn.Module):
    """MobileOne's block: k over-parameterised kxk conv-BN branches + a 1x1 conv-BN scale branch +
    an identity BN, summed from ``0`` as timm does; depthwise or grouped, stride 1 or 2."""

    def __init__(self, c=4, k=3, groups=4, stride=1, branches=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, k, stride, k // 2, groups=groups, bias=False),
                                                 nn.BatchNorm2d(c)) for _ in range(branches))
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, stride, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c) if stride == 1 else None

    def forward(self, x):
        identity_out = 0 if self.identity is None else self.identity(x)
        out = self.scale(x) + identity_out
        for conv in self.convs:
            out = out + conv(x)
        return F.relu(out)


class RepMixerLike(nn.Module):
    """FastViT's RepMixer: ``x + gamma · (mixer(x) − norm(x))`` with a depthwise mixer and a BN norm,
    then a conditional position encoding ``x + dwconv(x)``."""

    def __init__(self, c=4):
        super().__init__()
        self.mixer = MobileOneLike(c, groups=c, branches=1)
        self.norm = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.pe = nn.Conv2d(c, c, 7, padding=3, groups=c)

    def forward(self, x):
        mixed = self.mixer.scale(x) + self.mixer.identity(x) + self.mixer.convs[0](x)  # no activation
        x = x + self.gamma * (mixed - self.norm(x))  # one 3x3 depthwise conv
        return F.relu(x + self.pe(x))  # a second conv: a padded 7x7 after it does not compose (rule 1)


@pytest.mark.parametrize("model,n_ops", [
    (lambda: MobileOneLike(groups=4), 1), (lambda: MobileOneLike(groups=2, branches=4), 1),
    (lambda: MobileOneLike(groups=1, stride=2), 1), (lambda: MobileOneLike(groups=4, k=5, stride=2), 1),
    (lambda: RepMixerLike(), 2),
], ids=["depthwise", "grouped", "dense-stride2", "depthwise-5x5-stride2", "repmixer-cpe"])
def test_timm_style_blocks_contract_exactly(model, n_ops):
    m = model()
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        ref = randomize_bn(m).to(dtype).eval()
        x = torch.randn(2, 4, 9, 8, dtype=dtype)
        small = fxexpand.contract(ref, (x,), target="deploy")
        assert n_linear_ops(small) == n_ops, small.fxexpand_report
        assert not any("BatchNorm" in t for t in op_types(small))
        assert max_rel(ref, small, x) <= tol


def test_branch_that_cannot_merge_is_reported_with_its_reason():
    class Misaligned(nn.Module):
        def __init__(self):
            super().__init__()
            # 4x4 / pad 1 and 1x1 / pad 0 at stride 2 agree in shape on 8x8 inputs, not on 9x9 ones
            self.a = nn.Sequential(nn.Conv2d(4, 4, 4, padding=1, stride=2), nn.BatchNorm2d(4))
            self.b = nn.Conv2d(4, 4, 1, stride=2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    x = torch.randn(1, 4, 8, 8)
    small = fxexpand.contract(randomize_bn(Misaligned()).eval(), (x,), target="deploy")
    assert n_linear_ops(small) == 2
    assert any("not aligned" in n.reason for n in small.fxexpand_report.skipped)
