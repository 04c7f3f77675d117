import copy

import torch
from torch import nn

import fxexpand
from fxexpand.core import find_regions, propagate_shapes
from fxexpand.testing import randomize_bn, rel_error


def apply(pass_obj, model: nn.Module, x: torch.Tensor, dtype=torch.float64):
    """Trace a copy of ``model`` in ``dtype``, propagate shapes, run the pass; return (ref, result)."""
    ref = copy.deepcopy(model).to(dtype).eval()
    randomize_bn(ref)
    gm = fxexpand.trace(copy.deepcopy(ref))
    xs = x.to(dtype)
    propagate_shapes(gm, (xs,))
    before = gm.code
    res = pass_obj(gm)
    res.graph_module.graph.lint()
    res.graph_module.recompile()
    return ref, res, before, xs


def max_rel(ref, gm, x) -> float:
    with torch.no_grad():
        return rel_error(ref(x), gm(x))


def op_types(gm) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(gm.get_submodule(n.target)).__name__)
        elif n.op == "call_function":
            out.append(getattr(n.target, "__name__", str(n.target)))
    return out


def check_equivalent(pass_factory, model, x, *, expect_modified=True):
    """float64 to 1e-10 relative and float32 to 1e-5; returns the float64 result."""
    ref, res, before, xs = apply(pass_factory(), model, x, torch.float64)
    assert res.modified is expect_modified, [str(n) for n in res.notes]
    assert max_rel(ref, res.graph_module, xs) <= 1e-10
    ref32, res32, _, xs32 = apply(pass_factory(), model, x, torch.float32)
    assert max_rel(ref32, res32.graph_module, xs32) <= 1e-5
    return res


def expand_contract(passes, model: nn.Module, x: torch.Tensor, dtype, *, alpha: float = 1.0):
    """Expand a ``dtype`` copy of ``model`` (randomised BatchNorm statistics) with ``passes()``,
    randomise the statistics again (the blocks' BatchNorms too), set alpha and contract back to
    the original architecture. Returns ``(original, expanded, contracted, restored, x)``, where
    ``restored`` is a copy of the original model loaded strictly with the contracted state_dict
    (None if ``model`` itself contains expanded regions)."""
    original = randomize_bn(copy.deepcopy(model).to(dtype).eval())
    xs = x.to(dtype)
    expanded = fxexpand.compile(original, passes=passes(), example_inputs=(xs,))
    assert find_regions(expanded), "nothing was expanded"
    randomize_bn(expanded, seed=1)
    fxexpand.set_decay(expanded, alpha)
    expanded.eval()
    contracted = fxexpand.contract(expanded, (xs,))
    restored = None
    if not find_regions(original):  # a model that already had regions has no plain original to reload
        restored = copy.deepcopy(original)
        restored.load_state_dict(contracted.state_dict(), strict=True)
    return original, expanded, contracted, restored, xs
