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

— a full convolution of W1 (zero-upsampled by d1/D) with W2 (dilated by s1·d2/D), computed with
``conv_transpose`` (its ``groups`` keep grouped and depthwise chains grouped). The result is one
conv with stride s1·s2, padding p1, dilation D; bias ``b2 + Σ W2·b1``. Linear layers:
``W = W2 W1``, ``b = W2 b1 + b2``. The chain is composed left to right, once per forward; nothing is
cached across steps (the factors change every step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["chain_problem", "compose_chain", "run_collapsed"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
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


def _compose_conv(w1: torch.Tensor, b1, s1, p1, d1, w2: torch.Tensor, b2, s2, d2, groups: int):
    nd = w1.dim() - 2
    D = tuple(math.gcd(d1[k], s1[k] * d2[k]) for k in range(nd))
    up = tuple(d1[k] // D[k] for k in range(nd))
    dil = tuple(s1[k] * d2[k] // D[k] for k in range(nd))
    x = w1.transpose(0, 1)  # [C_in/g, M, k1...]: a batch of C_in/g "signals" with M channels
    if any(u > 1 for u in up):
        shape = (*x.shape[:2], *[(x.shape[2 + k] - 1) * up[k] + 1 for k in range(nd)])
        z = x.new_zeros(shape)
        z[(slice(None), slice(None), *[slice(None, None, u) for u in up])] = x
        x = z
    # conv_transpose weight: [in = M, out/g = C_out/g, k2...]; W2 is [C_out, M/g, k2...]
    o, mg = w2.shape[0], w2.shape[1]
    wt = w2.reshape(groups, o // groups, mg, *w2.shape[2:]).transpose(1, 2).reshape(groups * mg, o // groups,
                                                                                 *w2.shape[2:])
    k = _TRANSPOSE[nd](x, wt, None, 1, 0, 0, groups, dil)  # [C_in/g, C_out, K...]
    weight = k.transpose(0, 1)
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
