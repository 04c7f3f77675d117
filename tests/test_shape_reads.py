"""Issue 16, item 1: metadata reads (``y.shape``, ``y.size()``, ``y.dim()``, ``y.ndim``, ``len(y)``,
``y.numel()``, ``y.dtype``, ``torch._assert`` on them) are not uses: they block neither BatchNorm
folding nor linear fusion, and after the rewrite they read a tensor of the same shape, for every
input size (the reads stay live in the graph; they are not frozen to the example input's values)."""

import copy

import pytest
import torch
import torch.fx
from torch import nn

import fxexpand
from fxexpand.core import is_metadata_read, propagate_shapes, value_users
from fxexpand.passes import FoldBatchNorm, FuseLinear
from fxexpand.testing import randomize_bn, rel_error

torch.fx.wrap("len")  # so that ``len(y)`` is recorded in the graph instead of failing to trace

#: each form returns a number that depends on the read (and, for size(2) / len, on the input size)
READS = {
    "shape": lambda y: y.shape[1],
    "size": lambda y: y.size(2),
    "size()": lambda y: y.size()[-1],
    "dim": lambda y: y.dim(),
    "ndim": lambda y: y.ndim,
    "len": lambda y: len(y),
    "numel": lambda y: y.numel() / 100.0,
    "assert": lambda y: (torch._assert(y.dim() == 4, "expected a 4-D input"), 1)[1],
    "dtype": lambda y: torch.ones((), dtype=y.dtype) * 2,
}


class FoldSite(nn.Module):
    """``bn(conv(x))`` whose conv output's metadata is read (timm's BatchNormAct2d asserts its rank)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * READS[self.form](y)


class ParallelSite(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        ya, yb = self.a(x), self.b(x)
        return (ya + yb) * READS[self.form](ya) + READS[self.form](yb)


class ResidualSite(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        y = self.conv(x)
        return (x + y) * READS[self.form](y)


class SequentialSite(nn.Module):
    """``c2(c1(x))`` with the intermediate's metadata read; ``keep`` says which op keeps the shape."""

    def __init__(self, form, keep):
        super().__init__()
        self.form = form
        if keep == "second":   # the read moves to the fused output
            self.c1, self.c2 = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        elif keep == "first":  # the read moves to the chain's input
            self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 6, 3)
        else:                  # neither: no tensor left has the intermediate's shape
            self.c1, self.c2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y) * READS[self.form](y)


def _run(pass_obj, model, shape, dtype):
    ref = randomize_bn(copy.deepcopy(model)).to(dtype).eval()
    gm = fxexpand.trace(copy.deepcopy(ref))
    x = torch.randn(*shape, dtype=dtype)
    propagate_shapes(gm, (x,))
    result = pass_obj(gm)
    result.graph_module.graph.lint()
    result.graph_module.recompile()
    return ref, result


def _check(ref, gm, shapes, dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for shape in shapes:  # the example input's size and another one: the reads stay live
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            assert rel_error(ref(x), gm(x)) <= tol, shape


def _count(gm, kind):
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind))


@pytest.mark.parametrize("form", list(READS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_metadata_read_does_not_block_folding(form, dtype):
    ref, res = _run(FoldBatchNorm(), FoldSite(form), (2, 3, 8, 8), dtype)
    assert [n.action for n in res.notes] == ["folded"], [str(n) for n in res.notes]
    gm = res.graph_module
    assert _count(gm, nn.Conv2d) == 1 and _count(gm, nn.BatchNorm2d) == 0  # the old conv is gone
    _check(ref, gm, [(2, 3, 8, 8), (3, 3, 5, 7)], dtype)


@pytest.mark.parametrize("form", ["shape", "size", "len", "assert", "ndim"])
def test_metadata_read_does_not_block_parallel_or_residual_fusion(form):
    for model in (ParallelSite(form), ResidualSite(form)):
        ref, res = _run(FuseLinear(), model, (2, 4, 8, 8), torch.float64)
        # ("assert" multiplies by the constant 1, which joins the fused op as a scale)
        assert {n.action for n in res.notes} == {"fused"}, [str(n) for n in res.notes]
        assert _count(res.graph_module, nn.Conv2d) == 1
        _check(ref, res.graph_module, [(2, 4, 8, 8), (1, 4, 6, 9)], torch.float64)


@pytest.mark.parametrize("keep", ["second", "first"])
@pytest.mark.parametrize("form", ["shape", "size()", "numel"])
def test_metadata_read_of_a_fused_intermediate_moves_to_a_tensor_of_its_shape(keep, form):
    for dtype in (torch.float64, torch.float32):
        ref, res = _run(FuseLinear(allow_flop_increase=True), SequentialSite(form, keep), (2, 4, 8, 8), dtype)
        assert [n.action for n in res.notes] == ["fused"], [str(n) for n in res.notes]
        assert _count(res.graph_module, nn.Conv2d) == 1
        _check(ref, res.graph_module, [(2, 4, 8, 8), (1, 4, 7, 10)], dtype)


def test_negative_read_of_an_intermediate_whose_shape_no_tensor_keeps():
    ref, res = _run(FuseLinear(allow_flop_increase=True), SequentialSite("shape", "neither"), (2, 4, 8, 8),
                    torch.float64)
    assert not res.modified
    assert any("shape of c1 is read" in n.reason for n in res.notes), [str(n) for n in res.notes]
    _check(ref, res.graph_module, [(2, 4, 8, 8)], torch.float64)


def test_value_use_still_blocks_folding():
    class ValueUse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y.sum()  # a value read: folding would change it

    _, res = _run(FoldBatchNorm(), ValueUse(), (1, 3, 8, 8), torch.float64)
    assert not res.modified and any("other users" in n.reason for n in res.notes)


def test_is_metadata_read_forms():
    gm = fxexpand.trace(FoldSite("shape"))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    reads = [u for u in conv.users if is_metadata_read(u, conv)]
    assert len(reads) == 1 and reads[0].args[1] == "shape"
    assert [u.target for u in value_users(conv)] == ["bn"]
    for form in READS:
        gm = fxexpand.trace(FoldSite(form))
        conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
        assert len(value_users(conv)) == 1, form


def test_contract_folds_timm_batchnorm_act():
    timm = pytest.importorskip("timm")
    cna = timm.layers.ConvNormAct
    model = nn.Sequential(cna(3, 8, 3), cna(8, 8, 3, groups=8, apply_act=False))
    model = randomize_bn(model).eval()
    x = torch.randn(1, 3, 16, 16)
    small = fxexpand.contract(model, (x,), target="deploy")
    assert _count(small, nn.Conv2d) == 2
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in small.graph.nodes)
    assert small.fxexpand_report.verification.passed
    assert small.fxexpand_report.verification.max_abs_error() < 1e-4
