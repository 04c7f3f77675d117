"""RestoreOriginal: contracted regions go back as their original layers at their original names (bias
absorbed into the next BatchNorm where the original had none), and every way it must refuse."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand import ExpandedRegion, PassManager
from fxexpand.core import propagate_shapes
from fxexpand.passes import (
    DecayActivations,
    FoldBatchNorm,
    FuseLinear,
    InsertInvertedResidual,
    LinearExpand,
    RemoveIdentity,
    RestoreOriginal,
)
from fxexpand.testing import assert_graph_matches, randomize_bn, rel_error

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class Net(nn.Module):
    """Before expansion, and what RestoreOriginal must give back (the Expected graph)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def expanded_net(dtype, alpha=1.0):
    model = randomize_bn(Net().to(dtype).eval())
    expanded = fxexpand.compile(model, [
        InsertInvertedResidual(ratio=2, fraction=1.0, kernel_size="match"),  # conv1 (bias=False, BN after), conv2
        LinearExpand(mode="FC", ratio=2),                                      # fc
        DecayActivations(),
    ])
    assert sorted(fxexpand.core.find_regions(expanded)) == ["conv1", "conv2", "fc"]
    randomize_bn(expanded, seed=3)
    fxexpand.set_decay(expanded, alpha)
    return model, expanded.eval()


def contracted_graph(expanded, x):
    """What contract(target="original") runs before RestoreOriginal: a trace through the regions and
    the three scope="expanded" passes to a fixed point."""
    gm = fxexpand.trace(copy.deepcopy(expanded), inline_regions=True)
    propagate_shapes(gm, (x,))
    pm = PassManager(passes=[RemoveIdentity(scope="expanded"), FoldBatchNorm(scope="expanded"),
                             FuseLinear(scope="expanded")], fixed_point=True)
    return pm(gm).graph_module


def test_before_expected_regions_become_the_original_layers():
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    model, expanded = expanded_net(torch.float64)
    gm = contracted_graph(expanded, x)
    res = RestoreOriginal()(gm)
    assert res.modified
    assert_graph_matches(res.graph_module, Net())
    assert {k: v.shape for k, v in res.graph_module.state_dict().items()} == \
           {k: v.shape for k, v in model.state_dict().items()}
    assert sorted((n.action, n.where) for n in res.notes) == [
        ("absorbed", "conv1 -> bn1"), ("restored", "conv1"), ("restored", "conv2"), ("restored", "fc")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_restored_model_computes_the_expanded_function(dtype):
    x = torch.randn(2, 3, 11, 9, dtype=dtype, generator=torch.Generator().manual_seed(0))
    _, expanded = expanded_net(dtype)
    gm = contracted_graph(expanded, x)
    mean_before = gm.bn1.running_mean.clone()
    res = RestoreOriginal()(gm)
    restored = res.graph_module
    restored.graph.lint()
    restored.recompile()  # a pass edits the graph; its caller (PassManager) recompiles
    assert restored.conv1.bias is None  # the folded bias went into bn1's running mean
    assert not torch.equal(restored.bn1.running_mean, mean_before)
    fresh = Net().to(dtype)
    fresh.load_state_dict(restored.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        ref = expanded(x)
        assert rel_error(ref, restored(x)) <= TOL[dtype]
        assert rel_error(ref, fresh(x)) <= TOL[dtype]


# -- negative ----------------------------------------------------------------------------------------
def test_negative_nothing_to_restore_without_a_trace_through_regions():
    _, expanded = expanded_net(torch.float64)
    gm = fxexpand.trace(expanded)  # regions kept as single calls: no traced region list
    before = gm.code
    res = RestoreOriginal()(gm)
    assert res.modified is False and res.notes == [] and res.graph_module.code == before
    gm = fxexpand.trace(Net(), inline_regions=True)  # a model without regions
    assert RestoreOriginal()(gm).modified is False


def test_negative_region_not_contracted_yet():
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    _, expanded = expanded_net(torch.float64, alpha=0.5)  # activations still non-linear (rule 6)
    gm = contracted_graph(expanded, x)
    with pytest.raises(fxexpand.ContractionError, match="did not contract to a single layer.*DecayActivation"):
        RestoreOriginal()(gm)


class Hand(nn.Module):
    def __init__(self, body, original, after=None):
        super().__init__()
        self.r = ExpandedRegion(body, original)
        self.after = after if after is not None else nn.ReLU()

    def forward(self, x):
        return self.after(self.r(x))


@pytest.mark.parametrize("model,match", [
    # the fused op has a bias, the original none, and only a ReLU follows
    (lambda: Hand(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)), nn.Conv2d(3, 4, 1, bias=False)),
     "no BatchNorm can absorb"),
    # a BatchNorm that could take it, but in training mode
    (lambda: Hand(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)), nn.Conv2d(3, 4, 1, bias=False),
                  nn.BatchNorm2d(4).train()), "training mode"),
    (lambda: Hand(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3, stride=2)), "stride/padding/dilation/groups"),
    (lambda: Hand(nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3)), "weight of shape"),
])
def test_negative_contraction_errors(model, match):
    m = randomize_bn(model().double())
    m.r.eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    gm = fxexpand.trace(m, inline_regions=True)
    propagate_shapes(gm, (x,))
    gm = PassManager(passes=[FoldBatchNorm(scope="expanded"), FuseLinear(scope="expanded")], fixed_point=True)(gm)
    with pytest.raises(fxexpand.ContractionError, match=match):
        RestoreOriginal()(gm.graph_module)


def test_negative_must_run_after_the_contraction_passes():
    with pytest.raises(fxexpand.PassError, match="fold_batchnorm must run before restore_original"):
        PassManager(passes=[RestoreOriginal(), FoldBatchNorm(scope="expanded")])


def test_bias_absorbed_into_a_functional_batch_norm_float64_and_float32():
    """timm's BatchNormAct2d is a leaf while compiling (training mode: the expansion sees a BatchNorm
    module that can take the bias) and is traced through in eval mode, where RestoreOriginal finds an
    inference-mode ``F.batch_norm``: the bias goes into the running_mean buffer it reads."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    class TimmNet(Net):
        def __init__(self):
            super().__init__()
            self.bn1 = BatchNormAct2d(6, act_layer=nn.ReLU)

        def forward(self, x):
            y = self.bn1(self.conv1(x))
            y = F.relu(self.conv2(y))
            return self.fc(y.mean((2, 3)))

    for dtype in (torch.float64, torch.float32):
        model = randomize_bn(TimmNet().to(dtype))
        expanded = fxexpand.compile(model, [InsertInvertedResidual(ratio=2, targets=["conv1"], kernel_size="match"),
                                            DecayActivations()])
        randomize_bn(expanded, seed=3)
        fxexpand.set_decay(expanded, 1.0)
        expanded.eval()
        x = torch.randn(2, 3, 9, 11, dtype=dtype)
        small = fxexpand.contract(expanded, (x,))
        assert ("absorbed", "conv1 -> bn1") in {(n.action, n.where) for n in small.fxexpand_report.notes}
        fresh = TimmNet().to(dtype)
        fresh.load_state_dict(small.state_dict(), strict=True)
        with torch.no_grad():
            assert rel_error(expanded(x), fresh.eval()(x)) < TOL[dtype]
