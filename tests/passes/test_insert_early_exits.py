"""InsertEarlyExits (BoostNet): where exits go, the boosted outputs, the backbone untouched, refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand.core import ExitRecord, GradientScale, PreconditionError, get_record
from fxexpand.passes import InsertEarlyExits
from fxexpand.testing import assert_graph_matches, assert_unchanged, graph_signature, randomize_bn, snapshot


class Block(nn.Module):
    def __init__(self, cin, cout, stride, dims=2):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv, self.bn = conv(cin, cout, 3, stride=stride, padding=1, bias=False), bn(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Backbone(nn.Module):
    """Three stages (resolution 8, 4, 2) of one block each, then a pooled Linear head."""

    def __init__(self, dims=2, classes=5):
        super().__init__()
        self.stem = nn.Sequential(Block(3, 4, 1, dims))
        self.s1, self.s2, self.s3 = Block(4, 6, 1, dims), Block(6, 8, 2, dims), Block(8, 8, 2, dims)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.s3(self.s2(self.s1(self.stem(x))))), 1))


X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def build(model=None, x=X, **kw):
    return fxexpand.compile(model or Backbone(), passes=[InsertEarlyExits(**kw)], example_inputs=(x,))


def test_before_expected():
    model = Backbone()
    assert_graph_matches(fxexpand.trace(model), Backbone())                    # Before: one output
    multi = build(model, head="linear")
    rec = get_record(multi, ExitRecord)
    assert rec.points == ["relu_1", "relu_2", None] and rec.heads == ["exit_heads.0", "exit_heads.1", None]
    sig = graph_signature(multi)
    # Expected: gradient scales around each exit (trunk (N-n)/(N-n+1), head 1/(N-n+1)), two heads,
    # F_2 = 0.5 * detach(F_1) + f_2, F_3 = 0.5 * detach(F_2) + f_3
    assert sum("GradientScale" in s for s in sig) == 4 and sum("Sequential" in s for s in sig) >= 2
    assert [type(multi.get_submodule(f"exit_scales.{k}")).__name__ for k in ("trunk_1", "head_1")] == ["GradientScale"] * 2
    assert [multi.get_submodule(f"exit_scales.{k}").scale for k in ("trunk_1", "head_1", "trunk_2", "head_2")] == \
        [2 / 3, 1 / 3, 1 / 2, 1 / 2]
    assert sum(".detach" in s for s in sig) == 2 and sum(" mul " in s for s in sig) == 2
    # after contraction: the backbone alone (Expected = the original graph)
    assert_graph_matches(fxexpand.contract(multi.eval(), (X,)), Backbone())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("dims", [1, 2])
def test_outputs_are_boosted_and_the_backbone_is_unchanged(dtype, dims):
    model = randomize_bn(Backbone(dims)).to(dtype).eval()
    x = (X[..., 0] if dims == 1 else X).to(dtype)
    snap = snapshot(model)
    multi = build(model, x, temperature=0.5).eval()
    assert_unchanged(model, snap)
    with torch.no_grad():
        outs = multi(x)
        assert len(outs) == 3 and all(o.shape == (3, 5) for o in outs)
        f = [multi.exit_heads[0](model.s1(model.stem(x))), multi.exit_heads[1](model.s2(model.s1(model.stem(x)))),
             model(x)]
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(outs[0], f[0], rtol=0, atol=tol)
        assert torch.allclose(outs[1], 0.5 * f[0] + f[1], rtol=0, atol=tol)
        assert torch.allclose(outs[2], 0.25 * f[0] + 0.5 * f[1] + f[2], rtol=0, atol=tol)
    multi.train()
    assert len(multi(x)) == 3  # a tuple in train mode too
    plain = build(model, x, boost=False, rescale_gradients=False).eval()
    with torch.no_grad():
        assert torch.equal(plain(x)[-1], model(x))                     # boost=False: F_N = f_N
    assert not any(isinstance(m, GradientScale) for m in plain.modules())


def test_exit_choices():
    blocks = build(at="blocks", head="linear")
    # every Block (the stem's too) except the last one, whose exit is the backbone's own output
    assert get_record(blocks, ExitRecord).points[:-1] == ["relu", "relu_1", "relu_2"]
    named = build(at=["s2"], head=lambda c, k: nn.Sequential(nn.Flatten(), nn.LazyLinear(k)))
    assert get_record(named, ExitRecord).points == ["relu_2", None]
    temps = build(temperature=[0.0, 1.0]).eval()
    with torch.no_grad():
        o = temps(X)
        assert torch.allclose(o[1] - o[0] * 0.0, o[1])
    assert get_record(temps, ExitRecord).temperatures == [0.0, 1.0]


def test_negative():
    model = Backbone()
    snap = snapshot(model)
    with pytest.raises(PreconditionError, match="example_inputs"):
        fxexpand.compile(model, passes=[InsertEarlyExits()])
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body, self.fc = Block(3, 4, 1), Block(4, 4, 1), nn.Linear(4, 5)

        def forward(self, x):
            h = self.stem(x)
            return self.fc((h + self.body(h)).mean((2, 3)))

    with pytest.raises(PreconditionError, match="not a cut point"):
        build(Residual(), at=["body"])                                 # the shortcut still reads the stem
    with pytest.raises(PreconditionError, match="neither a module"):
        build(model, at=["nope"])
    with pytest.raises(PreconditionError, match="temperatures"):
        build(model, temperature=[0.5])
    with pytest.raises(PreconditionError, match="no exit point"):
        build(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 4)))
    with pytest.raises(PreconditionError, match="output"):
        build(nn.Conv2d(3, 4, 3))                                      # a feature map, not (batch, classes)
    multi = build(model)
    with pytest.raises(PreconditionError, match="already has early exits"):
        fxexpand.compile(multi, passes=[InsertEarlyExits()], example_inputs=(X,))
    for bad in (dict(at="everywhere"), dict(head="mlp"), dict(temperature=-1)):
        with pytest.raises(ValueError):
            InsertEarlyExits(**bad)
    assert_unchanged(model, snap)
