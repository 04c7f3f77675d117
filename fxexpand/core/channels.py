"""Channel groups: which channel dimensions of a traced CNN must change width together.

Every tensor in the graph gets a *layout*: the channel spaces that make up its dimension 1, in
order (one space for a conv's output, several after ``torch.cat``), and, after ``flatten``, the
number of features per channel. A space is created by each ``nn.Conv*`` / ``nn.Linear`` output and
each graph input. Operations tie spaces together:

* elementwise ops, activations, pooling, BatchNorm and depthwise convolutions keep the layout;
* ``x + y``, ``x * y`` (residual adds, squeeze-excitation gates) make the operands' spaces equal;
* ``torch.cat(dim=1)`` concatenates layouts; ``flatten(1)`` makes a flat layout for a Linear.

The tied spaces form the connected components of a networkx graph: the *channel groups*. A group
is *frozen* (never resized) when it reaches a graph input or output, or any operation not listed
above (view/reshape, attention, LayerNorm/GroupNorm, a grouped non-depthwise conv, a layer called
in functional form, a module called from two places); the reason is recorded. Everything else can
be resized consistently: :func:`resize` rebuilds every conv / linear / BatchNorm touching a resized
group, keeping the first channels and adding new ones at the end.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .fx import get_module, module_call_counts, set_module

__all__ = ["ChannelAnalysis", "analyse", "resize", "orthogonal_rows"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_KEEP_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Mish, nn.ELU, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_KEEP_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.mish, F.elu, F.hardtanh, F.dropout, torch.dropout, operator.neg,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.clone,
}
_KEEP_METHODS = {"relu", "sigmoid", "tanh", "clone", "contiguous", "neg"}
_BINARY = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub,
           torch.div, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "mul", "sub", "div", "add_", "mul_"}
_RESIDUAL = {operator.add, operator.sub, torch.add, torch.sub, operator.iadd}
_RESIDUAL_METHODS = {"add", "sub", "add_"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


@dataclass
class Layout:
    """Channel dimension of a tensor: spaces in order; ``flat`` = features per channel after flatten."""

    spaces: tuple[str, ...]
    flat: int | None = None
    dim: int = 1  # 1: channels on dim 1 (NC..., N·C); -1: on the last dim of an N-D tensor (B, T, C)


@dataclass
class Layer:
    """A resizable layer: its module, the layout it reads and the space it writes."""

    name: str
    kind: str  # "conv" | "dw" | "linear" | "bn" | "ln"
    node: fx.Node
    inp: Layout | None
    out: str | None  # output space ("conv"/"linear"); for "dw"/"bn"/"ln" the output layout is ``inp``


@dataclass
class ChannelAnalysis:
    layers: list[Layer]
    space_size: dict[str, int]
    group_of: dict[str, str]            # space -> group id
    members: dict[str, list[str]]       # group id -> its spaces
    frozen: dict[str, str] = field(default_factory=dict)  # group id -> why it cannot be resized
    residual: set[str] = field(default_factory=set)  # groups tied by an elementwise add/sub of two tensors

    def group_size(self, gid: str) -> int:
        return self.space_size[self.members[gid][0]]

    def free_groups(self) -> list[str]:
        """Groups that can be resized: produced by a conv/linear and not frozen."""
        produced = {self.group_of[la.out] for la in self.layers if la.out is not None}
        return [g for g in self.members if g in produced and g not in self.frozen]


def _channels_of(node: fx.Node) -> int | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _ndim(node: Any) -> int | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(tm, "shape", None)
    return len(shape) if shape is not None else None


def analyse(gm: fx.GraphModule, depthwise: Iterable[str] | None = None, *, layer_norm: bool = False) -> ChannelAnalysis:
    """Find the channel groups of ``gm`` (needs ``tensor_meta`` on its nodes, from ShapeProp).

    ``depthwise``: names of the convs that are depthwise in the full model. A depthwise conv shrunk
    to one channel looks like an ordinary 1-to-1 conv, so a thinned model must be analysed with the
    full model's list (:class:`~fxexpand.GrowthPlan` records it).

    ``layer_norm``: accept ``nn.LayerNorm`` over the channel dimension when it is the last one (as in
    a transformer's ``(B, T, C)`` tokens) as a channel-wise layer of kind "ln". Its output is not a
    per-channel function, so :func:`resize` (function-preserving growth) refuses such groups; NetAug
    accepts them because its base slice is the original width."""
    import networkx as nx  # lazy: only width growth needs it (~0.1 s of `import fxexpand`)

    depthwise = set(depthwise or ())
    g = nx.Graph()
    size: dict[str, int] = {}
    layout: dict[fx.Node, Layout] = {}
    layers: list[Layer] = []
    frozen_spaces: dict[str, str] = {}
    residual_spaces: set[str] = set()
    calls = module_call_counts(gm)

    def space(name: str, n: int) -> str:
        g.add_node(name)
        size[name] = n
        return name

    def freeze(lay: Layout | None, why: str) -> None:
        if lay is not None:
            for s in lay.spaces:
                frozen_spaces.setdefault(s, why)

    def tie(a: Layout, b: Layout) -> bool:
        if a.flat != b.flat or a.dim != b.dim or len(a.spaces) != len(b.spaces):
            return False
        if any(size[x] != size[y] for x, y in zip(a.spaces, b.spaces)):
            return False
        for x, y in zip(a.spaces, b.spaces):
            g.add_edge(x, y)
        return True

    def tensor_inputs(node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in layout]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            c = _channels_of(node)
            if c is not None:
                s = space(f"input:{node.name}", c)
                layout[node] = Layout((s,))
                frozen_spaces[s] = f"graph input {node.name}"
            continue
        if node.op == "output":
            for a in tensor_inputs(node):
                freeze(layout[a], "reaches the model output")
            continue
        if node.op == "get_attr":
            continue
        ins = tensor_inputs(node)
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        lx = layout.get(x) if x is not None else None
        out: Layout | None = None
        if node.op == "call_module":
            mod = get_module(gm, node.target)
            shared = calls[node.target] > 1
            if isinstance(mod, _CONVS) and not shared and lx is None and mod.groups == 1 and len(ins) <= 1 \
                    and node.target not in depthwise:
                # input width fixed (not a tracked tensor); the output can still be resized
                s = space(f"{node.target}", mod.out_channels)
                layers.append(Layer(node.target, "conv", node, None, s))
                out = Layout((s,))
            elif isinstance(mod, _CONVS) and not shared and lx is not None and lx.flat is None and lx.dim == 1 \
                    and len(ins) == 1:
                if mod.groups == 1 and not (node.target in depthwise and mod.in_channels == mod.out_channels == 1):
                    s = space(f"{node.target}", mod.out_channels)
                    layers.append(Layer(node.target, "conv", node, lx, s))
                    out = Layout((s,))
                elif mod.groups == mod.in_channels == mod.out_channels:
                    layers.append(Layer(node.target, "dw", node, lx, None))
                    out = lx
                else:
                    freeze(lx, f"grouped convolution {node.target}")
                    out = Layout((space(f"{node.target}", mod.out_channels),))
                    frozen_spaces[out.spaces[0]] = f"grouped convolution {node.target}"
            elif isinstance(mod, nn.Linear) and not shared and lx is not None and len(ins) == 1 \
                    and (_ndim(x) == 2 or (lx.dim == -1 and (_ndim(x) or 0) > 2)):
                s = space(f"{node.target}", mod.out_features)
                layers.append(Layer(node.target, "linear", node, lx, s))
                out = Layout((s,), dim=_last_dim(node))
            elif isinstance(mod, nn.Linear) and not shared and lx is not None and len(ins) == 1 \
                    and lx.dim == 1 and (_ndim(x) or 0) > 2:
                # a Linear on the last dim of a tensor tracked on dim 1 (tokens): that dim stops being
                # tracked here (frozen); the Linear's input width is fixed, its output can be resized
                freeze(lx, f"Linear {node.target} acts on the last dim of a tensor tracked on dim 1")
                s = space(f"{node.target}", mod.out_features)
                layers.append(Layer(node.target, "linear", node, None, s))
                out = Layout((s,), dim=_last_dim(node))
            elif isinstance(mod, nn.Linear) and not shared and lx is None and len(ins) <= 1:
                # input width fixed (not a tracked tensor); the output can still be resized
                s = space(f"{node.target}", mod.out_features)
                layers.append(Layer(node.target, "linear", node, None, s))
                out = Layout((s,), dim=_last_dim(node))
            elif isinstance(mod, nn.LayerNorm) and layer_norm and not shared and lx is not None and len(ins) == 1 \
                    and (lx.dim == -1 or _ndim(x) == 2) and len(mod.normalized_shape) == 1:
                layers.append(Layer(node.target, "ln", node, lx, None))
                out = lx
            elif isinstance(mod, _BNS) and not shared and lx is not None and lx.flat is None and lx.dim == 1 \
                    and len(ins) == 1:
                layers.append(Layer(node.target, "bn", node, lx, None))
                out = lx
            elif isinstance(mod, _KEEP_MODULES) and lx is not None and len(ins) == 1:
                out = lx
            elif isinstance(mod, nn.Flatten) and lx is not None and lx.dim == 1 and mod.start_dim == 1 \
                    and mod.end_dim == -1:
                out = _flatten(x, lx)
            elif type(mod).__name__ == "StochasticDepth" and lx is not None:
                out = lx
            else:
                why = (f"module {node.target} is called from {calls[node.target]} places" if shared
                       else f"{type(mod).__name__} {node.target}")
                for a in ins:
                    freeze(layout[a], why)
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            is_binary = fn in _BINARY or (node.op == "call_method" and fn in _BINARY_METHODS)
            if (fn in _KEEP_FUNCTIONS or (node.op == "call_method" and fn in _KEEP_METHODS)) and lx is not None \
                    and len(ins) == 1:
                out = lx
            elif is_binary and len(node.args) >= 2:
                a, b = node.args[0], node.args[1]
                la = layout.get(a) if isinstance(a, fx.Node) else None
                lb = layout.get(b) if isinstance(b, fx.Node) else None
                if la is not None and lb is not None and _ndim(a) == _ndim(b) and tie(la, lb):
                    out = la
                    if fn in _RESIDUAL or (node.op == "call_method" and fn in _RESIDUAL_METHODS):
                        residual_spaces.update(la.spaces)
                elif la is not None and not isinstance(b, fx.Node):
                    out = la
                elif lb is not None and not isinstance(a, fx.Node) and fn in (operator.add, operator.mul):
                    out = lb
                else:
                    for n in ins:
                        freeze(layout[n], f"{node.name} ({getattr(fn, '__name__', fn)}) mixes channel layouts")
            elif fn in (torch.cat, torch.concat) and _cat_dim(node) == 1:
                parts = node.args[0] if node.args else node.kwargs.get("tensors")
                lays = [layout.get(p) if isinstance(p, fx.Node) else None for p in parts]
                if lays and all(la is not None and la.flat is None and la.dim == 1 for la in lays):
                    out = Layout(tuple(s for la in lays for s in la.spaces))
                else:
                    for n in ins:
                        freeze(layout[n], f"{node.name} concatenates untracked tensors")
            elif fn in _REDUCE_FUNCTIONS or (node.op == "call_method" and fn in _REDUCE_METHODS):
                if lx is not None and lx.flat is None and lx.dim == 1 and len(ins) == 1 and _reduces_only_spatial(node):
                    out = lx
                else:
                    for n in ins:
                        freeze(layout[n], f"{node.name} ({getattr(fn, '__name__', fn)}) reduces over channels")
            elif _is_flatten(node) and lx is not None and lx.dim == 1:
                out = _flatten(x, lx)
            elif node.op == "call_method" and fn in ("size", "dim") or fn in (getattr, len) \
                    or (node.op == "call_method" and fn == "__getattribute__"):
                out = None  # shape queries do not depend on channel values
            else:
                name = getattr(fn, "__name__", str(fn))
                for n in ins:
                    freeze(layout[n], f"{node.name} ({name}) is not understood channel-wise")
        if out is not None:
            layout[node] = out

    group_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    order = {s: i for i, s in enumerate(size)}
    for comp in nx.connected_components(g):
        spaces = sorted(comp, key=order.__getitem__)
        gid = spaces[0]
        members[gid] = spaces
        for s in spaces:
            group_of[s] = gid
    frozen: dict[str, str] = {}
    for s, why in frozen_spaces.items():
        frozen.setdefault(group_of[s], why)
    return ChannelAnalysis(layers, size, group_of, members, frozen, {group_of[s] for s in residual_spaces})


def _last_dim(node: fx.Node) -> int:
    """Layout dim of a Linear's output: 1 for (N, C), -1 for (N, ..., C)."""
    nd = _ndim(node)
    return -1 if nd is not None and nd > 2 else 1


def _reduces_only_spatial(node: fx.Node) -> bool:
    """``x.mean((2, 3), keepdim=...)`` and the like: reduces dims ≥ 2 only (channels survive)."""
    nd = _ndim(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if nd is None or dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
    if not dims or not all(isinstance(d, int) for d in dims):
        return False
    return all((d + nd if d < 0 else d) >= 2 for d in dims)


def _cat_dim(node: fx.Node) -> int | None:
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    nd = _ndim(node)
    if isinstance(d, int) and nd is not None and d < 0:
        d += nd
    return d if isinstance(d, int) else None


def _is_flatten(node: fx.Node) -> bool:
    if node.target in (torch.flatten,) or (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _flatten(x: fx.Node, lx: Layout) -> Layout | None:
    tm = x.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    if shape is None or lx.flat is not None:
        return None
    return Layout(lx.spaces, flat=int(math.prod(shape[2:])))


# ----------------------------------------------------------------------------------- resizing


def _index_map(lay: Layout, old: dict[str, int], new: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions (old, new) of the channels kept in both widths, and the new total width."""
    per = lay.flat or 1
    o_idx, n_idx = [], []
    o_off = n_off = 0
    for s in lay.spaces:
        k = min(old[s], new[s])
        base = torch.arange(k * per)
        o_idx.append(o_off * per + base)
        n_idx.append(n_off * per + base)
        o_off += old[s]
        n_off += new[s]
    return torch.cat(o_idx), torch.cat(n_idx), n_off * per


def _row_basis(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the row space of ``m`` (float64), from the eigen-decomposition of
    its Gram matrix: matrix products instead of a QR of the tall transpose, which is much slower."""
    if m.shape[0] == 0 or m.abs().max() == 0:
        return m.new_zeros(0, m.shape[1])
    for _ in range(2):  # the second round removes the error of the first (eps times the condition number^2)
        lam, u = torch.linalg.eigh(m @ m.T)
        keep = lam > lam.max() * max(m.shape) * 1e3 * torch.finfo(m.dtype).eps
        m = (u[:, keep].T @ m) / lam[keep].sqrt().unsqueeze(1)
    return m


def orthogonal_rows(existing: torch.Tensor, count: int, scale: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """``count`` new rows orthogonal to every row of ``existing`` ([n, d]) and to each other, each of
    norm ``scale``: random directions with the row space of ``existing`` projected out, then
    orthonormalised (in float64). Where the null space has fewer than ``count`` dimensions the
    remaining rows are random. Returns the rows and how many are random."""
    d = existing.shape[1]
    basis = _row_basis(existing.detach().double())
    k = max(0, min(count, d - basis.shape[0]))
    rows = []
    if k > 0:
        g = torch.randn(k, d, generator=generator, dtype=torch.float64)
        for _ in range(2):                             # project twice: orthogonal to working precision
            g = g - (g @ basis.T) @ basis
        q = _row_basis(g)                              # orthonormal, still in the null space
        k = q.shape[0]
        rows.append(q * scale)
    if count > k:
        rest = torch.randn(count - k, d, generator=generator, dtype=torch.float64)
        rows.append(rest / rest.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale)
    return (torch.cat(rows) if rows else torch.zeros(0, d, dtype=torch.float64)), count - k


def _row_scale(w: torch.Tensor) -> float:
    if w.shape[0] == 0:
        return 1.0
    norms = w.detach().double().flatten(1).norm(dim=1)
    s = float(norms.mean())
    return s if s > 0 else 1.0


def resize(gm: fx.GraphModule, an: ChannelAnalysis, new_group_size: dict[str, int], *, init: str = "preserve",
           seed: int = 0) -> dict[str, dict]:
    """Resize channel groups in place: ``new_group_size`` maps group id -> new width.

    Shrinking keeps each group's first channels. Growing appends channels: each producing layer gets
    new filters orthogonal to its existing ones (:func:`orthogonal_rows`); the new *incoming*
    weights of the existing output channels are zero with ``init="preserve"`` (the model computes
    exactly the same function) or random with ``init="orthogonal"`` (the paper's choice). New
    BatchNorm channels start at weight 1, bias 0, mean 0, var 1. Returns, per resized layer, its kind
    and ``random_rows``: how many new filters had to be random because the null space was too small
    (a layer with fewer inputs·kernel entries than output filters)."""
    for gid in new_group_size:
        if gid in an.frozen:
            raise ValueError(f"channel group {gid} cannot be resized: {an.frozen[gid]}")
    for la in an.layers:
        if la.kind == "ln" and any(an.group_of[s] in new_group_size for s in la.inp.spaces):
            raise ValueError(f"channel group of LayerNorm {la.name} cannot be resized: a LayerNorm over more "
                             "channels is a different function (analyse with layer_norm=False)")
    old = dict(an.space_size)
    new = {s: new_group_size.get(an.group_of[s], old[s]) for s in old}
    gen = torch.Generator().manual_seed(seed)
    changed: dict[str, dict] = {}
    for la in an.layers:
        mod = get_module(gm, la.name)
        out_space = la.out
        in_changes = la.inp is not None and any(new[s] != old[s] for s in la.inp.spaces)
        out_changes = out_space is not None and new[out_space] != old[out_space]
        if la.kind in ("dw", "bn"):
            out_changes = in_changes
        if not (in_changes or out_changes):
            continue
        random_rows = 0
        if la.kind == "bn":
            rep = _resize_bn(mod, la.inp, old, new)
        elif la.kind == "dw":
            rep = _resize_dw(mod, la.inp, old, new, gen)
        else:
            rep, random_rows = _resize_dense(mod, la, old, new, init, gen)
        set_module(gm, la.name, rep)
        changed[la.name] = {"kind": la.kind, "random_rows": random_rows}
    gm.recompile()
    return changed


def _new_like(t: torch.Tensor, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
    return torch.full(shape, fill, dtype=t.dtype, device=t.device)


def _resize_bn(mod: nn.Module, lay: Layout, old, new) -> nn.Module:
    o, n, c = _index_map(lay, old, new)
    rep = type(mod)(c, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                    track_running_stats=mod.track_running_stats)
    rep = rep.to(device=_device(mod), dtype=_dtype(mod))
    with torch.no_grad():
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            src = getattr(mod, name, None)
            if src is None:
                continue
            dst = _new_like(src, (c,), fill)
            dst[n] = src[o]
            getattr(rep, name).copy_(dst)
        if mod.track_running_stats and mod.num_batches_tracked is not None:
            rep.num_batches_tracked.copy_(mod.num_batches_tracked)
    rep.train(mod.training)
    return rep


def _conv_like(mod: nn.Module, cin: int, cout: int, groups: int) -> nn.Module:
    rep = type(mod)(cin, cout, mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                    groups=groups, bias=mod.bias is not None, padding_mode=mod.padding_mode)
    return rep.to(device=_device(mod), dtype=_dtype(mod))


def _resize_dw(mod: nn.Module, lay: Layout, old, new, gen) -> nn.Module:
    o, n, c = _index_map(lay, old, new)
    rep = _conv_like(mod, c, c, c)
    with torch.no_grad():
        w = torch.randn(rep.weight.shape, generator=gen, dtype=torch.float64)
        w = w / w.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1)) * _row_scale(mod.weight)
        w = w.to(mod.weight.dtype)
        w[n] = mod.weight[o]
        rep.weight.copy_(w)
        if mod.bias is not None:
            b = _new_like(mod.bias, (c,))
            b[n] = mod.bias[o]
            rep.bias.copy_(b)
    rep.train(mod.training)
    return rep


def _resize_dense(mod: nn.Module, la: Layer, old, new, init: str, gen) -> tuple[nn.Module, int]:
    """The conv/linear rebuilt for the new widths, and how many new filters are random (not
    orthogonal: the layer has fewer inputs x kernel entries than filters)."""
    n_random = 0
    is_conv = la.kind == "conv"
    w_old = mod.weight
    cin_old = w_old.shape[1]
    if la.inp is not None:
        i_o, i_n, cin = _index_map(la.inp, old, new)
    else:
        i_o = i_n = torch.arange(cin_old)
        cin = cin_old
    k_keep = min(old[la.out], new[la.out])
    cout = new[la.out]
    o_keep = torch.arange(k_keep)
    if is_conv:
        rep = _conv_like(mod, cin, cout, 1)
    else:
        rep = nn.Linear(cin, cout, bias=mod.bias is not None).to(device=_device(mod), dtype=_dtype(mod))
    kshape = tuple(w_old.shape[2:])
    w = torch.zeros((cout, cin) + kshape, dtype=torch.float64)
    with torch.no_grad():
        w[o_keep.unsqueeze(1), i_n.unsqueeze(0)] = w_old.double()[o_keep.unsqueeze(1), i_o.unsqueeze(0)]
        scale = _row_scale(w_old)
        if init == "orthogonal" and cin > cin_old:
            new_cols = torch.ones(cin, dtype=torch.bool)
            new_cols[i_n] = False
            fresh = torch.randn((k_keep, int(new_cols.sum())) + kshape, generator=gen, dtype=torch.float64)
            w[:k_keep, new_cols] = fresh * (scale / math.sqrt(max(1, cin_old * math.prod(kshape))))
        if cout > k_keep:
            rows, n_random = orthogonal_rows(w[:k_keep].flatten(1), cout - k_keep, scale, gen)
            w[k_keep:] = rows.view((cout - k_keep, cin) + kshape)
        rep.weight.copy_(w.to(w_old.dtype))
        if mod.bias is not None:
            b = _new_like(mod.bias, (cout,))
            b[:k_keep] = mod.bias[:k_keep]
            rep.bias.copy_(b)
    rep.train(mod.training)
    return rep, n_random


def _device(mod: nn.Module) -> torch.device:
    p = next(iter(mod.parameters()), None)
    if p is None:
        p = next(iter(mod.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(mod: nn.Module) -> torch.dtype:
    p = next(iter(mod.parameters()), None)
    if p is None:
        p = next((b for b in mod.buffers() if b.is_floating_point()), None)
    return p.dtype if p is not None else torch.get_default_dtype()
