import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand import DecayActivation
from fxexpand.passes import RemoveIdentity

from ._util import apply, check_equivalent, op_types


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
