import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand import ExpandedRegion
from fxexpand.passes import FoldBatchNorm
from fxexpand.testing import assert_graph_matches, randomize_bn

from ._util import apply, check_equivalent, max_rel, op_types

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class ConvBN(nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "conv,bn,shape",
    [
        (lambda b: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=b), nn.BatchNorm2d(6), (2, 3, 11, 9)),
        (lambda b: nn.Conv2d(4, 8, (3, 5), groups=2, dilation=2, padding=(2, 1), bias=b), nn.BatchNorm2d(8), (1, 4, 13, 12)),
        (lambda b: nn.Conv2d(6, 6, 3, groups=6, bias=b), nn.BatchNorm2d(6), (2, 6, 7, 7)),
        (lambda b: nn.Conv1d(3, 5, 4, stride=3, bias=b), nn.BatchNorm1d(5), (2, 3, 17)),
        (lambda b: nn.Linear(7, 5, bias=b), nn.BatchNorm1d(5), (4, 7)),
        (lambda b: nn.ConvTranspose2d(4, 6, 3, stride=2, bias=b), nn.BatchNorm2d(6), (2, 4, 5, 6)),
        (lambda b: nn.Conv2d(3, 4, 3, bias=b), nn.BatchNorm2d(4, affine=False), (2, 3, 8, 8)),
    ],
)
def test_fold_module_forms(conv, bn, shape, bias):
    model = ConvBN(conv(bias), bn)
    res = check_equivalent(lambda: FoldBatchNorm(), model, torch.randn(*shape))
    assert not any("BatchNorm" in t for t in op_types(res.graph_module))
    assert [n.action for n in res.notes] == ["folded"]


class FunctionalConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(6))
        self.register_buffer("rm", torch.randn(6))
        self.register_buffer("rv", torch.rand(6) + 0.5)
        self.g = nn.Parameter(torch.rand(6) + 0.5)
        self.beta = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, stride=2, padding=1)
        return F.relu(F.batch_norm(y, self.rm, self.rv, self.g, self.beta, False, 0.1, 1e-3))


def test_fold_functional_form():
    res = check_equivalent(lambda: FoldBatchNorm(), FunctionalConvBN(), torch.randn(2, 3, 10, 10))
    types = op_types(res.graph_module)
    assert "batch_norm" not in types and "conv2d" not in types and "Conv2d" in types


def test_negative_nothing_to_fold():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))  # BN after a ReLU
    ref, res, before, x = apply(FoldBatchNorm(), model, torch.randn(1, 3, 8, 8))
    assert res.modified is False
    assert res.graph_module.code == before


def test_skips_bn_without_running_stats():
    model = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    _, res, before, _ = apply(FoldBatchNorm(), model, torch.randn(2, 3, 8, 8))
    assert not res.modified and res.graph_module.code == before
    assert any("running statistics" in n.reason for n in res.notes)


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class ConvOutputReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * y


@pytest.mark.parametrize("model,reason", [(ConvUsedTwice, "called from 2 places"), (ConvOutputReused, "other users")])
def test_skips_shared_modules_and_outputs(model, reason):
    ref, res, before, x = apply(FoldBatchNorm(), model(), torch.randn(1, 4, 6, 6))
    assert not res.modified and res.graph_module.code == before
    assert any(reason in n.reason for n in res.notes), [str(n) for n in res.notes]


def test_skips_training_mode_bn():
    model = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ref, res, before, x = apply(FoldBatchNorm(), model, torch.randn(2, 3, 8, 8))
    assert res.modified  # eval mode: folds
    gm_train = __import__("fxexpand").trace(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())
    res = FoldBatchNorm()(gm_train)
    assert not res.modified and any("training mode" in n.reason for n in res.notes)


def test_linear_bn1d_on_3d_input_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.lin(x))  # BN over dim 1 of (N, 5, 5), linear over the last dim

    _, res, before, _ = apply(FoldBatchNorm(), M(), torch.randn(2, 5, 5))
    assert not res.modified and any("not 2-D" in n.reason for n in res.notes)


def test_expanded_scope_leaves_plain_model_alone():
    model = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    _, res, before, _ = apply(FoldBatchNorm(scope="expanded"), model, torch.randn(2, 3, 8, 8))
    assert not res.modified and res.graph_module.code == before


# -- Before / Expected -----------------------------------------------------------------------------
class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.relu(self.bn_up(self.up(y)))
        return self.bn_fc(self.fc(y.mean((2, 3))))


class Expected(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=True)  # the folded conv gains a bias
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = F.relu(self.conv(x))
        y = F.relu(self.up(y))
        return self.fc(y.mean((2, 3)))


def test_before_expected_conv_transpose_and_linear():
    _, res, _, _ = apply(FoldBatchNorm(), Before(), torch.randn(2, 3, 9, 11))
    assert_graph_matches(res.graph_module, Expected())
    assert [n.where for n in res.notes] == ["conv <- bn", "up <- bn_up", "fc <- bn_fc"]


def test_before_expected_functional_form():
    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)

        def forward(self, x):
            return F.relu(self.conv(x))

    _, res, _, _ = apply(FoldBatchNorm(), FunctionalConvBN(), torch.randn(2, 3, 10, 10))
    assert_graph_matches(res.graph_module, E())  # no get_attr of the old tensors is left behind


# -- numeric, float64 and float32 -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_every_site_folds_exactly(dtype):
    ref, res, _, x = apply(FoldBatchNorm(), Before(), torch.randn(3, 3, 9, 11), dtype)
    assert not any("BatchNorm" in t for t in op_types(res.graph_module))
    assert max_rel(ref, res.graph_module, x) <= TOL[dtype]


class InAndOut(nn.Module):
    """A conv + BN inside an expanded region and one outside it."""

    def __init__(self):
        super().__init__()
        self.r = ExpandedRegion(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, groups=1), nn.BatchNorm2d(5),
                                              nn.Conv2d(5, 4, 1, bias=False)), nn.Conv2d(3, 4, 3, padding=1))
        self.conv, self.bn = nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.r(x)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_expanded_scope_folds_inside_regions_only(dtype):
    ref = InAndOut().to(dtype).eval()
    randomize_bn(ref)
    x = torch.randn(2, 3, 8, 7, dtype=dtype)
    gm = fxexpand.trace(ref, inline_regions=True)
    res = FoldBatchNorm(scope="expanded")(gm)
    res.graph_module.recompile()
    assert [n.where for n in res.notes if n.action == "folded"] == ["r.body.0 <- r.body.1"]
    assert op_types(res.graph_module) == ["Conv2d", "Conv2d", "Conv2d", "BatchNorm2d"]
    assert max_rel(ref, res.graph_module, x) <= TOL[dtype]


def test_negative_grouped_conv_transpose_is_not_folded():
    model = ConvBN(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6))
    _, res, before, _ = apply(FoldBatchNorm(), model, torch.randn(1, 4, 5, 5))
    assert not res.modified and res.graph_module.code == before
    assert any("grouped ConvTranspose" in n.reason for n in res.notes)
