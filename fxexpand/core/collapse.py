"""Online collapse: run a linear chain as one op whose weight is composed, differentiably, each forward.

A chain of convolutions (or of linear layers) with no non-linearity and nothing batch-dependent
between them computes ``conv(x, K)`` where K composes the factors — the composition
:mod:`fxexpand.core.algebra` performs (in float64, detached) to contract a model. Here the same
composition is written with differentiable torch ops in the parameters' dtype, so that training
through K gives every factor its exact gradient (the chain rule through the composition) at the
cost of one convolution over the feature map plus a weight-only composition (OREPA, CVPR 2022,
does this for its own blocks; this does it for any chain fxexpand built).

Composition (per spatial dim; conv1: k1, s1, p1, d1, groups g; conv2: k2, s2, padding 0, d2, g)::

    K[o, i, u] = Σ_m Σ_{a,b : D·u = d1·a + s1·d2·b} W2[o, m, b] · W1[m, i, a],   D = gcd(d1, s1·d2)

computed per pair of factors in one of three ways: when either kernel is pointwise (ExpandNets' CL
chains are 1x1 → k×k → 1x1) one batched matrix product per group, with no copy of the k×k factor;
otherwise, ungrouped, a full convolution of the two tap grids — ``conv_transpose`` with W1ᵀ as its
input, W2ᵀ as its kernel, stride d1/D and dilation s1·d2/D, one GEMM plus a scatter of the tap pairs
(the gradient is a convolution again); grouped (PyTorch runs a grouped transposed convolution group
by group on CPU, 10x slower for depthwise chains), two batched products per group: over the middle
channels m, then over the tap pairs (a, b) with a constant 0/1 map P[a, b, u] of the geometry
(cached). The result is one conv with stride s1·s2, padding p1, dilation D; bias ``b2 + Σ W2·b1``.
Linear layers: ``W = W2 W1``, ``b = W2 b1 + b2``.

Composition is associative, so the chain is composed in its cheapest order (matrix-chain dynamic
programming over the pairwise costs, cached per geometry): an ExpandNets FC chain m → 4m → 4n → n
with n < m composes right to left (SmallNet's 512 → 64: 1.0e8 instead of 2.8e8 multiply-accumulates),
a CL chain 1x1 → k×k → 1x1 its k×k factor with the first 1x1 first. The kernel is composed once per forward;
nothing is cached across steps (the factors change every step).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .modules import DecayActivation, Residual

__all__ = ["chain_problem", "runtime_problem", "compose_chain", "run_collapsed", "collapse_pays", "chain_costs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _chain(body: nn.Module) -> tuple[list[nn.Module], bool] | None:
    """(the chain's modules, whether an identity shortcut wraps it), or None if ``body`` is not a
    (possibly :class:`Residual`-wrapped) ``nn.Sequential``."""
    residual = type(body) is Residual
    if residual:
        body = body.body
    if not isinstance(body, nn.Sequential) or len(body) == 0:
        return None
    return list(body), residual


def _is_factor(m: nn.Module) -> bool:
    return type(m) in _CONVS or type(m) is nn.Linear


def _depthwise(m: nn.Module) -> bool:
    """A convolution with one input and one output channel per group (a per-channel filter)."""
    return type(m) in _CONVS and _is_dw(_layer_key(m))


def chain_problem(body: nn.Module) -> str:
    """Why ``body`` can never run collapsed ("" if it can, in the right state; see
    :func:`runtime_problem`). It must be an ``nn.Sequential`` — optionally inside an identity
    :class:`Residual` — of plain convolutions (one dimensionality, zero padding mode, padding on the
    first only, no string padding, one ``groups`` value except for depthwise layers) or of plain
    ``nn.Linear`` layers, with in between only what is linear and batch-independent in some state:
    BatchNorm with running statistics (in eval mode), :class:`DecayActivation` (at alpha = 1),
    ``nn.Identity`` and dropout (in eval mode)."""
    parsed = _chain(body)
    if parsed is None:
        return f"{type(body).__name__} is not a chain of layers"
    layers, residual = parsed
    allowed = (*_CONVS, nn.Linear, *_NORMS, *_DROPOUTS, nn.Identity, DecayActivation)
    others = sorted({type(m).__name__ for m in layers if type(m) not in allowed})
    if others:
        return f"the chain contains {', '.join(others)} (not linear and batch-independent)"
    if not _is_factor(layers[0]):
        return f"the chain starts with {type(layers[0]).__name__}, not a layer"
    if any(type(m) in _NORMS and not m.track_running_stats for m in layers):
        return "a BatchNorm without running statistics (batch statistics in every mode)"
    factors = [m for m in layers if _is_factor(m)]
    if not all(type(m) is type(factors[0]) for m in factors):
        return "the chain mixes layer types"
    if type(factors[0]) is not nn.Linear:
        groups = {m.groups for m in factors if not _depthwise(m)}
        if len(groups) > 1:
            return "the layers have different groups (other than depthwise ones)"
        for i, m in enumerate(factors):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                return f"layer {i} has padding {m.padding!r} / mode {m.padding_mode}"
            if i > 0 and any(p != 0 for p in m.padding):
                return f"layer {i} is padded (padding is exact only on the first layer)"
    if residual:
        return _shortcut_problem(factors)
    return ""


def runtime_problem(body: nn.Module, first: bool = False, assume_training: bool = False) -> str:
    """Why a structurally collapsible ``body`` (:func:`chain_problem` is "") must run its chain in
    its current state ("" if it need not): a BatchNorm in train mode (batch statistics), dropout in
    train mode, a :class:`DecayActivation` below alpha = 1 (not linear: NetBooster blocks during
    PLT). ``first``: stop at the first reason (the module flags before any alpha is read);
    ``assume_training``: as if every module were in train mode (what ``model.train()`` gives)."""
    layers = _chain(body)[0]
    reasons = []
    for m in layers:
        training = m.training or assume_training
        if type(m) in _NORMS and training:
            reasons.append(f"{type(m).__name__} in train mode (batch statistics)")
        elif type(m) in _DROPOUTS and training and m.p > 0:
            reasons.append(f"{type(m).__name__} in train mode")
        if first and reasons:
            return reasons[0]
    for m in layers:
        if type(m) is DecayActivation and not m.is_identity:
            reasons.append(f"DecayActivation at alpha {float(m.alpha):.3g} < 1 (not linear)")
            if first:
                return reasons[-1]
    return "; ".join(dict.fromkeys(reasons))


def _shortcut_problem(factors: list[nn.Module]) -> str:
    """An identity shortcut folds into the composed kernel when the chain maps C channels to C at
    stride 1 and the input pixel it adds lands on a tap of the composed kernel."""
    first, last = factors[0], factors[-1]
    if type(first) is nn.Linear:
        return "" if first.in_features == last.out_features else "the shortcut joins different widths"
    if first.in_channels != last.out_channels:
        return "the shortcut joins different widths"
    _, _, size, stride, dilation, _ = _plan(tuple(_layer_key(m) for m in factors))[2]
    pad = tuple(first.padding)
    if any(s != 1 for s in stride) or any(2 * p != d * (k - 1) or p % d for p, d, k in zip(pad, dilation, size)):
        return "the shortcut is not a tap of the composed kernel (stride, or padding off the kernel's centre)"
    return ""


@functools.lru_cache(maxsize=256)
def _tap_map(k1: tuple, k2: tuple, s1: tuple, d1: tuple, d2: tuple, D: tuple, size: tuple,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """P[a, b, u] = 1 where tap a of conv1 and tap b of conv2 land on tap u of the composed kernel
    (per dim: d1·a + s1·d2·b = D·u); a constant of the geometry (cached per dtype and device, so
    a forward does not convert it), not of the factors."""
    nd = len(k1)
    taps1 = list(itertools.product(*[range(k) for k in k1]))
    taps2 = list(itertools.product(*[range(k) for k in k2]))
    out = list(itertools.product(*[range(k) for k in size]))
    index = {u: n for n, u in enumerate(out)}
    p = torch.zeros(len(taps1), len(taps2), len(out), dtype=torch.float64)
    for ia, a in enumerate(taps1):
        for ib, b in enumerate(taps2):
            u = tuple((d1[k] * a[k] + s1[k] * d2[k] * b[k]) // D[k] for k in range(nd))
            p[ia, ib, index[u]] = 1.0
    return p.to(device=device, dtype=dtype)


def _pair_geometry(k1: tuple, s1: tuple, d1: tuple, k2: tuple, d2: tuple) -> tuple:
    """Geometry of conv2 ∘ conv1 (conv2 unpadded): the tap spacings (d1', d2') after giving a 1-tap
    kernel the dilation that keeps the composed grid coarsest, the composed dilation D and the
    composed kernel size, per dim."""
    nd = len(k1)
    d1 = tuple(s1[k] * d2[k] if k1[k] == 1 else d1[k] for k in range(nd))
    d2 = tuple(d1[k] // s1[k] if k2[k] == 1 and d1[k] % s1[k] == 0 else d2[k] for k in range(nd))
    D = tuple(math.gcd(d1[k], s1[k] * d2[k]) for k in range(nd))
    size = tuple((d1[k] * (k1[k] - 1) + s1[k] * d2[k] * (k2[k] - 1)) // D[k] + 1 for k in range(nd))
    return d1, d2, D, size


def _compose_conv(w1: torch.Tensor, b1, s1, p1, d1, g1: int, w2: torch.Tensor, b2, s2, d2, g2: int):
    nd = w1.dim() - 2
    k1, k2 = tuple(w1.shape[2:]), tuple(w2.shape[2:])
    d1, d2, D, size = _pair_geometry(k1, tuple(s1), tuple(d1), k2, tuple(d2))
    o, mg = w2.shape[0], w2.shape[1]
    ig = w1.shape[1]
    t1, t2 = math.prod(k1), math.prod(k2)
    dw1, dw2 = ig == 1 and g1 == w1.shape[0] > 1, mg == 1 and g2 == o > 1
    if dw1 or dw2:  # a per-channel filter on one side: K[o, i] = w2[o, ·] ⋆ w1[·, i], elementwise
        groups = g1 if dw2 else g2
        if dw2:  # K[o, i, ·] = w2[o, 0, ·] ⋆ w1[o, i, ·]
            left, right, cin = w1.reshape(o, ig, t1), w2.reshape(o, 1, t2), ig
        else:    # K[o, i, ·] = w2[o, i, ·] ⋆ w1[c(o, i), 0, ·], c(o, i) = group(o)·(C/g2) + i
            cin = w1.shape[0] // g2
            left = w1.reshape(g2, 1, cin, t1).expand(g2, o // g2, cin, t1).reshape(o, cin, t1)
            right = w2.reshape(o, cin, t2)
        if (t2 == 1 and k1 == size) or (t1 == 1 and k2 == size):  # one side's taps ride along
            K = left * right
        else:
            P = _tap_map(k1, k2, tuple(s1), d1, d2, D, size, w1.dtype, w1.device)
            K = torch.matmul((left.unsqueeze(-1) * right.unsqueeze(-2)).reshape(o, cin, t1 * t2), P.reshape(t1 * t2, -1))
        weight = K.reshape(o, cin, *size)
    else:
        groups = g1
        if t2 == 1 and k1 == size:  # pointwise second: W2 @ W1 per group (the taps ride along)
            K = torch.matmul(w2.reshape(groups, o // groups, mg), w1.reshape(groups, mg, ig * t1))
        elif t1 == 1 and k2 == size:  # pointwise first: W1ᵀ applied to every (output, tap) of W2, no copy of W2
            K = torch.matmul(w1.reshape(groups, 1, mg, ig).transpose(-1, -2), w2.reshape(groups, o // groups, mg, t2))
        elif groups == 1:  # a full convolution of the tap grids: conv_transpose(W1ᵀ as input, W2ᵀ as kernel)
            stride = tuple(d1[k] // D[k] for k in range(nd))
            dilation = tuple(s1[k] * d2[k] // D[k] for k in range(nd))
            K = _CONV_T_FN[nd](w1.transpose(0, 1), w2.transpose(0, 1), None, stride, 0, 0, 1, dilation).transpose(0, 1)
        else:  # grouped: the conv_transpose above would run group by group on CPU; a batched product instead
            P = _tap_map(k1, k2, tuple(s1), d1, d2, D, size, w1.dtype, w1.device)
            Q = torch.einsum("gomb,gmia->goiab", w2.reshape(groups, o // groups, mg, t2), w1.reshape(groups, mg, ig, t1))
            K = torch.einsum("goiab,abu->goiu", Q, P)
        weight = K.reshape(o, ig, *size)
    bias = b2
    if b1 is not None:
        sums = w2.sum(dim=tuple(range(2, w2.dim())))  # [C_out, M/g2]
        contrib = torch.einsum("gom,gm->go", sums.reshape(g2, o // g2, mg), b1.reshape(g2, mg)).reshape(o)
        bias = contrib if bias is None else bias + contrib
    stride = tuple(s1[k] * s2[k] for k in range(nd))
    return weight, bias, stride, tuple(p1), D, groups


def _layer_key(m: nn.Module) -> tuple:
    """(out, in, kernel, stride, dilation, groups); the geometry entries are empty for Linear."""
    if type(m) is nn.Linear:
        return (m.out_features, m.in_features, (), (), (), 1)
    return (m.out_channels, m.in_channels, tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation), m.groups)


def _is_dw(key: tuple) -> bool:
    out, inn, _, _, _, g = key
    return g > 1 and g == inn == out


@functools.lru_cache(maxsize=1024)
def _plan(keys: tuple) -> tuple[Any, float, tuple]:
    """The cheapest order to compose a chain (matrix-chain dynamic programming over the pairwise
    composition costs), its multiply-accumulates and the composed layer's key (see ``_layer_key``).
    Returns a tree of factor indices — an int, or a pair (left, right) meaning right ∘ left.
    Composition is associative, so every order gives the same kernel; they differ in cost by the
    sizes of the intermediate products (an FC chain m → 4m → 4n → n with n < m composes right to
    left, a CL chain 1x1 → k×k → 1x1 its k×k factor with the first 1x1 first)."""
    n = len(keys)
    geo = {(i, i): keys[i] for i in range(n)}  # the composed key of every sub-chain i..j

    def pair(a: tuple, b: tuple) -> tuple[tuple, float]:
        o1, cin, k1, s1, d1, g1 = a
        o2, _, k2, s2, d2, g2 = b
        elementwise = _is_dw(a) or _is_dw(b)
        g = g1 if _is_dw(b) else g2 if _is_dw(a) else g1
        if not k1:  # Linear
            return (o2, cin, (), (), (), 1), float(o2 * o1 * cin)
        _, _, D, size = _pair_geometry(k1, s1, d1, k2, d2)
        taps = math.prod(k1) * math.prod(k2)
        cost = o2 * (cin // g) * taps if elementwise else o2 * (o1 // g) * (cin // g) * taps
        return (o2, cin, size, tuple(x * y for x, y in zip(s1, s2)), D, g), float(cost)

    for i in range(n):
        for j in range(i + 1, n):
            geo[(i, j)] = pair(geo[(i, j - 1)], keys[j])[0]
    best: dict[tuple[int, int], tuple[Any, float]] = {(i, i): (i, 0.0) for i in range(n)}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            options = []
            for k in range(i, j):
                (t1, c1), (t2, c2) = best[(i, k)], best[(k + 1, j)]
                options.append((c1 + c2 + pair(geo[(i, k)], geo[(k + 1, j)])[1], k, (t1, t2)))
            cost, _, tree = min(options, key=lambda t: (t[0], -t[1]))  # ties: compose left to right
            best[(i, j)] = (tree, cost)
    return (*best[(0, n - 1)], geo[(0, n - 1)])


class _Factor(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple | None  # None for Linear
    padding: tuple | None
    dilation: tuple | None
    groups: int


def _factors(layers: list[nn.Module]) -> list[_Factor]:
    """The chain's layers with every (eval-mode) BatchNorm folded into the layer before it —
    differentiably in its affine parameters — and identities (nn.Identity, DecayActivation at
    alpha = 1, dropout in eval mode) dropped."""
    out: list[_Factor] = []
    for m in layers:
        if type(m) is nn.Linear:
            out.append(_Factor(m.weight, m.bias, None, None, None, 1))
        elif type(m) in _CONVS:
            out.append(_Factor(m.weight, m.bias, tuple(m.stride), tuple(m.padding), tuple(m.dilation), m.groups))
        elif type(m) in _NORMS:
            f = out[-1]
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.weight is not None:
                scale = m.weight * scale
            shift = -m.running_mean * scale
            if m.bias is not None:
                shift = shift + m.bias
            weight = f.weight * scale.reshape(-1, *[1] * (f.weight.dim() - 1))
            bias = shift if f.bias is None else f.bias * scale + shift
            out[-1] = f._replace(weight=weight, bias=bias)
    return out


def _compose_tree(factors: list[_Factor], tree) -> _Factor:
    if isinstance(tree, int):
        return factors[tree]
    a, b = _compose_tree(factors, tree[0]), _compose_tree(factors, tree[1])
    if a.stride is None:  # Linear: W2 W1, W2 b1 + b2
        bias = b.bias if a.bias is None else (b.weight @ a.bias if b.bias is None else torch.addmv(b.bias, b.weight, a.bias))
        return _Factor(b.weight @ a.weight, bias, None, None, None, 1)
    return _Factor(*_compose_conv(a.weight, a.bias, a.stride, a.padding, a.dilation, a.groups,
                                  b.weight, b.bias, b.stride, b.dilation, b.groups))


def _with_shortcut(f: _Factor) -> torch.Tensor:
    """The composed weight plus the identity (the shortcut's input pixel is the tap padding / dilation)."""
    w = f.weight
    if f.stride is None:
        return w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    o, cin = w.shape[:2]
    eye = torch.zeros_like(w)
    centre = tuple(p // d for p, d in zip(f.padding, f.dilation))
    idx = torch.arange(o, device=w.device)
    eye[(idx, idx % cin, *centre)] = 1
    return w + eye


def compose_chain(body: nn.Module, order=None) -> dict[str, Any]:
    """The chain's single op, composed differentiably: ``{"kind": "conv"|"linear", "weight",
    "bias", and for convs "stride", "padding", "dilation", "groups"}``. ``order``: a composition
    tree over the chain's layers (see ``_plan``); by default the cheapest."""
    layers, residual = _chain(body)
    modules = [m for m in layers if _is_factor(m)]
    tree = _plan(tuple(_layer_key(m) for m in modules))[0] if order is None else order
    f = _compose_tree(_factors(layers), tree)
    weight = _with_shortcut(f) if residual else f.weight
    if f.stride is None:
        return {"kind": "linear", "weight": weight, "bias": f.bias}
    return {"kind": "conv", "weight": weight, "bias": f.bias, "stride": f.stride, "padding": f.padding,
            "dilation": f.dilation, "groups": f.groups}


def run_collapsed(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``body(x)`` computed as one op with the composed weight (composed once, in this call)."""
    op = compose_chain(body)
    if op["kind"] == "linear":
        return F.linear(x, op["weight"], op["bias"])
    nd = op["weight"].dim() - 2
    return _CONV_FN[nd](x, op["weight"], op["bias"], op["stride"], op["padding"], op["dilation"], op["groups"])


def chain_costs(body: nn.Module, shape: tuple[int, ...]) -> tuple[float, float]:
    """Multiply-accumulates of one forward of ``body``'s layers on an input of ``shape``: (explicit
    chain, collapsed = composition in the cheapest order + one op). The backward costs about twice
    the forward in both forms."""
    layers = [m for m in _chain(body)[0] if _is_factor(m)]
    _, comp, (out, _, size, _, _, g) = _plan(tuple(_layer_key(m) for m in layers))
    if type(layers[0]) is nn.Linear:
        rows = math.prod(shape[:-1])
        explicit = sum(rows * m.in_features * m.out_features for m in layers)
        return float(explicit), float(comp + rows * layers[0].in_features * out)
    batch, spatial = shape[0], list(shape[2:])
    explicit = 0.0
    for i, m in enumerate(layers):
        pad = m.padding if i == 0 else (0,) * len(spatial)
        spatial = [(spatial[k] + 2 * pad[k] - m.dilation[k] * (m.kernel_size[k] - 1) - 1) // m.stride[k] + 1
                   for k in range(len(spatial))]
        explicit += batch * math.prod(spatial) * m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return explicit, comp + batch * math.prod(spatial) * out * (layers[0].in_channels // g) * math.prod(size)


def collapse_pays(body: nn.Sequential, shape: tuple[int, ...]) -> bool:
    """Whether the collapsed form costs fewer multiply-accumulates than the chain on this input
    (a deep layer with a small feature map and many channels can be cheaper to run explicitly)."""
    explicit, collapsed = chain_costs(body, tuple(shape))
    return collapsed < explicit
