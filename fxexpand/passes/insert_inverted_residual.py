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

Preconditions (checked when a layer is selected; a layer that fails one is left alone and the
report says why): a Conv1d/Conv2d with zero padding mode and representable padding, called from
one place (rule 7); pointwise unless ``kernel_size`` allows k×k. Folding the block's BatchNorms
gives the contracted conv a bias, so a conv built with ``bias=False`` is expanded only when a
BatchNorm module (running statistics, called once) is the only user of its output and can absorb
that bias; otherwise ``contract`` could not restore it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

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
    """

    ratio: int = 6
    fraction: float = 0.5
    targets: Any = None
    kernel_size: Any = 1
    activation: Any = None
    shortcut: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio < 1:
            raise ValueError("ratio must be >= 1")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must lie in [0, 1]")
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
