import copy

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand import EquivalenceError, InputError
from fxexpand.testing import randomize_bn


class TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.a(x))
        return {"features": y, "logits": self.b(y.mean((2, 3)))}


def test_report_per_output_and_precision():
    m = randomize_bn(TwoOut()).eval()
    rep = fxexpand.verify(m, copy.deepcopy(m), (torch.randn(2, 3, 6, 6),), trials=2)
    names = {(o.name, o.precision) for o in rep.outputs}
    assert names == {("output['features']", "float32"), ("output['logits']", "float32"),
                     ("output['features']", "float64"), ("output['logits']", "float64")}
    assert rep.passed and rep.max_abs_error() == 0.0
    assert all(o.trials == 2 for o in rep.outputs)


def test_raises_naming_the_diverged_output():
    m = randomize_bn(TwoOut()).eval()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.b.bias.add_(1e-2)
    with pytest.raises(EquivalenceError, match=r"output\['logits'\]") as ei:
        fxexpand.verify(m, bad, (torch.randn(2, 3, 6, 6),))
    assert "features" not in str(ei.value)
    assert ei.value.report is not None and not ei.value.report.passed


def test_float64_catches_error_float32_hides():
    """A perturbation of relative size 1e-7 passes the float32 tolerance but not float64."""
    m = nn.Sequential(nn.Linear(8, 8)).double()
    cand = copy.deepcopy(m)
    with torch.no_grad():
        cand[0].weight.mul_(1 + 1e-7)
    x = torch.randn(4, 8, dtype=torch.float64)
    m32, c32 = copy.deepcopy(m).float(), copy.deepcopy(cand).float()
    fxexpand.verify(m32, c32, (x.float(),), float64=False)  # float32 alone: hidden
    with pytest.raises(EquivalenceError, match="float64"):
        fxexpand.verify(m32, c32, (x.float(),), candidate64=cand)


def test_nan_weights_never_pass():
    m = nn.Linear(3, 3)
    cand = copy.deepcopy(m)
    with torch.no_grad():
        cand.weight[0, 0] = float("nan")
    with pytest.raises(EquivalenceError, match="NaN or Inf"):
        fxexpand.verify(m, cand, (torch.randn(2, 3),))
    with pytest.raises(EquivalenceError, match="NaN or Inf"):
        fxexpand.verify(cand, cand, (torch.randn(2, 3),))


def test_wrong_inputs_are_input_errors():
    m = nn.Conv2d(3, 4, 3)
    with pytest.raises(InputError, match="shape/dtype"):
        fxexpand.verify(m, m, (torch.randn(1, 5, 8, 8),))
    with pytest.raises(InputError):
        fxexpand.verify(m, m, "not a tensor")
    with pytest.raises(InputError):
        fxexpand.verify(m, m, (torch.randint(0, 3, (1, 3, 8, 8)),))


def test_structure_mismatch():
    with pytest.raises(EquivalenceError, match="structure"):
        fxexpand.verify(nn.Identity(), TwoOut().eval(), (torch.randn(1, 3, 4, 4),))


def test_verify_does_not_touch_models():
    m = randomize_bn(TwoOut()).train()
    before = copy.deepcopy(m.state_dict())
    fxexpand.verify(m, m, (torch.randn(2, 3, 6, 6),))
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_verify_pass():
    m = randomize_bn(TwoOut()).eval()
    gm = fxexpand.trace(copy.deepcopy(m))
    res = fxexpand.passes.Verify(reference=m, example_inputs=(torch.randn(1, 3, 5, 5),))(gm)
    assert res.modified is False and res.notes[0].action == "info"
    with torch.no_grad():
        gm.a.weight.mul_(2)
    with pytest.raises(EquivalenceError):
        fxexpand.passes.Verify(reference=m, example_inputs=(torch.randn(1, 3, 5, 5),))(gm)
