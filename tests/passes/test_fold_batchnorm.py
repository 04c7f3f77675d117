import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxexpand.passes import FoldBatchNorm

from ._util import apply, check_equivalent, op_types


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
