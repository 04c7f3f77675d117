"""InsertEMABlocks (Network Expansion, depth): copies of the EMA model's blocks are inserted into the
recorded chains, renamed towards the full model's names, and bad requests are refused before any change."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand.core import ModuleRenames
from fxexpand.passes import InsertEMABlocks
from fxexpand.testing import (
    assert_graph_matches,
    assert_unchanged,
    graph_signature,
    randomize_bn,
    rel_error,
    snapshot,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


class Block(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + F.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """The full model (4 blocks); Net(n) is the Expected architecture with n blocks."""

    def __init__(self, n=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.blocks = nn.Sequential(*[Block() for _ in range(n)])
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


X = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(0))


def start(dtype=torch.float32):
    """The 2-of-4-block start model (blocks.0 and blocks.3) and an EMA whose weights differ from it."""
    torch.manual_seed(0)
    full = randomize_bn(Net()).to(dtype).eval()
    plan = fxexpand.GrowthPlan(full, depth_factor=0.5, stages=2, example_inputs=(X[:1].to(dtype),))
    assert plan.counts == {"blocks": [2, 4]}
    small = plan.initial_model().eval()
    ema = fxexpand.EMA(small, decay=0.5)
    with torch.no_grad():  # stand-in for training: the model moves, the EMA follows halfway
        for p in small.parameters():
            p.add_(torch.randn_like(p))
    ema.update(small)
    return small, ema.module.eval()


def leaf_signature(n):
    return graph_signature(fxexpand.trace(Net(n), leaf_modules=[Block]))


def test_before_expected_one_block_from_the_ema():
    small, ema = start()
    assert_graph_matches(small, leaf_signature(2))  # Before: stem, 2 blocks, head
    res = InsertEMABlocks(ema_model=ema, count=1)(small)
    assert res.modified
    gm = res.graph_module
    assert_graph_matches(gm, leaf_signature(3))
    assert_graph_matches(fxexpand.trace(gm, inline_regions=True), Net(3))  # and through the blocks
    # default position: a copy of the last EMA block after the last block; names spread over the full chain
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
        "stem", "blocks.0", "blocks.2", "blocks.3", "head"]
    assert res.records == [ModuleRenames({"blocks.0": "blocks.0", "blocks.2": "blocks.3", "blocks.3": None},
                                         {"blocks.3": "blocks.3"})]


def test_before_expected_explicit_positions_reach_the_full_model():
    small, ema = start()
    gm = InsertEMABlocks(ema_model=ema, count=2, positions=[0, 0])(small).graph_module
    assert_graph_matches(gm, leaf_signature(4))
    assert_graph_matches(fxexpand.trace(gm, inline_regions=True), Net())
    Net().load_state_dict(gm.state_dict(), strict=True)  # the full model's names and shapes


@DTYPES
@pytest.mark.parametrize("positions,order", [
    (None, [("m", "blocks.0"), ("m", "blocks.3"), ("e", "blocks.3")]),
    ([0, 0], [("m", "blocks.0"), ("e", "blocks.0"), ("e", "blocks.0"), ("m", "blocks.3")]),
    ([1, 0], [("m", "blocks.0"), ("e", "blocks.0"), ("m", "blocks.3"), ("e", "blocks.3")]),
])
def test_grown_model_computes_the_model_and_ema_blocks_in_order(positions, order, dtype):
    small, ema = start(dtype)
    count = 1 if positions is None else len(positions)
    grown = fxexpand.compile(small, [InsertEMABlocks(ema_model=ema, count=count, positions=positions)]).eval()
    x = X.to(dtype)
    with torch.no_grad():
        y = small.stem(x)
        for src, name in order:
            y = (small if src == "m" else ema).get_submodule(name)(y)
        want = small.head(y.mean((2, 3)))
        assert rel_error(want, grown(x)) <= TOL[dtype]
        assert rel_error(small(x), grown(x)) > 1e-3  # growth changes the function: the check above is not vacuous
    targets = [n.target for n in grown.graph.nodes if n.op == "call_module"][1:-1]
    for name, (src, _) in zip(targets, order):
        if src == "e":  # an inserted copy of an EMA block: trainable and not shared with the EMA
            block = grown.get_submodule(name)
            assert all(p.requires_grad for p in block.parameters())
            assert not any(p is q for p in block.parameters() for q in ema.parameters())


def wide_ema():
    """A model whose blocks have other shapes than the grown model's."""
    m = Net()
    m.blocks = nn.Sequential(*[Block(8) for _ in range(4)])
    return m


# -- negative ----------------------------------------------------------------------------------------
def broken_chain(small):
    """A ReLU between the two blocks: the chain's blocks no longer follow each other."""
    gm = copy.deepcopy(small)
    first = next(n for n in gm.graph.nodes if n.target == "blocks.0")
    with gm.graph.inserting_after(first):
        relu = gm.graph.call_function(torch.relu, (first,))
    first.replace_all_uses_with(relu, delete_user_cb=lambda u: u is not relu)
    gm.recompile()
    return gm


@pytest.mark.parametrize("make,kwargs,match", [
    (lambda s: fxexpand.trace(Net()), {"count": 1}, "GrowthPlan"),
    (lambda s: s, {"count": {"stage9": 1}}, "unknown chain"),
    (lambda s: s, {"count": {"blocks": 3}}, "cannot insert 3 more"),
    (lambda s: s, {"count": 2, "positions": [0, 5]}, "positions must be 2 block indices"),
    (lambda s: s, {"count": 1, "ema_model": lambda: nn.Sequential()}, "does not match the model's block"),
    (lambda s: s, {"count": 1, "ema_model": wide_ema}, "does not match the model's block"),
    (broken_chain, {"count": 1}, "does not follow"),
])
def test_negative_refused_before_any_change(make, kwargs, match):
    small, ema = start()
    gm = make(small)
    kwargs = {"ema_model": ema, **{k: v() if k == "ema_model" else v for k, v in kwargs.items()}}  # built seeded
    snap, code = snapshot(gm), gm.code
    with pytest.raises(fxexpand.PreconditionError, match=match):
        InsertEMABlocks(**kwargs)(gm)
    assert_unchanged(gm, snap, "InsertEMABlocks")
    assert gm.code == code


def test_negative_full_chain_is_left_alone_and_bad_arguments():
    small, ema = start()
    full = InsertEMABlocks(ema_model=ema, count=2)(small).graph_module
    code = full.code
    res = InsertEMABlocks(ema_model=ema, count=1)(full)  # 4 of 4 blocks: no room
    assert res.modified is False and res.records == [] and full.code == code
    with pytest.raises(ValueError):
        InsertEMABlocks(ema_model=ema, count=-1)
    with pytest.raises(TypeError):
        InsertEMABlocks(ema_model=ema, positions="0")
