import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxexpand
from fxexpand import DecayActivation, ExpandedRegion
from fxexpand.passes import RemoveIdentity
from fxexpand.testing import assert_graph_matches

from ._util import apply, check_equivalent, max_rel, op_types

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class WithIdentities(nn.Module):
    def __init__(self, alpha=1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.idt = nn.Identity()
        self.drop = nn.Dropout2d(0.5)
        self.act = DecayActivation(nn.ReLU(), kind="leaky", alpha=alpha)

    def forward(self, x):
        y = self.act(self.drop(self.idt(self.conv(x))))
        return F.dropout(y, 0.2, self.training)


def test_removes_identity_dropout_and_decayed_activation():
    res = check_equivalent(lambda: RemoveIdentity(), WithIdentities(alpha=1.0), torch.randn(2, 3, 8, 8))
    assert op_types(res.graph_module) == ["Conv2d"]
    assert sorted(n.action for n in res.notes) == ["removed"] * 4


def test_keeps_activation_below_alpha_one_rule_6():
    model = WithIdentities(alpha=0.999)
    ref, res, _, x = apply(RemoveIdentity(), model, torch.randn(2, 3, 8, 8))
    assert "DecayActivation" in op_types(res.graph_module)
    assert any("not linear yet" in n.reason for n in res.notes)


def test_training_mode_dropout_is_kept():
    gm = fxexpand.trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5)).train())
    res = RemoveIdentity()(gm)
    assert not res.modified and any("training mode" in n.reason for n in res.notes)


def test_negative_nothing_to_remove():
    _, res, before, _ = apply(RemoveIdentity(), nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), torch.randn(1, 3, 4, 4))
    assert not res.modified and res.graph_module.code == before


def test_decay_activation_values():
    x = torch.linspace(-8, 8, 101)
    for act in (nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1)):
        m0 = DecayActivation(act, kind="leaky", alpha=0.0)
        m1 = DecayActivation(act, kind="leaky", alpha=1.0)
        torch.testing.assert_close(m0(x), act(x))
        torch.testing.assert_close(m1(x), x)
    for act in (nn.GELU(), nn.SiLU(), nn.Hardswish()):
        torch.testing.assert_close(DecayActivation(act, alpha=0.0)(x), act(x))
        torch.testing.assert_close(DecayActivation(act, alpha=1.0)(x), x)
    m = DecayActivation(nn.ReLU(), kind="leaky", alpha=0.25)
    assert "alpha" in dict(m.named_buffers())
    assert "alpha" in m.state_dict()


# -- Before / Expected -----------------------------------------------------------------------------
class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.idt = nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm2d(5)
        self.decayed = DecayActivation(nn.ReLU6(), kind="leaky", alpha=1.0)
        self.sd = torchvision.ops.StochasticDepth(0.2, "row")
        self.head = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        y = self.bn(self.drop(self.idt(self.conv(x))))
        y = F.dropout(self.decayed(y), 0.5, training=False)
        return torch.relu(self.head(self.sd(y)) + y[:, :4])


class Expected(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(self.head(y) + y[:, :4])


def test_before_expected_identities_are_removed():
    _, res, _, _ = apply(RemoveIdentity(), Before(), torch.randn(2, 3, 9, 7))
    assert_graph_matches(res.graph_module, Expected())
    assert sorted(n.reason for n in res.notes) == [
        "decayed activation at alpha=1", "dropout with training=False", "eval-mode dropout",
        "eval-mode stochastic depth", "nn.Identity"]
    assert not hasattr(res.graph_module, "idt") and not hasattr(res.graph_module, "sd")  # submodules deleted


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_removal_is_exact(dtype):
    ref, res, _, x = apply(RemoveIdentity(), Before(), torch.randn(3, 3, 9, 7), dtype)
    assert op_types(res.graph_module) == ["Conv2d", "BatchNorm2d", "Conv2d", "getitem", "add", "relu"]
    assert max_rel(ref, res.graph_module, x) <= TOL[dtype]


class InAndOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.r = ExpandedRegion(nn.Sequential(nn.Conv2d(3, 6, 1), DecayActivation(nn.GELU(), alpha=1.0),
                                              nn.Identity(), nn.Conv2d(6, 4, 1)), nn.Conv2d(3, 4, 1))
        self.idt = nn.Identity()

    def forward(self, x):
        return self.idt(self.r(x))


def test_before_expected_expanded_scope():
    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.idt = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Identity()

        def forward(self, x):
            return self.idt(self.b(self.a(x)))

    _, res, _, _ = apply(RemoveIdentity(scope="expanded"), InAndOut(), torch.randn(1, 3, 5, 5))
    assert not res.modified  # a plain trace keeps the region as one call: nothing is in scope
    gm = fxexpand.trace(InAndOut().eval(), inline_regions=True)
    res = RemoveIdentity(scope="expanded")(gm)
    assert_graph_matches(res.graph_module, E())  # the identity outside the region is kept


def test_negative_training_mode_functional_dropout_and_stochastic_depth_are_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sd = torchvision.ops.StochasticDepth(0.2, "row")

        def forward(self, x):
            return self.sd(F.dropout(x, 0.1, training=True))

    gm = fxexpand.trace(M().train())
    before = gm.code
    res = RemoveIdentity()(gm)
    assert not res.modified and res.graph_module.code == before
    assert sorted(n.reason for n in res.notes) == ["dropout with training=True (or a non-constant flag)",
                                                    "stochastic depth in training mode"]


# -- adding 0 (timm's MobileOne starts its branch sum at 0) ----------------------------------------
class AddsZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = 0 + self.conv(x)
        y = y + 0.0
        return torch.relu(y - 0)


def test_adding_zero_is_removed():
    res = check_equivalent(lambda: RemoveIdentity(), AddsZero(), torch.randn(2, 3, 8, 8))
    assert [n.reason for n in res.notes] == ["adding 0"] * 3
    assert not {"add", "sub"} & set(op_types(res.graph_module))


def test_negative_adding_zero_to_an_integer_or_in_place_target_is_kept():
    class IntPlusZero(nn.Module):
        def forward(self, x):
            return x.argmax(1) + 0.0  # an int64 tensor plus 0.0 is a float tensor

    class InPlace(nn.Module):
        def forward(self, x):
            y = x + 0
            y.add_(1.0)  # after the rewrite this would modify x
            return x + y

    for model, why in ((IntPlusZero(), "torch.int64"), (InPlace(), "in place")):
        _, res, before, _ = apply(RemoveIdentity(), model, torch.randn(2, 3, 4, 4))
        assert not res.modified and res.graph_module.code == before
        assert any(why in n.reason for n in res.notes), [str(n) for n in res.notes]
