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

computed per group (grouped and depthwise chains stay grouped) as two batched products: over the
middle channels m, then over the tap pairs (a, b) with a constant 0/1 map P[a, b, u] of the
geometry (cached; it does not depend on the factors). When either kernel is pointwise — ExpandNets'
CL chains are 1x1 → k×k → 1x1 — it is a single product per tap. (``conv_transpose`` would compute
the same full convolution, but PyTorch runs a grouped transposed convolution group by group on
CPU: 10x slower for depthwise chains.) The result is one conv with stride s1·s2, padding p1,
dilation D; bias ``b2 + Σ W2·b1``. Linear layers:
``W = W2 W1``, ``b = W2 b1 + b2``. The chain is composed left to right, once per forward; nothing is
cached across steps (the factors change every step).
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


def _compose_conv(w1: torch.Tensor, b1, s1, p1, d1, w2: torch.Tensor, b2, s2, d2, groups: int):
    nd = w1.dim() - 2
    k1, k2 = tuple(w1.shape[2:]), tuple(w2.shape[2:])
    # a 1-tap kernel has no dilation: pick the one that keeps the composed grid coarsest
    d1 = tuple(s1[k] * d2[k] if k1[k] == 1 else d1[k] for k in range(nd))
    d2 = tuple(d1[k] // s1[k] if k2[k] == 1 and d1[k] % s1[k] == 0 else d2[k] for k in range(nd))
    D = tuple(math.gcd(d1[k], s1[k] * d2[k]) for k in range(nd))
    size = tuple((d1[k] * (k1[k] - 1) + s1[k] * d2[k] * (k2[k] - 1)) // D[k] + 1 for k in range(nd))
    o, mg = w2.shape[0], w2.shape[1]
    ig = w1.shape[1]
    W1 = w1.reshape(groups, mg, ig, -1)             # [g, M/g, C_in/g, taps1]
    W2 = w2.reshape(groups, o // groups, mg, -1)    # [g, C_out/g, M/g, taps2]
    if W2.shape[-1] == 1 and W1.shape[-1] == math.prod(size):  # pointwise second: W2 @ W1 (taps ride along)
        K = torch.matmul(W2[..., 0], W1.reshape(groups, mg, -1))                # [g, C_out/g, C_in/g * taps]
    elif W1.shape[-1] == 1 and W2.shape[-1] == math.prod(size):  # pointwise first: (W2 per tap) @ W1
        taps = W2.shape[-1]
        K = torch.matmul(W2.permute(0, 1, 3, 2).reshape(groups, -1, mg), W1[..., 0])   # [g, C_out/g * taps, C_in/g]
        K = K.reshape(groups, o // groups, taps, ig).transpose(2, 3)
    else:
        P = _tap_map(k1, k2, tuple(s1), d1, d2, D, size).to(device=w1.device, dtype=w1.dtype)
        Q = torch.einsum("gomb,gmia->goiab", W2, W1)
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


def compose_chain(body: nn.Sequential) -> dict[str, Any]:
    """The chain's single op, composed differentiably: ``{"kind": "conv"|"linear", "weight",
    "bias", and for convs "stride", "padding", "dilation", "groups"}``."""
    layers = list(body)
    first = layers[0]
    if type(first) is nn.Linear:
        w, b = first.weight, first.bias
        for m in layers[1:]:
            nb = None if b is None else m.weight @ b
            w = m.weight @ w
            b = m.bias if nb is None else (nb if m.bias is None else nb + m.bias)
        return {"kind": "linear", "weight": w, "bias": b}
    w, b = first.weight, first.bias
    s, p, d, g = tuple(first.stride), tuple(first.padding), tuple(first.dilation), first.groups
    for m in layers[1:]:
        w, b, s, p, d = _compose_conv(w, b, s, p, d, m.weight, m.bias, tuple(m.stride), tuple(m.dilation), g)
    return {"kind": "conv", "weight": w, "bias": b, "stride": s, "padding": p, "dilation": d, "groups": g}


def run_collapsed(body: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``body(x)`` computed as one op with the composed weight (composed once, in this call)."""
    op = compose_chain(body)
    if op["kind"] == "linear":
        return F.linear(x, op["weight"], op["bias"])
    nd = op["weight"].dim() - 2
    return _CONV_FN[nd](x, op["weight"], op["bias"], op["stride"], op["padding"], op["dilation"], op["groups"])


def chain_costs(body: nn.Sequential, shape: tuple[int, ...]) -> tuple[float, float]:
    """Multiply-accumulates of one forward of ``body`` on an input of ``shape``: (explicit chain,
    collapsed = composition + one op). The backward costs about twice the forward in both forms."""
    layers = list(body)
    batch = shape[0]
    if type(layers[0]) is nn.Linear:
        rows = math.prod(shape[:-1])
        explicit = sum(rows * m.in_features * m.out_features for m in layers)
        comp, cin = 0, layers[0].in_features
        for m in layers[1:]:
            comp += m.out_features * m.in_features * cin
        return float(explicit), float(comp + rows * cin * layers[-1].out_features)
    spatial = list(shape[2:])
    explicit = 0.0
    for i, m in enumerate(layers):
        pad = m.padding if i == 0 else (0,) * len(spatial)
        spatial = [(spatial[k] + 2 * pad[k] - m.dilation[k] * (m.kernel_size[k] - 1) - 1) // m.stride[k] + 1
                   for k in range(len(spatial))]
        explicit += batch * math.prod(spatial) * m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    g = layers[0].groups
    first = layers[0]
    ks, ss, ds = list(first.kernel_size), list(first.stride), list(first.dilation)
    comp, ig = 0.0, first.in_channels // g
    for m in layers[1:]:
        t2 = math.prod(m.kernel_size)
        comp += m.out_channels * (m.in_channels // g) * ig * math.prod(ks) * t2
        for k in range(len(ks)):  # the composed kernel's size per dim (see the module docstring)
            d2 = m.dilation[k]
            D = math.gcd(ds[k], ss[k] * d2)
            ks[k] = (ds[k] * (ks[k] - 1) + ss[k] * d2 * (m.kernel_size[k] - 1)) // D + 1
            ss[k], ds[k] = ss[k] * m.stride[k], D
    out = layers[-1].out_channels
    return explicit, comp + batch * math.prod(spatial) * out * ig * math.prod(ks)


def collapse_pays(body: nn.Sequential, shape: tuple[int, ...]) -> bool:
    """Whether the collapsed form costs fewer multiply-accumulates than the chain on this input
    (a deep layer with a small feature map and many channels can be cheaper to run explicitly)."""
    explicit, collapsed = chain_costs(body, tuple(shape))
    return collapsed < explicit
