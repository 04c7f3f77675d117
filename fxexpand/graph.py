"""Graph helpers shared by passes: recognising ops in both forms, replacing nodes, shapes, cost.

Everything here is rewrite-agnostic. Passes use :func:`linear_op_of` to read a conv / linear op
(``call_module`` ``nn.ConvNd`` / ``nn.Linear`` or ``call_function`` ``F.convNd`` / ``F.linear``
with constant weights) into a :class:`LinearOp`, do their algebra on it, and install the result
with :func:`replace_nodes_with_module`.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .provenance import region_of

__all__ = [
    "LinearOp",
    "linear_op_of",
    "bn_of",
    "BNParams",
    "get_module",
    "set_module",
    "fresh_name",
    "has_module",
    "module_call_count",
    "node_input",
    "out_shape",
    "module_call_counts",
    "attr_use_counts",
    "is_add",
    "replace_nodes_with_module",
    "erase_if_dead",
    "in_scope",
    "node_label",
]

CONV_MODULES: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONV_FUNCS: dict[Any, int] = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
}
LINEAR_FUNCS = {F.linear, torch.nn.functional.linear}
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BN_FUNCS = {F.batch_norm, torch.batch_norm}
ADD_FUNCS = {operator.add, operator.iadd, torch.add}
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _arg(node: fx.Node, idx: int, name: str, default: Any = None) -> Any:
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(name, default)


def _tup(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    if len(v) == 1 and n > 1:
        return v * n
    return v


def get_module(gm: nn.Module, qualname: str) -> nn.Module:
    mod = gm
    for part in qualname.split(".") if qualname else []:
        mod = getattr(mod, part)
    return mod


def _get_attr(gm: nn.Module, qualname: str) -> Any:
    *parent, last = qualname.split(".")
    return getattr(get_module(gm, ".".join(parent)), last)


def set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    """Install ``module`` at ``qualname``, creating empty parents as needed."""
    *parent, last = qualname.split(".")
    mod = gm
    for part in parent:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    setattr(mod, last, module)


def fresh_name(gm: nn.Module, base: str) -> str:
    """A qualified name not used yet in ``gm`` (``base``, ``base_1``, ...)."""
    base = base.replace(".", "_") if base else "fused"
    name, i = base, 0
    # ``name`` has no dots, so it can only clash with a direct attribute of ``gm`` (a child module,
    # parameter, buffer or plain attribute): hasattr is the whole check, O(1) instead of a walk over
    # every submodule (which made a rewrite per node quadratic in the graph size)
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def has_module(gm: nn.Module, qualname: str) -> bool:
    """Whether ``qualname`` names a submodule of ``gm`` (``""`` is ``gm`` itself); O(depth)."""
    mod = gm
    for part in qualname.split(".") if qualname else []:
        mod = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if mod is None:
            return False
    return True


def module_call_count(gm: fx.GraphModule, target: str) -> int:
    """How many call_module nodes call ``target`` (indexed lookup where torch.fx has one)."""
    find = getattr(gm.graph, "find_nodes", None)
    if find is not None:
        return len(find(op="call_module", target=target))
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def node_input(node: fx.Node) -> fx.Node | None:
    a = node.args[0] if node.args else node.kwargs.get("input")
    return a if isinstance(a, fx.Node) else None


def out_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(shape) if shape is not None else None


def node_label(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    return node.name


def module_call_counts(gm: fx.GraphModule) -> Counter:
    """How many call_module nodes call each submodule (rule 7: shared modules are not rewritten)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def attr_use_counts(gm: fx.GraphModule) -> Counter:
    """How many get_attr nodes (and their users) read each attribute."""
    c: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            c[n.target] += max(1, len(n.users))
    return c


def is_add(node: fx.Node) -> bool:
    """``a + b`` in any traced form with both operands nodes and no ``alpha``."""
    if node.op == "call_function" and node.target in ADD_FUNCS:
        pass
    elif node.op == "call_method" and node.target in ("add", "add_"):
        pass
    else:
        return False
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    alpha = node.kwargs.get("alpha", 1)
    return alpha == 1 and set(node.kwargs) <= {"alpha"}


def in_scope(gm: fx.GraphModule, nodes: Iterable[fx.Node], scope: str) -> tuple[bool, str | None]:
    """Whether a group of nodes may be rewritten under ``scope`` ("all" or "expanded").

    Returns ``(ok, region)``: for "expanded" every node must lie in the same expanded region.
    """
    nodes = list(nodes)
    regions = {region_of(gm, n) for n in nodes}
    region = next(iter(regions)) if len(regions) == 1 else None
    if scope == "all":
        return True, region
    return (len(regions) == 1 and region is not None), region


@dataclass
class LinearOp:
    """A conv or linear op with constant parameters, in a form the algebra can work on.

    For ``kind == "conv"`` the weight is ``[C_out, C_in / groups, *kernel]`` and ``padding`` is
    symmetric per spatial dim (asymmetric "same" padding is not representable and is refused).
    """

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2 if self.kind == "conv" else 0

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * (self.groups if self.kind == "conv" else 1)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def macs(self, output_shape: tuple[int, ...] | None) -> int | None:
        """Multiply-accumulates for one call producing ``output_shape``."""
        if output_shape is None:
            return None
        n = math.prod(output_shape)
        if self.kind == "conv":
            return n * self.weight.shape[1] * math.prod(self.kernel)
        return n * self.weight.shape[1]

    def to_module(self) -> nn.Module:
        """A fresh ``nn.ConvNd`` / ``nn.Linear`` holding these parameters."""
        w = self.weight.detach()
        b = None if self.bias is None else self.bias.detach()
        with torch.no_grad():
            if self.kind == "linear":
                m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            else:
                m = CONV_TYPES[self.nd](
                    self.in_channels, self.out_channels, self.kernel, stride=self.stride,
                    padding=self.padding, dilation=self.dilation, groups=self.groups,
                    bias=b is not None, device=w.device, dtype=w.dtype,
                )
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m


def _norm_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    nd = len(kernel)
    if padding == "valid":
        return (0,) * nd
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return tuple(out)
    return _tup(padding, nd)


def linear_op_of(gm: fx.GraphModule, node: fx.Node) -> tuple[LinearOp | None, str]:
    """Read ``node`` as a :class:`LinearOp`; on failure return ``(None, reason)``.

    A reason is returned only for nodes that *are* convs/linears but cannot be handled
    (an empty reason means "not a linear op at all").
    """
    if node.op == "call_module":
        mod = get_module(gm, node.target)
        if type(mod) in CONV_MODULES:
            nd = CONV_MODULES[type(mod)]
            if mod.padding_mode != "zeros":
                return None, f"padding_mode={mod.padding_mode!r} (only zero padding composes)"
            pad = _norm_padding(mod.padding, tuple(mod.kernel_size), tuple(mod.dilation))
            if pad is None:
                return None, "asymmetric 'same' padding (even kernel)"
            return LinearOp("conv", mod.weight, mod.bias, _tup(mod.stride, nd), pad,
                            _tup(mod.dilation, nd), mod.groups), ""
        if type(mod) is nn.Linear:
            return LinearOp("linear", mod.weight, mod.bias), ""
        return None, ""
    if node.op != "call_function":
        return None, ""
    if node.target in CONV_FUNCS:
        nd = CONV_FUNCS[node.target]
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        params = [_arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1),
                  _arg(node, 6, "groups", 1)]
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or not (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
            return None, "weight/bias are not constant attributes"
        if any(isinstance(p, fx.Node) for p in params):
            return None, "stride/padding/dilation/groups are not constants"
        weight = _get_attr(gm, w.target)
        bias = None if b is None else _get_attr(gm, b.target)
        stride, dilation = _tup(params[0], nd), _tup(params[2], nd)
        pad = _norm_padding(params[1], tuple(weight.shape[2:]), dilation)
        if pad is None:
            return None, "asymmetric 'same' padding (even kernel)"
        return LinearOp("conv", weight, bias, stride, pad, dilation, int(params[3])), ""
    if node.target in LINEAR_FUNCS:
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or not (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
            return None, "weight/bias are not constant attributes"
        return LinearOp("linear", _get_attr(gm, w.target), None if b is None else _get_attr(gm, b.target)), ""
    return None, ""


def linear_param_names(node: fx.Node) -> tuple[str, ...]:
    """The attribute names a functional linear op reads (to detect shared parameters)."""
    if node.op != "call_function":
        return ()
    out = []
    for idx, name in ((1, "weight"), (2, "bias")):
        a = _arg(node, idx, name)
        if isinstance(a, fx.Node) and a.op == "get_attr":
            out.append(a.target)
    return tuple(out)


@dataclass
class BNParams:
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def bn_of(gm: fx.GraphModule, node: fx.Node) -> tuple[BNParams | None, str]:
    """Read an inference-mode batch norm (module or ``F.batch_norm``); ``(None, reason)`` otherwise."""
    if node.op == "call_module":
        mod = get_module(gm, node.target)
        if not isinstance(mod, BN_MODULES):
            return None, ""
        if mod.training:
            return None, "batch norm is in training mode (call .eval() first)"
        if not mod.track_running_stats or mod.running_mean is None:
            return None, "batch norm has no running statistics (track_running_stats=False)"
        return BNParams(mod.running_mean, mod.running_var, mod.weight, mod.bias, float(mod.eps)), ""
    if node.op == "call_function" and node.target in BN_FUNCS:
        if node.target is torch.batch_norm:
            names = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"]
        else:
            names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        vals = {n: _arg(node, i, n, defaults.get(n)) for i, n in enumerate(names)}
        if vals["training"] is not False:
            return None, "F.batch_norm is called with training=True (or a non-constant flag)"
        if not isinstance(vals["eps"], (int, float)):
            return None, "eps is not a constant"
        tensors = {}
        for k in ("running_mean", "running_var", "weight", "bias"):
            v = vals[k]
            if v is None:
                if k.startswith("running"):
                    return None, "batch norm has no running statistics"
                tensors[k] = None
            elif isinstance(v, fx.Node) and v.op == "get_attr":
                tensors[k] = _get_attr(gm, v.target)
            else:
                return None, f"{k} is not a constant attribute"
        return BNParams(tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"],
                        float(vals["eps"])), ""
    return None, ""


def erase_if_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes (last first) if nothing uses them, then any get_attr left unused."""
    for n in reversed(list(nodes)):
        if n.graph is gm.graph and not n.users:
            inputs = [a for a in n.all_input_nodes if a.op == "get_attr"]
            gm.graph.erase_node(n)
            for a in inputs:
                if not a.users:
                    gm.graph.erase_node(a)


def replace_nodes_with_module(
    gm: fx.GraphModule,
    chain: list[fx.Node],
    module: nn.Module,
    input_node: fx.Node,
    name: str,
    call_counts: Counter | None = None,
) -> fx.Node:
    """Replace ``chain`` (its last node's output) by ``module(input_node)`` installed at ``name``.

    If ``name`` already holds a module called only from ``chain``, it is replaced; otherwise a fresh
    name is chosen. Returns the new node (which inherits the last node's meta).

    ``call_counts``: a live :func:`module_call_counts` of ``gm`` that the caller keeps for a whole
    pass; it is read instead of scanning the graph and updated for this rewrite, so a pass making a
    rewrite per node stays linear in the graph size. Without it the graph is scanned (O(graph)).
    """
    chain_targets = Counter(n.target for n in chain if n.op == "call_module")
    exists = has_module(gm, name)  # a path walk, not a walk over every submodule
    calls_now = call_counts.get(name, 0) if call_counts is not None else (module_call_count(gm, name) if exists else 0)
    if exists and calls_now > chain_targets.get(name, 0):
        name = fresh_name(gm, name)
    elif not exists and hasattr(gm, name):
        name = fresh_name(gm, name)
    set_module(gm, name, module)
    last = chain[-1]
    with gm.graph.inserting_before(last):
        new = gm.graph.call_module(name, (input_node,))
    new.meta = dict(last.meta)
    first_stack = chain[0].meta.get("nn_module_stack")
    if first_stack is not None and "nn_module_stack" not in new.meta:
        new.meta["nn_module_stack"] = first_stack
    last.replace_all_uses_with(new)
    erase_if_dead(gm, chain)
    if call_counts is not None:
        for n in chain:
            if n.op == "call_module" and getattr(n, "_erased", n.graph is not gm.graph):
                call_counts[n.target] -= 1
        call_counts[name] += 1
    return new
