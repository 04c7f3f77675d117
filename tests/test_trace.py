import pytest
import torch
from torch import nn

import fxexpand
from fxexpand import TraceError


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.conv(x))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, double=False):
        y = self.conv(x)
        if double:
            y = y * 2
        return y


def test_trace_plain_model():
    gm = fxexpand.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert isinstance(gm, torch.fx.GraphModule)


def test_trace_error_names_module_line_and_remedies():
    with pytest.raises(TraceError) as ei:
        fxexpand.trace(Outer())
    msg = str(ei.value)
    assert "'gate'" in msg and "DataDependent" in msg
    assert "test_trace.py" in msg and "x.sum() > 0" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg


def test_leaf_modules_remedy_by_type_and_name():
    x = torch.randn(1, 3, 4, 4)
    for leaf in (DataDependent, "gate"):
        gm = fxexpand.trace(Outer(), leaf_modules=[leaf])
        assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    m = Outer()
    torch.testing.assert_close(fxexpand.trace(m, leaf_modules=["gate"])(x), m(x))


def test_concrete_args_remedy():
    m = Flagged()
    with pytest.raises(TraceError):
        fxexpand.trace(m)
    gm = fxexpand.trace(m, concrete_args={"double": True})
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(gm(x, True), m(x, True))


def test_bad_arguments():
    with pytest.raises(TraceError):
        fxexpand.trace("not a module")
    with pytest.raises(TypeError):
        fxexpand.trace(Outer(), leaf_modules=[int])


def test_contract_and_cli_report_trace_errors():
    with pytest.raises(TraceError):
        fxexpand.contract(Outer(), (torch.randn(1, 3, 4, 4),))


def test_drop_identities_and_lazy_code_generation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.5), nn.ReLU(), nn.Dropout(0.2)).eval()
    model[4].train()  # a dropout in training mode is not an identity: it keeps its node
    x = torch.randn(2, 3, 8, 8)
    gm = fxexpand.trace(model, drop_identities=True, lazy=True)
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds == ["Conv2d", "ReLU", "Dropout"]
    assert "real_recompile" in dir(gm)  # torch.fx's lazy GraphModule: code generated at first use
    model[4].eval()
    gm.eval()
    assert torch.equal(gm(x), model(x))
    plain = fxexpand.trace(model)
    assert [n.target for n in plain.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3", "4"]
    assert not hasattr(plain, "real_recompile")


def test_contract_returns_a_plain_scriptable_graph_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Identity(), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    for target in ("deploy", "original"):
        small = fxexpand.contract(model, (x,), target=target)
        assert isinstance(small, torch.fx.GraphModule) and not hasattr(small, "real_recompile")
        assert type(small).__name__ == "Sequential"
        scripted = torch.jit.script(small)
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
