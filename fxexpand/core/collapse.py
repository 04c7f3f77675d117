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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["chain_problem", "compose_chain", "run_collapsed", "collapse_pays", "chain_costs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def chain_problem(body: nn.Module) -> str:
    """Why ``body`` cannot run collapsed ("" if it can): it must be an ``nn.Sequential`` of plain
    convolutions (same dimensionality and groups, zero padding mode, padding on the first only,
    no string padding) or of plain ``nn.Linear`` layers — nothing else (no BatchNorm, activation or
    dropout)."""
    if not isinstance(body, nn.Sequential) or len(body) == 0:
        return f"{type(body).__name__} is not a chain of layers"
    layers = list(body)
    others = sorted({type(m).__name__ for m in layers if type(m) not in (*_CONVS, nn.Linear)})
    if others:
        return f"the chain contains {', '.join(others)} (not linear and batch-independent)"
    if all(type(m) is nn.Linear for m in layers):
        return ""
    if not all(type(m) is type(layers[0]) for m in layers):
        return "the chain mixes layer types"
    for i, m in enumerate(layers):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return f"layer {i} has padding {m.padding!r} / mode {m.padding_mode}"
        if i > 0 and any(p != 0 for p in m.padding):
            return f"layer {i} is padded (padding is exact only on the first layer)"
        if m.groups != layers[0].groups:
            return "the layers have different groups"
    return ""


@functools.lru_cache(maxsize=256)
def _tap_map(k1: tuple, k2: tuple, s1: tuple, d1: tuple, d2: tuple, D: tuple, size: tuple) -> torch.Tensor:
    """P[a, b, u] = 1 where tap a of conv1 and tap b of conv2 land on tap u of the composed kernel
    (per dim: d1·a + s1·d2·b = D·u); a constant of the geometry (cached), not of the factors."""
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
    return p


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


def _compose_conv(w1: torch.Tensor, b1, s1, p1, d1, w2: torch.Tensor, b2, s2, d2, groups: int):
    nd = w1.dim() - 2
    k1, k2 = tuple(w1.shape[2:]), tuple(w2.shape[2:])
    d1, d2, D, size = _pair_geometry(k1, tuple(s1), tuple(d1), k2, tuple(d2))
    o, mg = w2.shape[0], w2.shape[1]
    ig = w1.shape[1]
    t1, t2 = math.prod(k1), math.prod(k2)
    if t2 == 1 and k1 == size:  # pointwise second: W2 @ W1 per group (the taps ride along)
        K = torch.matmul(w2.reshape(groups, o // groups, mg), w1.reshape(groups, mg, ig * t1))
    elif t1 == 1 and k2 == size:  # pointwise first: W1ᵀ applied to every (output, tap) of W2, no copy of W2
        K = torch.matmul(w1.reshape(groups, 1, mg, ig).transpose(-1, -2), w2.reshape(groups, o // groups, mg, t2))
    elif groups == 1:  # a full convolution of the tap grids: conv_transpose(W1ᵀ as input, W2ᵀ as kernel)
        stride = tuple(d1[k] // D[k] for k in range(nd))
        dilation = tuple(s1[k] * d2[k] // D[k] for k in range(nd))
        K = _CONV_T_FN[nd](w1.transpose(0, 1), w2.transpose(0, 1), None, stride, 0, 0, 1, dilation).transpose(0, 1)
    else:  # grouped: the conv_transpose above would run group by group on CPU; a batched product instead
        P = _tap_map(k1, k2, tuple(s1), d1, d2, D, size).to(device=w1.device, dtype=w1.dtype)
        Q = torch.einsum("gomb,gmia->goiab", w2.reshape(groups, o // groups, mg, t2), w1.reshape(groups, mg, ig, t1))
        K = torch.einsum("goiab,abu->goiu", Q, P)
    weight = K.reshape(o, ig, *size)
    bias = b2
    if b1 is not None:
        sums = w2.sum(dim=tuple(range(2, w2.dim())))  # [C_out, M/g]
        contrib = torch.einsum("gom,gm->go", sums.reshape(groups, o // groups, mg), b1.reshape(groups, mg))
        contrib = contrib.reshape(o)
        bias = contrib if bias is None else bias + contrib
    stride = tuple(s1[k] * s2[k] for k in range(nd))
    return weight, bias, stride, tuple(p1), D


def _layer_key(m: nn.Module) -> tuple:
    if type(m) is nn.Linear:
        return (m.out_features, m.in_features, (), (), ())
    return (m.out_channels, m.in_channels // m.groups, tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation))


@functools.lru_cache(maxsize=1024)
def _plan(keys: tuple, groups: int) -> tuple[Any, float, tuple]:
    """The cheapest order to compose a chain (matrix-chain dynamic programming over the pairwise
    composition costs) and its multiply-accumulates. ``keys``: per layer (out, in per group, kernel,
    stride, dilation), all empty for Linear layers. Returns a tree of layer indices — an int, or a
    pair (left, right) meaning right ∘ left —, its cost and the composed kernel size. Composition is associative, so every
    order gives the same kernel; they differ in cost by the sizes of the intermediate products (an
    FC chain m → 4m → 4n → n composes right to left, a CL chain 1x1 → k×k → 1x1 left to right)."""
    n = len(keys)
    # geometry of every sub-chain i..j: (out, in per group, kernel size, stride, dilation)
    geo = {(i, i): keys[i] for i in range(n)}
    for i in range(n):
        for j in range(i + 1, n):
            o1, c, k1, s1, d1 = geo[(i, j - 1)]
            o2, _, k2, s2, d2 = keys[j]
            if not k1:
                geo[(i, j)] = (o2, c, (), (), ())
                continue
            _, _, D, size = _pair_geometry(k1, s1, d1, k2, d2)
            geo[(i, j)] = (o2, c, size, tuple(a * b for a, b in zip(s1, s2)), D)
    best: dict[tuple[int, int], tuple[Any, float]] = {(i, i): (i, 0.0) for i in range(n)}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            options = []
            for k in range(i, j):
                (t1, c1), (t2, c2) = best[(i, k)], best[(k + 1, j)]
                o1, cin, ka, _, _ = geo[(i, k)]
                o2, _, kb, _, _ = geo[(k + 1, j)]
                pair = o2 * (o1 // groups) * cin * math.prod(ka) * math.prod(kb)
                options.append((c1 + c2 + pair, k, (t1, t2)))
            cost, _, tree = min(options, key=lambda t: (t[0], -t[1]))  # ties: compose left to right
            best[(i, j)] = (tree, cost)
    return (*best[(0, n - 1)], geo[(0, n - 1)][2])


def _chain_plan(layers: list) -> tuple[Any, float, tuple]:
    groups = 1 if type(layers[0]) is nn.Linear else layers[0].groups
    return _plan(tuple(_layer_key(m) for m in layers), groups)


def _compose_tree(layers: list, tree) -> tuple:
    """(weight, bias, stride, padding, dilation) of the sub-chain ``tree`` (Linear: the last three None)."""
    if isinstance(tree, int):
        m = layers[tree]
        if type(m) is nn.Linear:
            return m.weight, m.bias, None, None, None
        return m.weight, m.bias, tuple(m.stride), tuple(m.padding), tuple(m.dilation)
    w1, b1, s1, p1, d1 = _compose_tree(layers, tree[0])
    w2, b2, s2, _, d2 = _compose_tree(layers, tree[1])
    if s1 is None:  # Linear: W2 W1, W2 b1 + b2
        b = b2 if b1 is None else (w2 @ b1 if b2 is None else torch.addmv(b2, w2, b1))
        return w2 @ w1, b, None, None, None
    return _compose_conv(w1, b1, s1, p1, d1, w2, b2, s2, d2, layers[0].groups)


def compose_chain(body: nn.Sequential, order=None) -> dict[str, Any]:
    """The chain's single op, composed differentiably: ``{"kind": "conv"|"linear", "weight",
    "bias", and for convs "stride", "padding", "dilation", "groups"}``. ``order``: a composition
    tree (see ``_plan``); by default the cheapest."""
    layers = list(body)
    tree = _chain_plan(layers)[0] if order is None else order
    w, b, s, p, d = _compose_tree(layers, tree)
    if s is None:
        return {"kind": "linear", "weight": w, "bias": b}
    return {"kind": "conv", "weight": w, "bias": b, "stride": s, "padding": p, "dilation": d, "groups": layers[0].groups}


def run_collapsed(body: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``body(x)`` computed as one op with the composed weight (composed once, in this call)."""
    op = compose_chain(body)
    if op["kind"] == "linear":
        return F.linear(x, op["weight"], op["bias"])
    nd = op["weight"].dim() - 2
    return _CONV_FN[nd](x, op["weight"], op["bias"], op["stride"], op["padding"], op["dilation"], op["groups"])


def chain_costs(body: nn.Sequential, shape: tuple[int, ...]) -> tuple[float, float]:
    """Multiply-accumulates of one forward of ``body`` on an input of ``shape``: (explicit chain,
    collapsed = composition in the cheapest order + one op). The backward costs about twice the
    forward in both forms."""
    layers = list(body)
    _, comp, size = _chain_plan(layers)
    if type(layers[0]) is nn.Linear:
        rows = math.prod(shape[:-1])
        explicit = sum(rows * m.in_features * m.out_features for m in layers)
        return float(explicit), float(comp + rows * layers[0].in_features * layers[-1].out_features)
    batch, spatial = shape[0], list(shape[2:])
    explicit = 0.0
    for i, m in enumerate(layers):
        pad = m.padding if i == 0 else (0,) * len(spatial)
        spatial = [(spatial[k] + 2 * pad[k] - m.dilation[k] * (m.kernel_size[k] - 1) - 1) // m.stride[k] + 1
                   for k in range(len(spatial))]
        explicit += batch * math.prod(spatial) * m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    ig = layers[0].in_channels // layers[0].groups
    return explicit, comp + batch * math.prod(spatial) * layers[-1].out_channels * ig * math.prod(size)


def collapse_pays(body: nn.Sequential, shape: tuple[int, ...]) -> bool:
    """Whether the collapsed form costs fewer multiply-accumulates than the chain on this input
    (a deep layer with a small feature map and many channels can be cheaper to run explicitly)."""
    explicit, collapsed = chain_costs(body, tuple(shape))
    return collapsed < explicit
