"""Target selection shared by the expansion passes.

An expansion target is a ``call_module`` node of an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear``
called from exactly one place (rule 7). Selection modes (the ``targets`` argument):

* ``None``: an evenly spaced ``fraction`` of the eligible layers, in execution order;
* ``"blocks"``: NetBooster's setting — an evenly spaced ``fraction`` of the model's repeated
  blocks (torchvision ``InvertedResidual`` / MnasNet ``_InvertedResidual`` / EfficientNet
  ``MBConv`` / ResNet ``Bottleneck`` and ``BasicBlock`` / ShuffleNet ``InvertedResidual``; timm's
  EfficientNet / MobileNetV3 / MobileNetV4 blocks ``DepthwiseSeparableConv``, ``InvertedResidual``,
  ``UniversalInvertedResidual``, ``EdgeResidual``, ``CondConvResidual``, ``ConvBnAct``; or any
  module whose class name ends in ``Block``), and in each the first eligible layer (the first
  pointwise one if asked to prefer those); a model without such blocks falls back to ``None``, and
  a model whose blocks hold no eligible layer (a conv pass on a transformer) gets none;
* a list of qualified names (each must be eligible, else an error says why);
* a predicate ``fn(name, module) -> bool`` over eligible layers.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import PassError
from .fx import get_module, module_call_counts
from .ops import is_add, norm_padding
from .provenance import ExpandedRegion

__all__ = ["BLOCK_TYPES", "ACTIVATION_MODULES", "ACTIVATION_FUNCS", "block_of", "evenly_spaced", "select_targets", "conv_problem",
           "activation_near", "spread", "residual_branch_nodes", "output_layers", "pooled_input"]

BLOCK_TYPES = {"InvertedResidual", "_InvertedResidual", "MBConv", "FusedMBConv", "Bottleneck", "BasicBlock",
               # timm.models._efficientnet_blocks (EfficientNet, MobileNetV3, MobileNetV4 and relatives)
               "DepthwiseSeparableConv", "UniversalInvertedResidual", "EdgeResidual", "CondConvResidual", "ConvBnAct"}

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU,
                      nn.Hardtanh, nn.Sigmoid, nn.Tanh)
_FUNC_ACT = {F.relu: nn.ReLU, F.relu6: nn.ReLU6, F.silu: nn.SiLU, F.gelu: nn.GELU, F.hardswish: nn.Hardswish,
             F.leaky_relu: nn.LeakyReLU, F.mish: nn.Mish, F.elu: nn.ELU}
#: functional activations and the module class that computes the same (with default arguments)
ACTIVATION_FUNCS = _FUNC_ACT


def evenly_spaced(n: int, fraction: float) -> list[int]:
    """Indices of an evenly spaced ``fraction`` of ``n`` items, starting with the first:
    every other item for 0.5 (so ``ceil(n/2)`` of them), every third for 1/3, all for 1."""
    if n == 0 or fraction <= 0:
        return []
    m = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    return sorted({min(n - 1, math.floor(i / fraction + 1e-9)) for i in range(m)})


def _block_and_class(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    block = None
    for key, val in stack.items():
        path, cls = (val if isinstance(val, tuple) else (key, val))
        name = getattr(cls, "__name__", str(cls))
        if name in BLOCK_TYPES or name.endswith("Block"):
            block = (path, name)  # innermost wins
    return block


def block_of(node: fx.Node) -> str | None:
    """The qualified name of the innermost repeated block (a module of a :data:`BLOCK_TYPES` class
    or one whose class name ends in ``Block``) that ``node`` runs in, or None."""
    found = _block_and_class(node)
    return found[0] if found else None


def select_targets(
    gm: fx.GraphModule,
    *,
    targets: Any,
    fraction: float,
    eligible: Callable[[fx.GraphModule, fx.Node, nn.Module], str],
    pass_name: str,
    prefer_pointwise: bool = False,
) -> tuple[list[fx.Node], list[tuple[str, str]]]:
    """Choose target nodes; returns ``(chosen, skipped)`` with ``skipped`` = [(name, reason)].

    ``eligible(gm, node, module)`` returns "" if the layer can be expanded — including that the
    expansion will contract back exactly — else the reason it cannot.
    """
    calls = module_call_counts(gm)
    candidates: list[fx.Node] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        mod = get_module(gm, node.target)
        if isinstance(mod, ExpandedRegion):
            skipped.append((node.target, "already expanded"))
            continue
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d)):
            continue
        reason = eligible(gm, node, mod)
        if not reason and calls[node.target] > 1:
            reason = f"called from {calls[node.target]} places (rule 7)"
        if reason:
            skipped.append((node.target, reason))
        else:
            candidates.append(node)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.linear):
            skipped.append((node.name, "functional op: expansion targets are modules"))

    if targets is None:
        idx = evenly_spaced(len(candidates), fraction)
        chosen = [candidates[i] for i in idx]
        chosen_set = set(chosen)
        skipped += [(n.target, f"not among the evenly spaced fraction={fraction}") for n in candidates
                    if n not in chosen_set]
        return chosen, skipped
    if targets == "blocks":
        blocks: dict[str, fx.Node] = {}
        for n in candidates:
            b = block_of(n)
            if b is None:
                continue
            cur = blocks.get(b)
            # the first eligible layer of the block, preferring pointwise convs (NetBooster)
            if cur is None or (prefer_pointwise and not _pointwise(gm, cur) and _pointwise(gm, n)):
                blocks[b] = n
        if not blocks:
            present = {b: cls for b, cls in filter(None, map(_block_and_class, gm.graph.nodes))}
            if present:
                # the model has repeated blocks, but none holds a layer this pass can expand (a
                # conv pass on a transformer): expanding the layers outside them instead (a stem or
                # patch embedding) would not be the method, so choose nothing and say why
                kinds = ", ".join(f"{cls} x{k}" for cls, k in collections.Counter(present.values()).most_common())
                skipped += [(n.target, "not inside a repeated block") for n in candidates]
                return [], skipped + [("-", f"none of the model's repeated blocks ({kinds}) holds an eligible layer")]
            chosen, more = select_targets(gm, targets=None, fraction=fraction, eligible=eligible, pass_name=pass_name)
            return chosen, more + [("-", "no repeated blocks found: used an evenly spaced fraction of layers")]
        names = list(blocks)
        idx = set(evenly_spaced(len(names), fraction))
        chosen = [blocks[names[i]] for i in sorted(idx)]
        chosen_set = set(chosen)
        for n in candidates:
            if n not in chosen_set:
                b = block_of(n)
                why = ("not inside a repeated block" if b is None else
                       "not the first eligible layer of its block" if blocks.get(b) is not n else
                       f"its block is not among the evenly spaced fraction={fraction} of blocks")
                skipped.append((n.target, why))
        return chosen, skipped
    if callable(targets):
        chosen = [n for n in candidates if targets(n.target, get_module(gm, n.target))]
        skipped += [(n.target, "rejected by the targets predicate") for n in candidates if n not in chosen]
        return chosen, skipped
    if isinstance(targets, (list, tuple, set, frozenset)):
        wanted = list(targets)
        by_name = {n.target: n for n in candidates}
        reasons = dict(skipped)
        bad = [f"{t} ({reasons.get(t, 'no such conv/linear module in the traced graph')})"
               for t in wanted if t not in by_name]
        if bad:
            raise PassError(f"{pass_name}: cannot expand {', '.join(bad)}")
        chosen = [n for n in candidates if n.target in set(wanted)]
        skipped += [(n.target, "not listed in targets") for n in candidates if n.target not in set(wanted)]
        return chosen, skipped
    raise TypeError(f"{pass_name}: targets must be None, 'blocks', a list of names or a predicate, got {targets!r}")


def conv_problem(m: nn.Module, what: str = "") -> str:
    """Why a module cannot be an expansion target as a conv ("" if it can)."""
    if type(m) not in (nn.Conv1d, nn.Conv2d):
        return f"{type(m).__name__} is not a Conv1d/Conv2d{what}"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if norm_padding(m.padding, tuple(m.kernel_size), tuple(m.dilation)) is None:
        return "asymmetric 'same' padding"
    return ""


_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_REDUCE = {"mean", "amax", "sum", "max"}
# ops a gate's input passes through between the pooling and the conv (value-preserving or elementwise)
_PASS_THROUGH_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "to", "float"}


def _global_pool(gm: fx.GraphModule, n: fx.Node) -> str:
    """The name of ``n``'s global (spatial) pooling op, or "" if it is not one."""
    def all_ones(size: Any) -> bool:
        return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))

    if n.op == "call_module":
        m = get_module(gm, n.target)
        if isinstance(m, _POOL_MODULES) and all_ones(m.output_size):
            return type(m).__name__
        return ""
    if n.op == "call_function" and n.target in _POOL_FUNCS:
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        return n.target.__name__ if all_ones(size) else ""
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "") if n.op == "call_function" else ""
    if name in _REDUCE:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        # a reduction over every spatial axis (dims 2.. of an N, C, *spatial tensor)
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        meta = src.meta.get("tensor_meta") if src is not None else None
        ndim = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if dim is not None and all(isinstance(d, int) for d in dims):
            if ndim is not None:
                spatial = set(range(2, ndim))
                if spatial and {d % ndim for d in dims} >= spatial:
                    return f"{name}{tuple(dims)}"
            elif {d for d in dims if d >= 0} >= {2, 3} or {d for d in dims if d < 0} >= {-1, -2}:
                return f"{name}{tuple(dims)}"
    return ""


def pooled_input(gm: fx.GraphModule, node: fx.Node, depth: int = 8) -> str:
    """Describes the global pooling ``node``'s input comes from ("" if none): a conv / linear on
    globally pooled features, such as a squeeze-excitation gate's reduce/expand convs or a head
    conv after global pooling. Walks back through up to ``depth`` single-input ops (activations,
    dropout, reshapes, and pointwise convs / linears, which keep features pooled)."""
    cur = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    for _ in range(depth):
        if cur is None:
            return ""
        pool = _global_pool(gm, cur)
        if pool:
            return pool
        passes = (
            (cur.op == "call_module" and isinstance(get_module(gm, cur.target),
                                                    ACTIVATION_MODULES + (nn.Dropout, nn.Identity, nn.Flatten)))
            or (cur.op == "call_module"
                and isinstance(get_module(gm, cur.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                and _pointwise(gm, cur))
            or (cur.op == "call_function" and (cur.target in _FUNC_ACT or cur.target is F.dropout))
            or (cur.op == "call_method" and cur.target in _PASS_THROUGH_METHODS))
        if not passes:
            return ""
        cur = cur.args[0] if cur.args and isinstance(cur.args[0], fx.Node) else None
    return ""


def _pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = get_module(gm, node.target)
    k = getattr(m, "kernel_size", (0,))
    return all(s == 1 for s in (k if isinstance(k, (tuple, list)) else (k,)))


def activation_near(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The activation the model uses next to ``node`` (after it, skipping one BN; else before it)."""

    def as_act(n: fx.Node) -> nn.Module | None:
        if n.op == "call_module":
            m = get_module(gm, n.target)
            if isinstance(m, ACTIVATION_MODULES):
                return type(m)(**_act_kwargs(m))
        if n.op == "call_function" and n.target in _FUNC_ACT:
            return _FUNC_ACT[n.target]()
        if n.op == "call_function" and n.target in (F.hardtanh,) :
            return nn.ReLU6()
        return None

    cur = node
    for _ in range(2):  # the op after the target, or after its BN
        users = list(cur.users)
        if len(users) != 1:
            break
        cur = users[0]
        act = as_act(cur)
        if act is not None:
            return act
    prev = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    for _ in range(2):
        if prev is None:
            break
        act = as_act(prev)
        if act is not None:
            return act
        prev = prev.args[0] if prev.args and isinstance(prev.args[0], fx.Node) else None
    return nn.ReLU()


def _act_kwargs(m: nn.Module) -> dict:
    if isinstance(m, nn.LeakyReLU):
        return {"negative_slope": m.negative_slope}
    if isinstance(m, nn.GELU):
        return {"approximate": m.approximate}
    if isinstance(m, nn.ELU):
        return {"alpha": m.alpha}
    if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
        return {"min_val": m.min_val, "max_val": m.max_val}
    return {}


def spread(n: int, m: int) -> list[int]:
    """``m`` evenly spaced indices out of ``n`` (first and last included when ``m`` ≥ 2)."""
    if not 1 <= m <= n:
        raise ValueError(f"cannot pick {m} of {n}")
    if m == 1:
        return [0]
    return [math.floor(i * (n - 1) / (m - 1) + 0.5) for i in range(m)]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def residual_branch_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes inside a residual (or any merging) branch: those that reach exactly one of the two
    operands of an add joining two tensors (``x + f(x)``: every node of ``f``). A node before the
    fork reaches both operands; a node after the join reaches neither. ExpandNets expands only the
    *non-residual* 3x3 convs of MobileNetV2 (Sec. 4.2)."""
    inside: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if not is_add(node):
            continue
        a, b = (_ancestors(x) | {x} for x in node.args[:2])
        inside |= a ^ b
    return {n for n in inside if n.op not in ("placeholder", "get_attr")}


def output_layers(gm: fx.GraphModule) -> set[str]:
    """Qualified names of the conv / linear modules that produce the model's output with no other
    conv or linear after them (a classifier's logit layer). ExpandNets expands the *hidden* FC layers."""
    out: set[str] = set()
    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, ExpandedRegion)
    seen: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a.op == "call_module" and isinstance(get_module(gm, a.target), layer_types):
                out.add(a.target)
            else:
                stack.append(a)
    return out
