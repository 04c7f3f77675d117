"""The random model generator behind :func:`fxexpand.testing.random_model`.

A generated model is a small program: a list of steps, each reading earlier values and appending
one new value, interpreted by ``forward``. The loop over the (plain-Python) program unrolls when
torch.fx traces it, so the traced graph contains exactly the generated layers. The builder tracks
the shape of every value, so every model is valid by construction, and it draws every choice from
``random.Random(seed)`` (weights from ``torch.Generator().manual_seed(seed)``), so a seed
reproduces the same architecture and the same weights.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._helpers import randomize_bn

__all__ = ["RandomNet", "RandomBlock", "random_model", "LIMITS", "check_limits"]

# keyword limits of random_model: name -> (default, smallest allowed, largest allowed)
LIMITS: dict[str, tuple[Any, Any, Any]] = {
    "max_blocks": (3, 0, 8),
    "max_ops": (4, 1, 12),
    "max_channels": (8, 1, 64),
    "max_size": (12, 4, 64),
    "batch": (2, 2, 16),
}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_FCONV = {1: F.conv1d, 2: F.conv2d}
_ACT_MODULES = {
    "ReLU": lambda r: nn.ReLU(),
    "ReLU6": lambda r: nn.ReLU6(),
    "LeakyReLU": lambda r: nn.LeakyReLU(r.choice([0.01, 0.1, 0.2])),
    "GELU": lambda r: nn.GELU(approximate=r.choice(["none", "tanh"])),
    "SiLU": lambda r: nn.SiLU(),
    "Hardswish": lambda r: nn.Hardswish(),
}
# functional activations by name (the program stores names, not functions: plain, picklable data)
_ACT_FUNCS = {
    "F.relu": F.relu,
    "torch.relu": torch.relu,
    "F.relu6": F.relu6,
    "F.leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "F.gelu": F.gelu,
    "F.silu": F.silu,
    "F.hardswish": F.hardswish,
}


class _Program(nn.Module):
    """Interprets ``self.program``: value 0 is the input; each step appends one value."""

    def __init__(self, nd: int):
        super().__init__()
        self.nd = nd
        self.program: list[tuple] = []

    def forward(self, x):
        vals = [x]
        for step in self.program:
            op = step[0]
            if op == "call":  # ("call", module_name, src)
                vals.append(getattr(self, step[1])(vals[step[2]]))
            elif op == "conv":  # ("conv", weight, bias|None, src, stride, padding, dilation, groups)
                _, w, b, src, stride, padding, dilation, groups = step
                vals.append(_FCONV[self.nd](vals[src], getattr(self, w), getattr(self, b) if b else None,
                                            stride, padding, dilation, groups))
            elif op == "linear":  # ("linear", weight, bias|None, src)
                vals.append(F.linear(vals[step[3]], getattr(self, step[1]),
                                     getattr(self, step[2]) if step[2] else None))
            elif op == "batch_norm":  # ("batch_norm", prefix, src)
                p = step[1]
                vals.append(F.batch_norm(vals[step[2]], getattr(self, p + "_mean"), getattr(self, p + "_var"),
                                         getattr(self, p + "_weight"), getattr(self, p + "_bias"), False, 0.1,
                                         1e-5))
            elif op == "act":  # ("act", function_name, src)
                vals.append(_ACT_FUNCS[step[1]](vals[step[2]]))
            elif op == "add":  # ("add", a, b, form)
                a, b = vals[step[1]], vals[step[2]]
                vals.append(torch.add(a, b) if step[3] == "torch.add" else a + b)
            elif op == "cat":  # ("cat", [srcs])
                vals.append(torch.cat([vals[i] for i in step[1]], dim=1))
            elif op == "dropout":  # ("dropout", src): an identity in eval mode, dropout in training
                vals.append(F.dropout(vals[step[1]], 0.1, training=False))
            elif op == "flatten":  # ("flatten", src)
                vals.append(torch.flatten(vals[step[1]], 1))
            else:
                raise ValueError(f"unknown program step {step!r}")
        return vals[-1]

    def extra_repr(self) -> str:
        return f"nd={self.nd}, steps={len(self.program)}"


class RandomBlock(_Program):
    """A block of a generated model (the class name ends in ``Block``, so NetBooster's
    ``targets="blocks"`` treats it as a repeated block)."""


class RandomNet(_Program):
    """A model made by :func:`fxexpand.testing.random_model`.

    ``seed``, ``limits`` and ``features`` (the set of features the generator used, e.g.
    ``"Conv2d"``, ``"kernel=(3, 5)"``, ``"residual"``, ``"shared_module"``) are plain attributes.
    """

    def __init__(self, nd: int, seed: int, limits: dict[str, Any]):
        super().__init__(nd)
        self.seed = seed
        self.limits = dict(limits)
        self.features: set[str] = set()


@dataclass
class _Shape:
    c: int
    size: tuple[int, ...]  # spatial dims; () after flatten
    flat: bool = False


@dataclass
class _Builder:
    rng: random.Random
    nd: int
    max_c: int
    features: set[str]
    mod: _Program = field(default=None)  # type: ignore[assignment]
    shapes: list[_Shape] = field(default_factory=list)
    counter: int = 0
    reusable: list[tuple[str, int]] = field(default_factory=list)  # shape-preserving convs: (name, channels)

    # -- bookkeeping ---------------------------------------------------------------------------
    def name(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}{self.counter}"

    def emit(self, step: tuple, shape: _Shape) -> int:
        self.mod.program.append(step)
        self.shapes.append(shape)
        return len(self.shapes) - 1

    def add_module(self, kind: str, m: nn.Module, src: int, shape: _Shape) -> int:
        name = self.name(kind)
        self.mod.add_module(name, m)
        return self.emit(("call", name, src), shape)

    # -- geometry ------------------------------------------------------------------------------
    def out_size(self, size, k, s, p, d):
        if p == "same":
            return tuple(size)
        return tuple((n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(size, k, s, p, d))

    def geometry(self, size, *, preserve: bool = False):
        """Random (kernel, stride, padding, dilation) that fits ``size``; ``preserve`` keeps the grid."""
        r, nd = self.rng, self.nd
        for _ in range(100):
            if nd == 2 and r.random() < 0.3:
                k = (r.randint(1, 7), r.randint(1, 7))
            else:
                k = (r.randint(1, 7),) * nd
            d = (r.choice([1, 1, 2]),) * nd
            if preserve:
                if any(kk % 2 == 0 for kk in k) and r.random() < 0.5:
                    k = tuple(kk - 1 if kk % 2 == 0 else kk for kk in k)
                if any((dd * (kk - 1)) % 2 for kk, dd in zip(k, d)):
                    p = "same"  # torch pads asymmetrically for an even effective kernel
                else:
                    p = tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d))
                s = (1,) * nd
            else:
                s = (r.choice([1, 1, 2]),) * nd if r.random() < 0.8 else tuple(r.randint(1, 2) for _ in range(nd))
                if all(ss == 1 for ss in s) and r.random() < 0.15:
                    p = "same"
                else:
                    p = tuple(r.randint(0, kk) for kk in k)
            out = self.out_size(size, k, s, p, d)
            if all(o >= 1 for o in out):
                return k, s, p, d, out
        return (1,) * nd, (1,) * nd, (0,) * nd, (1,) * nd, tuple(size)

    def channels_groups(self, cin: int, cout: int | None = None):
        r = self.rng
        kind = r.choice(["1", "1", "2", "dw"])
        if kind == "dw" and cout is None:
            return cin * r.choice([1, 1, 2]), cin, "depthwise"
        if kind == "dw" and cout is not None and cout % cin == 0:
            return cout, cin, "depthwise"
        if kind == "2" and cin % 2 == 0:
            c = cout if cout is not None else 2 * r.randint(1, max(1, self.max_c // 2))
            if c % 2 == 0:
                return c, 2, "groups=2"
        c = cout if cout is not None else r.randint(1, self.max_c)
        return c, 1, "groups=1"

    def note_conv(self, k, s, p, d, gname, bias, functional: bool):
        f = self.features
        f.add(f"Conv{self.nd}d" if not functional else f"F.conv{self.nd}d")
        f.add(f"kernel={k[0]}")
        f.add("kernel_even" if any(kk % 2 == 0 for kk in k) else "kernel_odd")
        f.add("kernel_nonsquare" if len(set(k)) > 1 else "kernel_square")
        f.add(f"stride={max(s)}")
        f.add("padding=same" if p == "same" else f"padding={'0' if not any(p) else 'k' if any(pp == kk for pp, kk in zip(p, k)) else '1..k-1'}")
        f.add(f"dilation={d[0]}")
        f.add(gname)
        f.add("bias" if bias else "no_bias")

    # -- layers --------------------------------------------------------------------------------
    def conv(self, src: int, *, preserve: bool = False, cout: int | None = None, functional: bool | None = None,
             geom=None) -> int:
        r, sh = self.rng, self.shapes[src]
        k, s, p, d, out = geom if geom is not None else self.geometry(sh.size, preserve=preserve)
        c, g, gname = self.channels_groups(sh.c, cout if cout is not None else (sh.c if preserve else None))
        bias = r.random() < 0.5
        functional = r.random() < 0.2 if functional is None else functional
        self.note_conv(k, s, p, d, gname, bias, functional)
        shape = _Shape(c, out)
        if not functional:
            m = _CONV[self.nd](sh.c, c, k, stride=s, padding=p, dilation=d, groups=g, bias=bias)
            return self.add_module("conv", m, src, shape)
        m = _CONV[self.nd](sh.c, c, k, groups=g, bias=bias)  # only for its initialised parameters
        w = self.name("w")
        self.mod.register_parameter(w, nn.Parameter(m.weight.detach().clone()))
        b = None
        if bias:
            b = self.name("b")
            self.mod.register_parameter(b, nn.Parameter(m.bias.detach().clone()))
        pad = p if p == "same" else tuple(p)
        return self.emit(("conv", w, b, src, tuple(s), pad, tuple(d), g), shape)

    def bn(self, src: int) -> int:
        r, sh = self.rng, self.shapes[src]
        if r.random() < 0.15:
            prefix = self.name("fbn")
            self.features.add("F.batch_norm")
            self.mod.register_buffer(prefix + "_mean", torch.zeros(sh.c))
            self.mod.register_buffer(prefix + "_var", torch.ones(sh.c))
            self.mod.register_parameter(prefix + "_weight", nn.Parameter(torch.ones(sh.c)))
            self.mod.register_parameter(prefix + "_bias", nn.Parameter(torch.zeros(sh.c)))
            return self.emit(("batch_norm", prefix, src), sh)
        affine = r.random() < 0.8
        # batch statistics (track_running_stats=False) on a flat (N, C) tensor with a batch of 2 make the
        # output almost independent of the input, which would weaken every comparison: only on maps
        track = sh.flat or r.random() < 0.9
        self.features.add("BatchNorm" + ("" if affine else "(affine=False)")
                          + ("" if track else "(track_running_stats=False)"))
        bn_cls = nn.BatchNorm1d if sh.flat or self.nd == 1 else nn.BatchNorm2d
        return self.add_module("bn", bn_cls(sh.c, affine=affine, track_running_stats=track), src, sh)

    def act(self, src: int) -> int:
        r = self.rng
        if r.random() < 0.25:
            fn = r.choice(sorted(_ACT_FUNCS))
            self.features.add(fn)
            return self.emit(("act", fn, src), self.shapes[src])
        kind = r.choice(sorted(_ACT_MODULES))
        self.features.add(kind)
        return self.add_module("act", _ACT_MODULES[kind](r), src, self.shapes[src])

    def identity(self, src: int) -> int:
        """nn.Identity, eval-mode dropout or F.dropout(training=False): removed by RemoveIdentity."""
        r, sh = self.rng, self.shapes[src]
        kind = r.choice(["Identity", "Dropout", "F.dropout"])
        self.features.add(kind)
        if kind == "F.dropout":
            return self.emit(("dropout", src), sh)
        return self.add_module("id", nn.Identity() if kind == "Identity" else nn.Dropout(0.1), src, sh)

    def add(self, a: int, b: int) -> int:
        form = self.rng.choice(["+", "torch.add"])
        self.features.add(f"add({form})")
        return self.emit(("add", a, b, form), self.shapes[a])

    # -- composite ops -------------------------------------------------------------------------
    def conv_bn_act(self, src: int) -> int:
        r = self.rng
        v = self.conv(src)
        step = self.mod.program[-1]
        biased = getattr(self.mod, step[1]).bias is not None if step[0] == "call" else step[2] is not None
        if r.random() < (0.4 if biased else 0.85):  # like real networks: bias-free convs feed a BatchNorm
            v = self.bn(v)
        if r.random() < 0.7:
            v = self.act(v)
        return v

    def residual(self, src: int) -> int:
        r = self.rng
        v = self.conv(src, preserve=True)
        if r.random() < 0.5:
            v = self.bn(v)
        if r.random() < 0.3:  # a non-linear branch: act then another shape-preserving conv
            v = self.conv(self.act(v), preserve=True)
        self.features.add("residual")
        return self.add(src, v) if r.random() < 0.5 else self.add(v, src)

    def aligned_pair(self, size):
        """Two geometries with the same output grid for every input size (same stride and
        ``2p - d(k-1)``), or with the same output on this size only (misaligned, for the fuser's refusal)."""
        r = self.rng
        k, s, p, d, out = self.geometry(size)
        if p == "same" or r.random() < 0.1:
            return (k, s, p, d, out), (k, s, p, d, out)
        slack = tuple(2 * pp - dd * (kk - 1) for kk, pp, dd in zip(k, p, d))
        options = []
        for k2 in range(1, 8):
            for d2 in (1, 2):
                ks = []
                for sl in slack:
                    twice = sl + d2 * (k2 - 1)
                    ks.append(twice // 2 if twice % 2 == 0 and 0 <= twice // 2 <= k2 else None)
                if all(x is not None for x in ks):
                    options.append(((k2,) * self.nd, s, tuple(ks), (d2,) * self.nd))
        k2, s2, p2, d2 = r.choice(options) if options else (k, s, p, d)
        out2 = self.out_size(size, k2, s2, p2, d2)
        if out2 != out:
            return (k, s, p, d, out), (k, s, p, d, out)
        return (k, s, p, d, out), (k2, s2, p2, d2, out2)

    def parallel(self, src: int) -> int:
        ga, gb = self.aligned_pair(self.shapes[src].size)
        a = self.conv(src, geom=ga)
        b = self.conv(src, geom=gb, cout=self.shapes[a].c)
        if self.shapes[a].c != self.shapes[b].c:  # groups forced another width: bridge with a 1x1
            b = self.conv(b, geom=((1,) * self.nd, (1,) * self.nd, (0,) * self.nd, (1,) * self.nd,
                                   self.shapes[b].size), cout=self.shapes[a].c)
        self.features.add("parallel")
        return self.add(a, b)

    def concat(self, src: int) -> int:
        ga, gb = self.aligned_pair(self.shapes[src].size)
        a = self.conv(src, geom=ga)
        b = self.conv(src, geom=gb)
        if self.rng.random() < 0.5:
            a = self.act(a)
        self.features.add("concat")
        c = self.shapes[a].c + self.shapes[b].c
        return self.emit(("cat", [a, b]), _Shape(c, self.shapes[a].size))

    def pool(self, src: int) -> int:
        r, sh = self.rng, self.shapes[src]
        if min(sh.size) < 2:
            return self.act(src)
        kind = r.choice(["max", "avg"])
        self.features.add(f"{kind}pool")
        P = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("avg", 1): nn.AvgPool1d,
             ("avg", 2): nn.AvgPool2d}[(kind, self.nd)]
        out = tuple(n // 2 for n in sh.size)
        return self.add_module("pool", P(2, 2), src, _Shape(sh.c, out))

    def shared(self, src: int) -> int:
        """A shape-preserving conv module called at two sites."""
        sh = self.shapes[src]
        reuse = [n for n, c in self.reusable if c == sh.c]
        self.features.add("shared_module")
        if reuse and self.rng.random() < 0.5:
            return self.emit(("call", self.rng.choice(reuse), src), sh)
        v = self.conv(src, preserve=True, cout=sh.c, functional=False)
        name = self.mod.program[-1][1]
        m = getattr(self.mod, name)
        if m.out_channels != sh.c:
            return v
        self.reusable.append((name, sh.c))
        if self.rng.random() < 0.5:
            v = self.act(v)
        return self.emit(("call", name, v), self.shapes[v])

    def block_body(self, n_ops: int) -> None:
        r = self.rng
        ops = ["conv_bn_act"] * 4 + ["residual"] * 2 + ["parallel", "concat", "pool", "shared", "bn", "act",
                                                         "identity"]
        v = 0
        for _ in range(n_ops):
            op = r.choice(ops)
            v = getattr(self, op)(v)  # every op returns the value it emitted last: the block's output


def check_limits(limits: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in limits.items():
        if key not in LIMITS and key not in ("nd", "head"):
            raise TypeError(f"random_model() got an unknown limit {key!r}; limits: {', '.join(sorted(LIMITS))}, nd, head")
    for key, (default, lo, hi) in LIMITS.items():
        v = limits.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"random_model({key}=...) must be an integer in [{lo}, {hi}], got {v!r}")
        out[key] = v
    nd = limits.get("nd")
    if nd not in (None, 1, 2):
        raise ValueError(f"random_model(nd=...) must be 1, 2 or None (random), got {nd!r}")
    head = limits.get("head")
    if head not in (None, True, False):
        raise ValueError(f"random_model(head=...) must be True, False or None (random), got {head!r}")
    out["nd"], out["head"] = nd, head
    return out


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Random BatchNorm running statistics and affine parameters (default ones hide folding bugs),
    then the same for the functional batch norms' buffers and parameters."""
    randomize_bn(model, generator=gen)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("_mean") and not name.endswith("running_mean"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 2 - 1)
            elif name.endswith("_var") and not name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 1.5 + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("_weight") and "fbn" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("_bias") and "fbn" in name:
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)


def random_model(seed: int, **limits: Any) -> tuple[RandomNet, tuple[torch.Tensor, ...]]:
    """A random, valid, traceable CNN and example inputs, reproducible from ``seed``.

    Returns ``(model, example_inputs)``: a :class:`RandomNet` in eval mode (float32) and a tuple
    holding one input tensor of shape ``(batch, C, L)`` (Conv1d models) or ``(batch, C, H, W)``.
    The same seed and limits always give the same architecture, weights and inputs.

    The models combine, at random: Conv1d/Conv2d modules and ``F.conv1d``/``F.conv2d`` with
    parameters (kernel 1-7, odd and even, square and not; stride 1-2; padding 0..k or ``"same"``;
    dilation 1-2; groups 1, 2 or depthwise; with or without bias); BatchNorm with random running
    statistics and affine parameters (also ``affine=False``, ``track_running_stats=False`` and
    ``F.batch_norm``); ReLU, ReLU6, LeakyReLU, GELU, SiLU, Hardswish as modules or functions
    (``F.relu``, ``torch.relu``, ...); identity residual adds (``+`` and ``torch.add``); summed
    parallel branches; concatenation; max/avg pooling; ``nn.Identity``, eval-mode ``nn.Dropout`` and
    ``F.dropout(training=False)``; a conv module called at two sites; and a
    flatten + Linear head (``nn.Linear`` or ``F.linear``, with an optional BatchNorm1d). Layers are
    grouped in :class:`RandomBlock` submodules. ``model.features`` lists what was used.

    Limits (keyword arguments): ``max_blocks`` (default 3), ``max_ops`` per block (4),
    ``max_channels`` (8), ``max_size`` of each spatial dimension (12), ``batch`` (2), ``nd``
    (1 or 2; random by default) and ``head`` (True/False; random by default).

    Example::

        model, inputs = fxexpand.testing.random_model(7)
        small = fxexpand.contract(model, inputs, target="deploy")
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    lim = check_limits(limits)
    r = random.Random(seed)
    nd = lim["nd"] if lim["nd"] is not None else r.choice([1, 2])
    max_c = lim["max_channels"]
    c0 = r.randint(1, min(4, max_c))
    size = tuple(r.randint(min(6, lim["max_size"]), lim["max_size"]) for _ in range(nd)) if nd == 2 else \
        (r.randint(min(8, 2 * lim["max_size"]), 2 * lim["max_size"]),)
    features: set[str] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RandomNet(nd, seed, {k: v for k, v in lim.items() if v is not None})
        top = _Builder(r, nd, max_c, features, net, [_Shape(c0, size)])
        n_blocks = r.randint(1 if lim["max_blocks"] else 0, lim["max_blocks"])
        v = 0
        if r.random() < 0.5 or n_blocks == 0:  # a stem outside the blocks
            v = top.conv_bn_act(v)
        for _ in range(n_blocks):
            block = RandomBlock(nd)
            b = _Builder(r, nd, max_c, features, block, [top.shapes[v]])
            b.counter = top.counter
            b.block_body(r.randint(1, lim["max_ops"]))
            top.counter = b.counter
            v = top.add_module("block", block, v, b.shapes[len(block.program)])
        head = lim["head"] if lim["head"] is not None else r.random() < 0.75
        if head:
            v = _head(top, v)
        if not net.program:
            top.act(0)
        net.features = features
        out = top.shapes[len(net.program)]
        net.output_shape = (lim["batch"], out.c) + out.size  # what the builder predicts; tests check it
        gen = torch.Generator().manual_seed(seed)
        _randomize(net, gen)
        x = torch.randn((lim["batch"], c0) + size, generator=gen)
    net.eval()
    return net, (x,)


def _head(top: _Builder, v: int) -> int:
    r, sh = top.rng, top.shapes[v]
    if r.random() < 0.6 or math.prod(sh.size) * sh.c > 96:
        P = nn.AdaptiveAvgPool1d if top.nd == 1 else nn.AdaptiveAvgPool2d
        v = top.add_module("gap", P(1), v, _Shape(sh.c, (1,) * top.nd))
        top.features.add("global_pool")
    sh = top.shapes[v]
    v = top.emit(("flatten", v), _Shape(sh.c * math.prod(sh.size), (), flat=True))
    top.features.add("flatten")

    def linear(src: int, n_out: int) -> int:
        n_in = top.shapes[src].c
        bias = r.random() < 0.7
        if r.random() < 0.25:
            m = nn.Linear(n_in, n_out, bias=bias)
            w = top.name("fc_w")
            top.mod.register_parameter(w, nn.Parameter(m.weight.detach().clone()))
            b = None
            if bias:
                b = top.name("fc_b")
                top.mod.register_parameter(b, nn.Parameter(m.bias.detach().clone()))
            top.features.add("F.linear")
            return top.emit(("linear", w, b, src), _Shape(n_out, (), flat=True))
        top.features.add("Linear")
        return top.add_module("fc", nn.Linear(n_in, n_out, bias=bias), src, _Shape(n_out, (), flat=True))

    if r.random() < 0.4:
        v = linear(v, r.randint(2, 2 * top.max_c))
        if r.random() < 0.5:
            v = top.bn(v)
        v = top.act(v)
    return linear(v, r.randint(2, 10))
