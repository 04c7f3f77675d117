"""InsertInvertedResidual (NetBooster): replace a conv with an inverted residual block.

Pattern: a ``call_module`` ``nn.Conv1d``/``nn.Conv2d`` (``C_in → C_out``, kernel k, stride s,
padding p, dilation d, groups g), called from one place.

Rewrite (installed as an :class:`~fxexpand.core.ExpandedRegion` at the conv's name)::

    1x1 expand (C_in → R·C_in, groups g, padding p) → BN → act
      → depthwise (kernel 1, or k with dilation d for kernel_size="match"; stride s; unpadded) → BN → act
      → 1x1 project (R·C_in → C_out, groups g, bias as the original)
    (+ identity shortcut when C_in == C_out, stride 1, the output grid equals the input's and the
     input position falls on a tap of the original kernel: padding a multiple of the dilation)

Exactness (DESIGN rules 1–4): the padding sits on the *first* conv of the chain, so once the
activations decay to the identity, BN folding and conv∘conv fusion give back one conv with the
original kernel k + 0, stride s, padding p, dilation d and groups g — plus the identity kernel for
the shortcut.

Initialisation (``init="scaled"``, the default; issue 25). NetBooster (Sec. 3.3, App. A) inherits
MobileNetV2's block and says nothing about initialising it; with PyTorch's layer defaults the giant
started badly scaled (gradient norm 18x the original's on mobilenet_v2, eval logits 1e10 after one SGD
step on mnasnet0_5). Two causes, each fixed by a choice that can be stated:

* BatchNorm → act → conv → BatchNorm multiplies the back-propagated gradient by
  E[act'(z)²] / Var[act(z)] (z ~ N(0, 1)): BatchNorm removes the activation's mean, so the forward
  signal loses power the backward pass does not — π/(π−1) ≈ 1.47 for ReLU (Yang et al., ICLR 2019,
  "A mean field theory of batch normalization"). Each block adds two such layers. The block's
  BatchNorms start at γ = 1 and β = :func:`block_shift` (1.5 for the ReLU family, SiLU, GELU and
  Hardswish, whose gain falls to ≈ 1.05; 0 where a shift does not help, e.g. tanh), so about 93 % of
  the hidden units are active at initialisation and the gain per layer is ≈ 1.05. Training moves β.
* The kernel-1 depthwise conv is a per-channel scale that the next BatchNorm divides away; a random
  weight near 0 only gives itself a gradient ∝ 1/w. It starts at 1 (k×k depthwise kernels: fan-in).
* Expand conv: fan-in normal (the next BatchNorm sets its scale). Project conv: fan-in normal with
  each output's weights centred to sum to zero — the shift gives all hidden channels the same mean,
  which then cancels — scaled so that the block's output variance equals the original conv's gain on
  a unit-variance input (its mean squared row norm); its bias starts at 0. The block's output then has
  the scale the replaced layer had, with or without a BatchNorm after it.

Measured (tests/passes/test_insert_inverted_residual.py, batch 2 at 64x64): gradient norm at
initialisation 0.9–1.8x the original's on mobilenet_v2, mnasnet0_5, resnet18, efficientnet_b0 and
timm mobilenetv3_small_050, eval max |logit| after one step 0.9–3.4x. ``init="torch"`` keeps PyTorch's
defaults (the old behaviour).

A conv on globally pooled features (a squeeze-excitation gate, a head conv after global pooling) is
not a target: the block's BatchNorms would normalise over the batch alone.

Preconditions (checked when a layer is selected; a layer that fails one is left alone and the
report says why): a Conv1d/Conv2d with zero padding mode and representable padding, called from
one place (rule 7); pointwise unless ``kernel_size`` allows k×k. Folding the block's BatchNorms
gives the contracted conv a bias, so a conv built with ``bias=False`` is expanded only when a
BatchNorm module (running statistics, called once) is the only user of its output and can absorb
that bias; otherwise ``contract`` could not restore it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..core import (
    BN_TYPES,
    CONV_TYPES,
    ExpandedRegion,
    Pass,
    PassResult,
    Residual,
    activation_near,
    bias_sink,
    conv_problem,
    module_call_counts,
    norm_padding,
    pooled_input,
    register_pass,
    select_targets,
    set_module,
)

__all__ = ["InsertInvertedResidual"]

@register_pass("insert_inverted_residual")
@dataclass(kw_only=True)
class InsertInvertedResidual(Pass):
    """NetBooster's expansion: an inverted residual block in place of selected convs.

    Args:
        ratio: expansion ratio R of the hidden width (R·C_in).
        fraction: share of eligible layers (or of blocks, with ``targets="blocks"``) to expand.
        targets: None, "blocks", a list of qualified names, or a predicate ``fn(name, module)``.
        kernel_size: 1 (expand pointwise convs only; depthwise kernel 1), "match" (expand any
            conv; the depthwise conv gets the target's kernel, as in NetBooster's ResNet setting) or
            "auto" ("match", but in each block prefer a pointwise conv when it has one).
        activation: activation class for the block; default: the one the model uses next to the target.
        shortcut: add the identity shortcut where shapes allow.
        init: "scaled" (default; see the module docstring) or "torch" (PyTorch's default layer
            initialisation, the behaviour before fxexpand 0.2: the giant's gradients grow ~1.47x per
            inserted BatchNorm-ReLU layer, 18x on mobilenet_v2).
    """

    ratio: int = 6
    fraction: float = 0.5
    targets: Any = None
    kernel_size: Any = 1
    activation: Any = None
    shortcut: bool = True
    init: str = "scaled"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio < 1:
            raise ValueError("ratio must be >= 1")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must lie in [0, 1]")
        if self.init not in ("scaled", "torch"):
            raise ValueError("init must be 'scaled' (well-scaled giant, the default) or 'torch' (PyTorch's layer defaults)")
        if self.kernel_size not in (1, "match", "auto"):
            raise ValueError("kernel_size must be 1, 'match' or 'auto'")
        if self.activation is not None and not (isinstance(self.activation, type) and issubclass(self.activation, nn.Module)):
            raise TypeError("activation must be an nn.Module class such as torch.nn.ReLU6")
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)

    def _eligible(self, gm: fx.GraphModule, node: fx.Node, m: nn.Module, calls) -> str:
        problem = conv_problem(m)
        if problem:
            return problem
        if self.kernel_size == 1 and any(k != 1 for k in m.kernel_size):
            return "not a pointwise conv (use kernel_size='match' to expand k×k convs)"
        pool = pooled_input(gm, node)
        if pool:
            return (f"acts on globally pooled features ({pool}: a squeeze-excitation gate or a head conv); "
                    "the block's BatchNorms would normalise over the batch alone")
        if m.bias is None:
            _, why = bias_sink(gm, node, calls)
            if why:
                return ("bias=False and no BatchNorm can absorb the bias the block's BatchNorms give it "
                        f"at contraction ({why})")
        return ""

    def build_block(self, conv: nn.Module, act: nn.Module) -> nn.Module:
        nd = 1 if isinstance(conv, nn.Conv1d) else 2
        cin, cout, g = conv.in_channels, conv.out_channels, conv.groups
        hidden = self.ratio * cin
        pad = norm_padding(conv.padding, tuple(conv.kernel_size), tuple(conv.dilation))
        k = tuple(conv.kernel_size) if self.kernel_size != 1 else (1,) * nd
        dil = tuple(conv.dilation) if self.kernel_size != 1 else (1,) * nd
        Conv, BN = CONV_TYPES[nd], BN_TYPES[nd]
        body = nn.Sequential(
            Conv(cin, hidden, 1, padding=pad, groups=g, bias=False),
            BN(hidden),
            copy.deepcopy(act),
            Conv(hidden, hidden, k, stride=tuple(conv.stride), dilation=dil, groups=hidden, bias=False),
            BN(hidden),
            copy.deepcopy(act),
            Conv(hidden, cout, 1, groups=g, bias=conv.bias is not None),
        )
        # the shortcut must land on a tap of the original kernel (p a multiple of d), or the
        # contracted conv + identity kernel is not a conv of the original geometry (e.g. k=4, d=2)
        same_grid = all(s == 1 for s in conv.stride) and all(
            2 * p == d * (kk - 1) and p % d == 0 for p, d, kk in zip(pad, conv.dilation, conv.kernel_size))
        if self.init == "scaled":
            # the original layer's gain on a unit-variance input: its mean squared row norm
            gain = float(conv.weight.detach().double().flatten(1).square().sum(1).mean())
            _init_block(body, act, gain)
        if self.shortcut and cin == cout and same_grid:
            body = Residual(body)
        return body

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        calls = module_call_counts(gm)
        chosen, skipped = select_targets(gm, targets=self.targets, fraction=self.fraction,
                                         eligible=lambda g, n, m: self._eligible(g, n, m, calls), pass_name=self.name,
                                         prefer_pointwise=self.kernel_size == "auto")
        notes = [self.note("skipped", name, reason) for name, reason in skipped]
        for node in chosen:
            conv = gm.get_submodule(node.target)
            act = self.activation() if self.activation is not None else activation_near(gm, node)
            body = self.build_block(conv, act).to(device=conv.weight.device, dtype=conv.weight.dtype)
            set_module(gm, node.target, ExpandedRegion(body, conv, method="InsertInvertedResidual"))
            notes.append(self.note("expanded", node.target,
                                   f"inverted residual x{self.ratio}, {type(act).__name__}"
                                   + (", shortcut" if isinstance(body, Residual) else "")))
        return PassResult(gm, bool(chosen), notes)


_SHIFTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def _moments(act: nn.Module, shift: float) -> tuple[float, float, float]:
    """(E[h^2], Var[h], E[act'(z + shift)^2]) of h = act(z + shift), z ~ N(0, 1), by quadrature (float64)."""
    z = torch.linspace(-10.0, 10.0, 8001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    with torch.enable_grad():
        zz = (z + shift).requires_grad_(True)
        h = copy.deepcopy(act).double()(zz)
        (d,) = torch.autograd.grad(h.sum(), zz)
    h = h.detach()
    m1, m2 = float((h * pdf).sum()), float((h * h * pdf).sum())
    return m2, m2 - m1 * m1, float((d * d * pdf).sum())


def block_shift(act: nn.Module) -> float:
    """The BatchNorm shift β in [0, 1.5] that minimises the gradient gain E[act'²] / Var[act] of a
    BatchNorm → act → (conv → BatchNorm) layer (1.47 for ReLU at β = 0, 1.05 at β = 1.5)."""
    gains = [(_moments(act, c)[2] / max(_moments(act, c)[1], 1e-12), c) for c in _SHIFTS]
    return min(gains)[1]


def _init_block(body: nn.Sequential, act: nn.Module, gain: float = 1.0) -> None:
    """The "scaled" initialisation (module docstring): fan-in convs, identity kernel-1 depthwise,
    BatchNorm γ = 1 and β = :func:`block_shift`, a centred, unit-variance projection."""
    expand, bn1, _, dw, bn2, _, project = body
    shift = block_shift(act)
    m2, var, _ = _moments(act, shift)
    with torch.no_grad():
        nn.init.kaiming_normal_(expand.weight, mode="fan_in", nonlinearity="linear")
        for bn in (bn1, bn2):
            bn.weight.fill_(1.0)
            bn.bias.fill_(shift)
        if dw.weight[0].numel() == 1:
            dw.weight.fill_(1.0)  # a per-channel scale the next BatchNorm removes: start at 1
        else:
            nn.init.kaiming_normal_(dw.weight, mode="fan_in", nonlinearity="linear")
        fan_in = project.weight[0].numel()
        w = project.weight.normal_()
        if fan_in > 1:
            # rows summing to zero cancel the activations' common mean (set by the shift)
            w -= w.mean(dim=tuple(range(1, w.dim())), keepdim=True)
        else:
            var = m2
        # output variance = the original layer's gain: fan_in · Var(w) · Var(h) = gain
        w *= math.sqrt(gain) / (float(w.std()) * math.sqrt(fan_in * var)) if w.numel() > 1 else math.sqrt(gain / var)
        if project.bias is not None:
            project.bias.zero_()
