import inspect
import operator

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


class FlagRequired(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, double):
        y = self.conv(x)
        if double:
            y = y * 2
        return y


def test_concrete_args_remedy():
    torch.manual_seed(0)
    m = FlagRequired()
    with pytest.raises(TraceError):
        fxexpand.trace(m)
    gm = fxexpand.trace(m, concrete_args={"double": True})
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(gm(x, True), m(x, True))
    # a flag with a default is traced at its default unless concrete_args says otherwise
    gm = fxexpand.trace(Flagged(), concrete_args={"double": True})
    torch.testing.assert_close(gm(x, True), 2 * gm.conv(x))


def test_flag_with_a_default_is_traced_at_its_default():
    """``forward(x, double=False)``: traced at ``double=False`` (an ``if`` on a placeholder cannot be
    traced); the traced forward takes only ``x``, so another value is refused, not ignored."""
    torch.manual_seed(0)
    m = Flagged()
    gm = fxexpand.trace(m)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(gm(x), m(x))
    assert list(inspect.signature(gm.forward).parameters) == ["x"]
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    with pytest.raises(TypeError):
        gm(x, True)
    # named in concrete_args, a flag stays a parameter under its own name (torch.fx's check included)
    named = fxexpand.trace(m, concrete_args={"double": False})
    assert list(inspect.signature(named.forward).parameters) == ["x", "double"]
    torch.testing.assert_close(named(x, False), m(x))
    with pytest.raises(AssertionError, match="double has been specialized"):
        named(x, True)
    assert fxexpand.core.specialised_defaults(m) == {"double": False}
    assert fxexpand.core.specialised_defaults(m, num_inputs=2) == {}
    assert fxexpand.core.specialised_defaults(m, concrete_args={"double": True}) == {}


class OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, scale=None):
        y = self.conv(x)
        if scale is not None:  # with a placeholder, always taken
            y = y * scale
        return y


def test_optional_input_given_by_the_example_inputs_stays_an_input():
    torch.manual_seed(0)
    m = OptionalScale()
    x, s = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 1, 1)
    at_default = fxexpand.trace(m)  # scale=None: the branch is not taken
    torch.testing.assert_close(at_default(x), m(x))
    assert not any(n.target is operator.mul for n in at_default.graph.nodes)
    with pytest.raises(TypeError):
        at_default(x, s)
    given = fxexpand.trace(m, num_inputs=2)
    torch.testing.assert_close(given(x, s), m(x, s))
    # contract and compile trace with the example inputs' count
    torch.testing.assert_close(fxexpand.contract(m, (x, s))(x, s), m(x, s))
    torch.testing.assert_close(fxexpand.contract(m, (x,))(x), m(x))
    with pytest.raises(TypeError, match="num_inputs"):
        fxexpand.trace(m, num_inputs=-1)


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
