"""Pass, PassResult, PassManager, registry and compile()."""

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxexpand
from fxexpand import (
    EquivalenceError,
    PassError,
    PassManager,
    PassResult,
    PostconditionError,
    PreconditionError,
)
from fxexpand.core import Pass
from fxexpand.passes import FoldBatchNorm, FuseLinear, RemoveIdentity
from fxexpand.testing import assert_unchanged, randomize_bn, snapshot


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


@dataclass(kw_only=True)
class ScaleFirstConv(Pass):
    """Deliberately broken: multiplies the first conv's weight (changes the function)."""

    factor: float = 2.0

    def call(self, gm):
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d):
                with torch.no_grad():
                    gm.get_submodule(n.target).weight.mul_(self.factor)
                return PassResult(gm, True)
        return PassResult(gm, False)


@dataclass(kw_only=True)
class Crash(Pass):
    def call(self, gm):
        raise RuntimeError("boom")


@dataclass(kw_only=True)
class NeedsNoBN(Pass):
    def requires(self, gm):
        if any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)
               for n in gm.graph.nodes):
            raise PreconditionError("graph still has BatchNorm")

    def call(self, gm):
        return PassResult(gm, False)


@dataclass(kw_only=True)
class BreaksGraph(Pass):
    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        # add a node that uses a value defined after it: lint must fail
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            gm.graph.call_function(torch.relu, (out.args[0],))
        return PassResult(gm, True)


@dataclass(kw_only=True)
class EnsuresNothing(Pass):
    def call(self, gm):
        return PassResult(gm, False)

    def ensures(self, gm):
        raise PostconditionError("never satisfied")


def _gm():
    return fxexpand.trace(randomize_bn(Small()).eval())


def test_pass_result_and_typed_kwargs():
    p = FoldBatchNorm(scope="all")
    with pytest.raises(TypeError):
        FoldBatchNorm(scope=3)
    with pytest.raises(ValueError):
        FoldBatchNorm(scope="everywhere")
    with pytest.raises(TypeError):
        FoldBatchNorm("all")  # keyword-only
    res = p(_gm())
    assert isinstance(res, PassResult) and res.modified


def test_pass_requires_graph_module():
    with pytest.raises(TypeError, match="GraphModule"):
        FoldBatchNorm()(Small())


def test_registry_names():
    reg = fxexpand.registered_passes()
    assert {"fold_batchnorm", "fuse_linear", "remove_identity", "verify"} <= set(reg)
    with pytest.raises(PassError, match="no pass is registered"):
        fxexpand.get_pass("nope")


def test_manager_names_failing_pass_and_history():
    pm = PassManager(passes=[RemoveIdentity(), FoldBatchNorm(), Crash()])
    with pytest.raises(PassError) as ei:
        pm(_gm())
    msg = str(ei.value)
    assert "Crash" in msg and "RemoveIdentity" in msg and "FoldBatchNorm" in msg and "boom" in msg


def test_manager_precondition_and_postcondition_errors():
    with pytest.raises(PreconditionError, match="NeedsNoBN.*RemoveIdentity"):
        PassManager(passes=[RemoveIdentity(), NeedsNoBN()])(_gm())
    # after folding the precondition holds
    PassManager(passes=[FoldBatchNorm(), NeedsNoBN()])(_gm())
    with pytest.raises(PostconditionError, match="EnsuresNothing"):
        PassManager(passes=[EnsuresNothing()])(_gm())


def test_manager_lints_after_each_pass():
    with pytest.raises(PassError, match="BreaksGraph.*invalid graph"):
        PassManager(passes=[BreaksGraph()])(_gm())


def test_verify_each_names_first_breaking_pass():
    x = torch.randn(2, 3, 9, 9)
    pm = PassManager(passes=[RemoveIdentity(), FoldBatchNorm(), ScaleFirstConv(), FuseLinear()],
                     verify_each=True, example_inputs=(x,))
    with pytest.raises(EquivalenceError, match=r"pass ScaleFirstConv changed the model's function.*FoldBatchNorm"):
        pm(_gm())
    # the same pipeline without the broken pass verifies cleanly
    PassManager(passes=[RemoveIdentity(), FoldBatchNorm(), FuseLinear()], verify_each=True,
                example_inputs=(x,))(_gm())


def test_verify_each_needs_inputs():
    with pytest.raises(ValueError):
        PassManager(passes=[FoldBatchNorm()], verify_each=True)


def test_fixed_point_and_nesting():
    inner = PassManager(passes=[RemoveIdentity(), FoldBatchNorm()])
    outer = PassManager(passes=[inner, "fuse_linear"], fixed_point=True)
    gm = _gm()
    res = outer(gm)
    assert res.modified
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in res.graph_module.graph.nodes if n.op == "call_module"]
    assert "BatchNorm2d" not in kinds and "Dropout" not in kinds


def test_compile_accepts_names_and_objects_and_never_mutates():
    model = randomize_bn(Small()).eval()
    snap = snapshot(model)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model(x)
    out = fxexpand.compile(model, passes=["remove_identity", FoldBatchNorm()], example_inputs=(x,))
    assert isinstance(out, fx.GraphModule)
    assert_unchanged(model, snap)
    assert out is not model
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)
    # trainable: parameters require grad and receive gradients
    out.train()
    out(x).sum().backward()
    assert all(p.grad is not None for p in out.parameters())
    # the user's model got no gradients either
    assert all(p.grad is None for p in model.parameters())


def test_compile_rejects_bad_pass_spec():
    with pytest.raises(TypeError):
        fxexpand.compile(Small(), passes=[42])
    with pytest.raises(PassError):
        fxexpand.compile(Small(), passes=["not_a_pass"])
