"""Transformers whose forward() has optional arguments (timm ViTs: ``forward(x, attn_mask=None,
is_causal=False)``), and shape propagation that fails: issue 25 item 3.

Root cause: such arguments were traced as graph inputs. Their values (None, False) have no tensor
shape, so NetAug and the early exits, which asked for a shape on *every* input, said "pass
example_inputs" although example inputs were passed; and every block read them, so the graph had no
cut point for an exit. They are now traced at their defaults and leave the graph
(``fxexpand.core.specialised_defaults``), and a pass asks only that shapes were propagated
(``fxexpand.core.shapes_known``, where an input whose value is None or a flag counts as known).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand import exits
from fxexpand.core import (
    InputError,
    PreconditionError,
    ShapePropagationError,
    propagate_shapes,
    require_shapes,
    shapes_known,
)
from fxexpand.passes import AugmentWidth, InsertEarlyExits
from fxexpand.testing import check_netaug


class Block(nn.Module):
    """Pre-norm transformer block (one head) with timm's optional attention arguments."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, c).unbind(2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """The shape of timm's VisionTransformer.forward: blocks one by one when a mask or the causal flag
    is given, else through the Sequential."""

    def __init__(self, dim: int = 16, depth: int = 3, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = self.embed(x).flatten(2).transpose(1, 2)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        else:
            x = self.blocks(x)
        return self.head(self.norm(x).mean(1))


def _x(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_optional_arguments_are_traced_at_their_defaults():
    """The graph is the eager model's default path and takes only ``x`` (every placeholder is an input)."""
    torch.manual_seed(0)
    m = TinyViT().eval()
    gm = fxexpand.trace(m)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    sdpa = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == 3 and all(n.kwargs["attn_mask"] is None and n.kwargs["is_causal"] is False for n in sdpa)
    x = _x()
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="attn_mask"):
        gm(x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))


def test_shapes_known_counts_a_non_tensor_input_as_known():
    """The root cause of the misleading error: an input whose value is None has no shape to record."""
    torch.manual_seed(0)
    gm = fxexpand.trace(TinyViT(), num_inputs=3)  # attn_mask and is_causal stay graph inputs
    assert not shapes_known(gm)
    with pytest.raises(PreconditionError, match=r"AugmentWidth needs tensor shapes .*\['x', 'attn_mask', 'is_causal'\]"):
        require_shapes(gm, "AugmentWidth")
    propagate_shapes(gm, (_x(),))
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert "tensor_meta" in ph[0].meta and "tensor_meta" not in ph[1].meta and ph[1].meta["type"] is type(None)
    assert shapes_known(gm)
    require_shapes(gm, "AugmentWidth")


def test_passes_without_example_inputs_still_ask_for_them():
    torch.manual_seed(0)
    for p in (AugmentWidth(), InsertEarlyExits(at="blocks")):
        with pytest.raises(PreconditionError, match="needs tensor shapes"):
            fxexpand.compile(TinyViT(), passes=[p])


def test_netaug_on_a_transformer_with_optional_arguments():
    """float64 and float32 base mode = original, NetAug steps, contract, strict load, equal outputs."""
    torch.manual_seed(0)
    m = TinyViT()
    res = check_netaug(m, (_x(),), configs=2)
    assert res.status == "ok", res.detail
    assert res.errors["base_eval"] <= 1e-12 and res.errors["contract"] <= 1e-12 and res.errors["base_float32"] <= 1e-5
    aug = fxexpand.compile(m, passes=fxexpand.recipes.netaug(), example_inputs=(_x(),))
    augmented = {n.where for n in aug.fxexpand_notes if n.action == "augmented"}
    assert augmented == {f"blocks.{i}.fc1" for i in range(3)}  # the MLP hidden widths


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_early_exits_on_a_transformer_with_optional_arguments(dtype, tol):
    """An exit after each block but the last; one BoostNet step; contract gives back the backbone."""
    torch.manual_seed(0)
    m = TinyViT().to(dtype)
    x, y = _x().to(dtype), torch.randint(0, 10, (2,), generator=torch.Generator().manual_seed(1))
    multi = fxexpand.compile(m, passes=fxexpand.recipes.early_exits(head="linear"), example_inputs=(x,))
    multi.eval()
    with torch.no_grad():
        outs = multi(x)
        t = multi.fxexpand_records["ExitRecord"].temperatures[-1]
        assert len(outs) == 3
        torch.testing.assert_close(outs[-1] - t * outs[-2], m.eval()(x), rtol=tol, atol=tol)
    multi.train()
    opt = torch.optim.SGD(multi.parameters(), lr=1e-2, momentum=0.9)
    opt.zero_grad()
    exits.loss(multi(x), y).backward()
    opt.step()
    multi.eval()
    with torch.no_grad():
        outs = multi(x)
        backbone = outs[-1] - t * outs[-2]  # the trained backbone's own output f_N
    small = fxexpand.contract(multi, (x,))
    fresh = copy.deepcopy(m)
    fresh.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), backbone, rtol=tol, atol=tol)


def test_exit_segments_of_a_transformer_with_optional_arguments():
    """Every placeholder is an input: the split into one segment per exit runs, and chaining the
    segments gives the multi-exit model's raw head outputs."""
    torch.manual_seed(0)
    x = _x()
    multi = fxexpand.compile(TinyViT(), passes=fxexpand.recipes.early_exits(head="linear"), example_inputs=(x,))
    multi.eval()
    segs = exits.segments(multi, (x,))
    assert len(segs) == 3 and segs[0].inputs == ["x"]
    env = {"x": x}
    with torch.no_grad():
        for seg in segs:
            res = seg.module(*[env[n] for n in seg.inputs])
            env.update(zip(seg.outputs, res if isinstance(res, tuple) else (res,)))
        outs, t = multi(x), multi.fxexpand_records["ExitRecord"].temperatures
    raw = [outs[0]] + [outs[n] - t[n - 1] * outs[n - 1] for n in range(1, 3)]
    for seg, want in zip(segs, raw):
        torch.testing.assert_close(env[seg.logits], want, rtol=1e-5, atol=1e-5)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_tiny_patch16_224"])
def test_timm_vit_netaug_and_early_exits_contract_to_the_original(name):
    """The issue's models at a small image size (the same forward(x, attn_mask=None, is_causal=False))."""
    torch.manual_seed(0)
    make = lambda: timm.create_model(name, pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=3)  # noqa: E731
    x, y = _x(size=32), torch.randint(0, 10, (2,), generator=torch.Generator().manual_seed(1))
    for recipe in (fxexpand.recipes.netaug(), fxexpand.recipes.early_exits()):
        torch.manual_seed(0)
        model = make()
        big = fxexpand.compile(model, passes=recipe, example_inputs=(x,))
        opt = torch.optim.SGD(big.parameters(), lr=1e-3, momentum=0.9)
        big.train()
        if isinstance(recipe[0], AugmentWidth):
            loss = fxexpand.netaug_loss(big, fxexpand.WidthSampler(big, seed=0, total_steps=4), 0, x, y, F.cross_entropy)
        else:
            loss = exits.loss(big(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        big.eval()
        small = fxexpand.contract(big, (x,))
        fresh = make()
        fresh.load_state_dict(small.state_dict(), strict=True)
        with torch.no_grad():
            want = big(x) if isinstance(recipe[0], AugmentWidth) else small(x)
            torch.testing.assert_close(fresh.eval()(x), want)


class Nest(nn.Module):
    def forward(self, x):
        return torch.nested.as_nested_tensor([x[0], x[1, :2]])


class NestedOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.nest = nn.Linear(3, 3), Nest()

    def forward(self, x):
        return self.nest(self.lin(x))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_shape_propagation_failure_is_a_typed_error_naming_its_node_and_cause():
    """The model runs, but a nested tensor has no sizes/strides to record: ShapePropagationError."""
    torch.manual_seed(0)
    m = NestedOut()
    x = torch.randn(2, 3)
    gm = fxexpand.trace(m, leaf_modules=[Nest])
    gm(x)  # the model itself runs
    with pytest.raises(ShapePropagationError) as ei:
        propagate_shapes(gm, (x,))
    e = ei.value
    assert e.node == "nest" and isinstance(e.cause, RuntimeError) and e.__cause__ is e.cause
    assert "node 'nest' (call_module nest)" in str(e) and "NestedTensorImpl" in str(e)
    assert "While executing" not in str(e)
    with pytest.raises(ShapePropagationError, match="node 'nest'"):
        fxexpand.compile(m, passes=[AugmentWidth()], example_inputs=(x,), leaf_modules=[Nest])


def test_inputs_that_do_not_fit_name_the_node_that_failed():
    torch.manual_seed(0)
    gm = fxexpand.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(InputError, match=r"\(2, 4\) torch.float32\) at node '_2' \(call_module 2\): RuntimeError") as ei:
        propagate_shapes(gm, (torch.randn(2, 4),))
    assert isinstance(ei.value.__cause__, RuntimeError)
