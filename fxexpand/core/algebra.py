"""Exact algebra of linear ops (convolutions and linear layers), shared by the fusion passes.

All composition is computed in float64 and cast back to the parameters' dtype.

Sequential conv∘conv (per spatial dim; conv1: kernel k1, stride s1, padding p1, dilation d1;
conv2: k2, s2, padding 0, d2)::

    z[j] = Σ_b W2[b] Σ_a W1[a] x̂[s1·s2·j + s1·d2·b + d1·a]          (x̂ = x padded by p1)
    ⇒ one conv: stride s1·s2, padding p1, dilation D = gcd(d1, s1·d2),
       kernel K = (s1·d2·(k2-1) + d1·(k1-1)) / D + 1,  bias b2 + Σ W2·b1.

conv2 may be padded only if conv1 is pointwise (k=1, s=1, p=0) without bias: then zero-padding
the intermediate equals zero-padding the input. Any other padded conv2 is refused (rule 1).

Parallel sum Σ_a conv_a(x) (same stride): each kernel is placed in a common kernel at offset
P - P_a (P = max P_a); exact when every branch has the same 2·P_a - D_a·(k_a - 1) per dim (so all
branches see the same output grid for every input size).

Groups: results are composed on block-diagonal (dense) weights when needed and the fused op
keeps the largest group count its connectivity allows (computed from the group structure, not
from weight values).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .ops import BNParams, LinearOp

__all__ = ["compose", "sum_parallel", "identity_like", "bn_as_op", "scale_as_op", "negate", "dense_weight", "grouped_weight", "max_groups"]


def dense_weight(op: LinearOp) -> torch.Tensor:
    """Block-diagonal ``[C_out, C_in, *k]`` weight of a grouped conv (float64)."""
    w = op.weight.detach().to(torch.float64)
    g = op.groups
    if op.kind != "conv" or g == 1:
        return w
    co, ci = w.shape[0] // g, w.shape[1]
    k = w.shape[2:]
    w5 = w.reshape(g, co, ci, *k)
    dense = torch.zeros(g, co, g, ci, *k, dtype=w.dtype, device=w.device)
    idx = torch.arange(g, device=w.device)
    dense[idx, :, idx] = w5
    return dense.reshape(g * co, g * ci, *k)


def _regrouped(op: LinearOp, groups: int) -> torch.Tensor:
    """The weight of conv ``op`` (``op.groups`` a multiple of ``groups``) as a ``groups``-grouped
    weight ``[C_out, C_in / groups, *k]`` (float64): output channel o of fine group j reads its
    ``C_in / op.groups`` inputs at offset ``j·C_in/op.groups − J·C_in/groups`` inside coarse group J."""
    w = op.weight.detach().to(torch.float64)
    cout, per = w.shape[0], w.shape[1]
    cin = per * op.groups
    rows = torch.arange(cout, device=w.device)
    fine, coarse = rows // (cout // op.groups), rows // (cout // groups)
    cols = (fine * per - coarse * (cin // groups))[:, None] + torch.arange(per, device=w.device)[None, :]
    out = w.new_zeros((cout, cin // groups, *w.shape[2:]))
    out[rows[:, None], cols] = w
    return out


def grouped_weight(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`dense_weight` (takes the diagonal blocks)."""
    if groups == 1:
        return dense
    cout, cin = dense.shape[:2]
    co, ci = cout // groups, cin // groups
    k = dense.shape[2:]
    d5 = dense.reshape(groups, co, groups, ci, *k)
    idx = torch.arange(groups, device=dense.device)
    return d5[idx, :, idx].reshape(cout, ci, *k)


def _mask(op: LinearOp) -> torch.Tensor:
    """Connectivity ``[C_out, C_in]`` (bool) implied by the op's groups."""
    cout, cin, g = op.out_channels, op.in_channels, op.groups
    og = torch.arange(cout) // (cout // g)
    ig = torch.arange(cin) // (cin // g)
    return og[:, None] == ig[None, :]


def max_groups(mask: torch.Tensor, limit: int | None = None) -> int:
    """The largest G such that the connectivity mask is block-diagonal with G equal blocks.

    ``limit``: an upper bound the caller knows (a composition or a sum of ops with ``g_a`` and
    ``g_b`` groups has at most ``min(g_a, g_b)``), so larger candidates are not tried. Each candidate
    is checked on the mask's nonzero entries only."""
    cout, cin = mask.shape
    common = math.gcd(cout, cin)
    rows, cols = mask.nonzero(as_tuple=True)
    for g in sorted((d for d in range(1, common + 1) if common % d == 0), reverse=True):
        if g == 1:
            return 1
        if limit is not None and g > limit:
            continue
        if bool(((rows // (cout // g)) == (cols // (cin // g))).all()):
            return g
    return 1


def _finish(like: LinearOp, kind: str, w: torch.Tensor, b: torch.Tensor | None, **geom) -> LinearOp:
    dtype, device = like.weight.dtype, like.weight.device
    w = w.to(dtype=dtype, device=device).contiguous()
    b = None if b is None else b.to(dtype=dtype, device=device).contiguous()
    return LinearOp(kind, w, b, **geom)


def _add_taps(target: torch.Tensor, src: torch.Tensor, offset, step, kernel, lead: int) -> None:
    """``target[..., o : o + s·(k−1) + 1 : s] += src`` per spatial dim (after ``lead`` channel dims):
    a kernel of ``k`` taps placed at spacing ``s`` from offset ``o`` in a larger kernel — the one
    tap-placement rule of sequential (conv∘conv) and parallel (Σ conv) composition."""
    sl = tuple(slice(o, o + s * (k - 1) + 1, s) for o, s, k in zip(offset, step, kernel))
    target[(slice(None),) * lead + sl] += src


def _bias64(op: LinearOp) -> torch.Tensor | None:
    return None if op.bias is None else op.bias.detach().to(torch.float64)


def _is_channel_scale(op: LinearOp) -> bool:
    """Whether ``op`` is a diagonal conv: depthwise with one channel per group, every kernel size,
    stride 1 and no padding (its output channel c is its input channel c times ``weight[c]``)."""
    return (op.kind == "conv" and op.groups == op.out_channels == op.in_channels
            and all(k == 1 for k in op.kernel) and all(s == 1 for s in op.stride) and not any(op.padding))


def _diagonal(w: torch.Tensor) -> torch.Tensor | None:
    """The diagonal of a square matrix whose nonzeros all lie on it, else None."""
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        return None
    d = torch.diagonal(w)
    return d if int(torch.count_nonzero(w)) == int(torch.count_nonzero(d)) else None


def compose(first: LinearOp, second: LinearOp) -> tuple[LinearOp | None, str]:
    """``second ∘ first`` as one op, or ``(None, reason)`` when that is not exact."""
    if first.kind != second.kind:
        return None, f"cannot compose {first.kind} with {second.kind}"
    if second.in_channels != first.out_channels:
        return None, "channel counts do not match"
    b1, b2 = _bias64(first), _bias64(second)
    if first.kind == "linear":
        w1, w2 = first.weight.detach().double(), second.weight.detach().double()
        # a diagonal factor (a BatchNorm1d, a constant scale) scales rows / columns: the same sums
        # as the matrix product (its other terms are zeros), without the O(n^3) product
        d1, d2 = _diagonal(w1), _diagonal(w2)
        if d2 is not None:
            w = d2[:, None] * w1
        elif d1 is not None:
            w = w2 * d1[None, :]
        else:
            w = w2 @ w1
        b = None
        if b1 is not None:
            b = w2 @ b1
        if b2 is not None:
            b = b2 if b is None else b + b2
        return _finish(first, "linear", w, b), ""
    if first.nd != second.nd:
        return None, "convolutions of different dimensionality"
    nd = first.nd
    k1, k2 = first.kernel, second.kernel
    s1, s2, p1, p2 = first.stride, second.stride, first.padding, second.padding
    d1, d2 = first.dilation, second.dilation
    pointwise_first = all(k == 1 for k in k1) and all(s == 1 for s in s1) and not any(p1)
    if any(p2):
        if not pointwise_first:
            return None, ("padding on the second conv of a chain is exact only after a pointwise "
                          "unpadded first conv (DESIGN rule 1: pad the first conv of a chain)")
        if b1 is not None and bool(b1.abs().max() > 0):
            return None, ("the second conv is padded and the first conv has a bias: the intermediate "
                          "border would have to be padded with the bias, not zero (DESIGN rule 1)")
        b1 = None
        # pointwise first: the fused op has the second conv's geometry
        stride, padding, dilation = s2, p2, d2
        kernel = k2
        D = d2
        offsets_b = lambda pos: pos  # noqa: E731  (position in units of D)
        step_a = (1,) * nd
        k1_eff = (1,) * nd
    else:
        stride = tuple(a * b for a, b in zip(s1, s2))
        padding = p1
        D, kernel, step = [], [], []
        for i in range(nd):
            if k1[i] > 1 and k2[i] > 1:
                di = math.gcd(d1[i], s1[i] * d2[i])
            elif k1[i] > 1:
                di = d1[i]
            elif k2[i] > 1:
                di = s1[i] * d2[i]
            else:
                di = 1
            D.append(di)
            kernel.append((s1[i] * d2[i] * (k2[i] - 1) + d1[i] * (k1[i] - 1)) // di + 1)
            step.append(d1[i] // di if k1[i] > 1 else 1)
        D, kernel, step_a = tuple(D), tuple(kernel), tuple(step)
        dilation = D
        offsets_b = lambda pos: tuple(s1[i] * d2[i] * pos[i] // D[i] for i in range(nd))  # noqa: E731
        k1_eff = k1

    g1, g2 = first.groups, second.groups
    out_c, in_c = second.out_channels, first.in_channels
    w1_full = first.weight.detach().double()
    w2_full = second.weight.detach().double()
    ones = (1,) * (nd + 1)
    if _is_channel_scale(second):
        # a per-channel scale after any conv (layer scale, a folded BatchNorm): the first conv's
        # output channel c times s_c, in the first conv's geometry (the kernel, stride, padding and
        # dilation worked out above are the first's) and groups
        w = w1_full * w2_full.reshape(-1, *ones)
        groups = g1
    elif _is_channel_scale(first):
        # a per-channel scale before any conv: the second conv's input channel c times s_c
        s = w1_full.reshape(g2, 1, in_c // g2, *ones[1:])
        w = (w2_full.reshape(g2, out_c // g2, in_c // g2, *k2) * s).reshape(out_c, in_c // g2, *k2)
        groups = g2
    elif g1 == g2:
        g = g1
        w1g = w1_full.reshape(g, first.out_channels // g, in_c // g, *k1)
        w2g = w2_full.reshape(g, out_c // g, first.out_channels // g, *k2)
        w = torch.zeros(g, out_c // g, in_c // g, *kernel, dtype=torch.float64, device=w1g.device)
        for pos in itertools.product(*(range(k) for k in k2)):
            contrib = torch.einsum("goc,gci...->goi...", w2g[(slice(None), slice(None), slice(None)) + pos], w1g)
            _add_taps(w, contrib, offsets_b(pos), step_a, k1_eff, lead=3)
        w = w.reshape(out_c, in_c // g, *kernel)
        groups = g
    else:
        w1 = dense_weight(first)
        w2 = dense_weight(second)
        dense = torch.zeros(out_c, in_c, *kernel, dtype=torch.float64, device=w1.device)
        for pos in itertools.product(*(range(k) for k in k2)):
            contrib = torch.einsum("oc,ci...->oi...", w2[(slice(None), slice(None)) + pos], w1)
            _add_taps(dense, contrib, offsets_b(pos), step_a, k1_eff, lead=2)
        mask = (_mask(second).double() @ _mask(first).double()) > 0
        groups = max_groups(mask, limit=min(g1, g2))
        w = grouped_weight(dense, groups)
    b = None
    if b1 is not None:
        b = w2_full.sum(dim=tuple(range(2, 2 + nd))) @ b1 if g2 == 1 else (
            dense_weight(second).sum(dim=tuple(range(2, 2 + nd))) @ b1)
    if b2 is not None:
        b = b2 if b is None else b + b2
    return _finish(first, "conv", w, b, stride=stride, padding=tuple(padding), dilation=tuple(dilation),
                   groups=groups), ""


def identity_like(op: LinearOp, channels: int) -> LinearOp:
    """The identity as an op of the same kind (depthwise 1x1 conv / identity matrix)."""
    w = op.weight
    if op.kind == "linear":
        return LinearOp("linear", torch.eye(channels, dtype=w.dtype, device=w.device), None)
    nd = op.nd
    return LinearOp("conv", torch.ones(channels, 1, *([1] * nd), dtype=w.dtype, device=w.device), None,
                    (1,) * nd, (0,) * nd, (1,) * nd, channels)


def bn_as_op(bn: BNParams, like: LinearOp) -> LinearOp:
    """An inference-mode batch norm as an op of ``like``'s kind: BatchNorm folded (by torch's own
    ``fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``) into the identity of
    :func:`identity_like`, i.e. a depthwise 1x1 conv with weight ``s = γ/√(σ²+ε)`` and bias
    ``β − μ·s`` (a diagonal matrix for a linear). Computed in float64, returned in ``like``'s dtype."""
    c = bn.running_mean.numel()
    ident = identity_like(like, c)
    f64 = [None if t is None else t.detach().double() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    mean, var, weight, bias = f64
    weight = torch.ones_like(mean) if weight is None else weight
    bias = torch.zeros_like(mean) if bias is None else bias
    fuse = fuse_linear_bn_weights if like.kind == "linear" else fuse_conv_bn_weights
    with torch.no_grad():
        w, b = fuse(ident.weight.double(), None, mean, var, bn.eps, weight, bias)
    dt = like.weight.dtype
    return LinearOp(like.kind, w.detach().to(dt), b.detach().to(dt), ident.stride, ident.padding, ident.dilation,
                    ident.groups)


def scale_as_op(factor, like: LinearOp, shape: tuple[int, ...] | None) -> LinearOp | None:
    """A constant scale ``y · s`` of an output of ``like`` (shape ``shape``) as an op of ``like``'s kind:
    a depthwise 1x1 conv with weight ``s`` (``s`` a number or a tensor that varies along dim 1 only,
    e.g. a layer-scale ``gamma`` of shape ``[C, 1, 1]``) or a diagonal matrix (``s`` varies along the
    last dim only). None when ``s`` broadcasts any other way (it would change the output's shape or
    scale along a spatial dim). Built in float64, returned in ``like``'s dtype."""
    if shape is None:
        return None
    c, nd = like.out_channels, len(shape)
    if isinstance(factor, float):
        vec = torch.full((c,), factor, dtype=torch.float64)
    else:
        t = factor.detach().to(torch.float64)
        if t.dim() > nd or t.is_complex():
            return None
        full = t.reshape((1,) * (nd - t.dim()) + tuple(t.shape))
        dim = 1 if like.kind == "conv" else nd - 1
        if like.kind == "conv" and nd != like.nd + 2:
            return None
        if any(n != 1 for i, n in enumerate(full.shape) if i != dim) or full.shape[dim] not in (1, c):
            return None
        if shape[dim] != c:
            return None
        vec = full.reshape(-1).expand(c).clone()
    ident = identity_like(like, c)
    w = ident.weight.detach().to(torch.float64)
    w = w * vec.reshape((c,) + (1,) * (w.dim() - 1)) if like.kind == "conv" else torch.diag(vec)
    return LinearOp(like.kind, w.to(like.weight.dtype), None, ident.stride, ident.padding, ident.dilation, ident.groups)


def negate(op: LinearOp) -> LinearOp:
    """``−op``: the same op with its weight and bias negated (a subtracted branch)."""
    return LinearOp(op.kind, -op.weight.detach(), None if op.bias is None else -op.bias.detach(), op.stride,
                    op.padding, op.dilation, op.groups)


def sum_parallel(ops: list[LinearOp]) -> tuple[LinearOp | None, str]:
    """``Σ op(x)`` over branches reading the same input, as one op, or ``(None, reason)``."""
    first = ops[0]
    if any(o.kind != first.kind for o in ops):
        return None, "branches mix conv and linear"
    if any(o.in_channels != first.in_channels or o.out_channels != first.out_channels for o in ops):
        return None, "branches have different channel counts"
    biases = [_bias64(o) for o in ops if o.bias is not None]
    b = sum(biases) if biases else None
    if first.kind == "linear":
        w = sum(o.weight.detach().double() for o in ops)
        return _finish(first, "linear", w, b), ""
    nd = first.nd
    if any(o.nd != nd for o in ops):
        return None, "branches have different dimensionality"
    if any(o.stride != first.stride for o in ops):
        return None, "branches have different strides"
    for i in range(nd):
        c = {2 * o.padding[i] - o.dilation[i] * (o.kernel[i] - 1) for o in ops}
        if len(c) != 1:
            return None, ("branches are not aligned (2·padding - dilation·(kernel-1) differs), so their "
                          "output grids differ for some input sizes")
    P = tuple(max(o.padding[i] for o in ops) for i in range(nd))
    # common dilation per dim: the gcd of every tap spacing and every branch offset (a kernel of
    # size 1 has no spacing), so e.g. a dilated 3x3 plus the identity stays a dilated 3x3
    D = []
    for i in range(nd):
        g = 0
        for o in ops:
            if o.kernel[i] > 1:
                g = math.gcd(g, o.dilation[i])
            g = math.gcd(g, P[i] - o.padding[i])
        D.append(max(g, 1))
    D = tuple(D)
    K = tuple(max((P[i] - o.padding[i]) // D[i] + (o.dilation[i] // D[i] if o.kernel[i] > 1 else 1) * (o.kernel[i] - 1) + 1
                  for o in ops)
              for i in range(nd))
    same_groups = all(o.groups == first.groups for o in ops)
    g_min = min(o.groups for o in ops)
    nested = all(o.groups % g_min == 0 for o in ops)
    if same_groups or nested:
        # every branch's blocks lie inside the coarsest branch's (e.g. a dense or grouped kxk plus a
        # depthwise BatchNorm / identity branch): the sum has the coarsest grouping, and a finer
        # branch is written into it block by block, without a dense C_out x C_in intermediate
        groups = g_min
        w = torch.zeros(first.out_channels, first.in_channels // groups, *K, dtype=torch.float64,
                        device=first.weight.device)
    else:
        mask = torch.zeros(first.out_channels, first.in_channels, dtype=torch.bool)
        for o in ops:
            mask |= _mask(o)
        groups = max_groups(mask, limit=min(o.groups for o in ops))
        w = torch.zeros(first.out_channels, first.in_channels, *K, dtype=torch.float64, device=first.weight.device)
    for o in ops:
        if same_groups or (nested and o.groups == groups):
            src = o.weight.detach().double()
        elif nested:
            src = _regrouped(o, groups)
        else:
            src = dense_weight(o)
        step = tuple(o.dilation[i] // D[i] if o.kernel[i] > 1 else 1 for i in range(nd))
        _add_taps(w, src, tuple((P[i] - o.padding[i]) // D[i] for i in range(nd)), step, o.kernel, lead=2)
    if not (same_groups or nested):
        w = grouped_weight(w, groups)
    return _finish(first, "conv", w, b, stride=first.stride, padding=P, dilation=D, groups=groups), ""
