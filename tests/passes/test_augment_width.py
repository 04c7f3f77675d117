"""AugmentWidth (NetAug): which groups become augmentable and how wide, base mode equal to the input
model (float64 and float32), and refusals before any change."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand.core import DynamicLayer, PreconditionError, propagate_shapes
from fxexpand.passes import AugmentWidth
from fxexpand.testing import assert_graph_matches, assert_unchanged, randomize_bn, rel_error, snapshot


class Net(nn.Module):
    """stem (group a, residual through the depthwise block), a hidden expand group (pw1 -> dw -> pw2
    back into a), a down conv (group b, no residual) and a frozen Linear head."""

    def __init__(self, a=4, h=6, b=5, bias=True):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, a, 3, padding=1, bias=False), nn.BatchNorm2d(a)
        self.pw1, self.bn1 = nn.Conv2d(a, h, 1, bias=bias), nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, stride=1, padding=2, dilation=2, groups=h, bias=bias)
        self.pw2 = nn.Conv2d(h, a, 1, bias=bias)
        self.down = nn.Conv2d(a, b, 3, stride=2, bias=bias)
        self.fc = nn.Linear(b, 7)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.pw2(F.relu(self.dw(F.relu(self.bn1(self.pw1(y))))))
        y = F.relu(self.down(y))
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(0))


def augment(model, x=X, **kw):
    return fxexpand.compile(model, passes=[AugmentWidth(**kw)], example_inputs=(x,))


def test_before_expected():
    model = Net()
    assert_graph_matches(fxexpand.trace(model), Net())                      # Before
    aug = augment(model)                                                   # factor 3, diversity 2
    sig = [line for line in fxexpand.testing.graph_signature(aug) if "Dynamic" in line]
    assert [s.split(" ", 2)[2].split(" <-")[0] for s in sig] == [
        "DynamicConv[Conv2d](12, 3, 3, 3)", "DynamicBatchNorm[BatchNorm2d](12,)",
        "DynamicConv[Conv2d](18, 12, 1, 1)", "DynamicBatchNorm[BatchNorm2d](18,)",
        "DynamicConv[Conv2d](18, 1, 3, 3)", "DynamicConv[Conv2d](12, 18, 1, 1)",
        "DynamicConv[Conv2d](15, 12, 3, 3)", "DynamicLinear[Linear](7, 15)"]
    rec = fxexpand.width_record(aug)
    assert {g: (s.axis, s.choices) for g, s in rec.groups.items()} == {
        "stem": ("width", [4, 8, 12]), "pw1": ("expand", [6, 12, 18]), "down": ("expand", [5, 10, 15])}
    assert rec.frozen == {"fc": "reaches the model output"} and rec.stop_width_at == 0.5
    # Expected after contraction: the original graph
    assert_graph_matches(fxexpand.contract(aug.eval(), (X,)), Net())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("bias", [True, False])
def test_base_mode_is_the_original(dtype, bias):
    model = randomize_bn(Net(bias=bias)).to(dtype)
    x = X.to(dtype)
    aug = augment(model, x, width_multipliers=[1.0, 1.5], expand_multipliers=[1.0, 2.0, 3.0])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for mode in ("eval", "train"):
        ref, cand = copy.deepcopy(model), copy.deepcopy(aug)
        getattr(ref, mode)(), getattr(cand, mode)()
        with torch.no_grad():
            assert rel_error(ref(x), cand(x)) <= tol
    with torch.no_grad():
        fxexpand.set_width(aug, "max")
        assert aug(x).shape == (2, 7)
        assert rel_error(model.eval()(x), aug.eval()(x)) > 1e-3  # the largest model is another network


def test_linear_on_tokens_and_layernorm():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln, self.fc2 = nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 6)

        def forward(self, x):  # (B, T, C)
            return x + self.fc2(F.gelu(self.ln(self.fc1(x))))

    model = Tokens().double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    aug = augment(model, x, factor=2.0, diversity=1)
    assert isinstance(aug.ln, DynamicLayer) and fxexpand.width_record(aug).groups["fc1"].choices == [10, 20]
    with torch.no_grad():
        assert rel_error(model(x), aug(x)) <= 1e-12
        fxexpand.set_width(aug, "max")
        assert aug(x).shape == x.shape


def test_negative():
    model = Net()
    snap = snapshot(model)
    with pytest.raises(PreconditionError, match="example_inputs"):
        fxexpand.compile(model, passes=[AugmentWidth()])
    only_head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 11 * 9, 4))
    with pytest.raises(PreconditionError, match="no channel group"):
        augment(only_head)
    for bad in (dict(factor=0.5), dict(diversity=0), dict(width_multipliers=[2.0]),
                dict(expand_multipliers=[1.0, 0.5]), dict(stop_width_at=1.5)):
        with pytest.raises(ValueError):
            AugmentWidth(**bad)
    aug = augment(model)
    gm = fxexpand.trace(aug)
    propagate_shapes(gm, (X,))
    with pytest.raises(PreconditionError, match="already augmented"):
        AugmentWidth()(gm)

    class BNAct(nn.BatchNorm2d):  # a subclass with extra behaviour (as timm's BatchNormAct2d)
        def forward(self, x):
            return F.relu(super().forward(x))

    m = Net()
    m.bn1 = BNAct(6)
    built = fxexpand.compile(m, passes=[AugmentWidth()], example_inputs=(X,), leaf_modules=[BNAct])
    notes = {n.where: n.reason for n in built.fxexpand_notes if n.action == "frozen"}
    assert "BNAct bn1 is not a plain torch.nn layer" in notes["pw1"]
    assert_unchanged(model, snap)
