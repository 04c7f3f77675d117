"""InsertInvertedResidualPass (NetBooster): replace a conv with an inverted residual block.

Pattern: a ``call_module`` ``nn.Conv1d``/``nn.Conv2d`` (``C_in → C_out``, kernel k, stride s,
padding p, dilation d, groups g), called from one place.

Rewrite (installed as an :class:`~fxexpand.provenance.ExpandedRegion` at the conv's name)::

    1x1 expand (C_in → R·C_in, groups g, padding p) → BN → act
      → depthwise (kernel 1, or k with dilation d for kernel_size="match"; stride s; unpadded) → BN → act
      → 1x1 project (R·C_in → C_out, groups g, bias as the original)
    (+ identity shortcut when C_in == C_out, stride 1, the output grid equals the input's and the
     input position falls on a tap of the original kernel: padding a multiple of the dilation)

Exactness (DESIGN rules 1–4): the padding sits on the *first* conv of the chain, so once the
activations decay to the identity, BN folding and conv∘conv fusion give back one conv with the
original kernel k + 0, stride s, padding p, dilation d and groups g — plus the identity kernel for
the shortcut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from ..graph import CONV_TYPES, _norm_padding, set_module
from ..infra import Pass, PassResult, register_pass
from ..modules import Residual
from ..provenance import ExpandedRegion
from ._select import activation_near, conv_problem, select_targets

__all__ = ["InsertInvertedResidualPass", "InsertInvertedResidual"]

logger = logging.getLogger(__name__)

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


@register_pass("insert_inverted_residual")
@dataclass(kw_only=True)
class InsertInvertedResidualPass(Pass):
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

    def _eligible(self, name: str, m: nn.Module) -> str:
        problem = conv_problem(m)
        if problem:
            return problem
        if self.kernel_size == 1 and any(k != 1 for k in m.kernel_size):
            return "not a pointwise conv (use kernel_size='match' to expand k×k convs)"
        return ""

    def build_block(self, conv: nn.Module, act: nn.Module) -> nn.Module:
        nd = 1 if isinstance(conv, nn.Conv1d) else 2
        cin, cout, g = conv.in_channels, conv.out_channels, conv.groups
        hidden = self.ratio * cin
        pad = _norm_padding(conv.padding, tuple(conv.kernel_size), tuple(conv.dilation))
        k = tuple(conv.kernel_size) if self.kernel_size != 1 else (1,) * nd
        dil = tuple(conv.dilation) if self.kernel_size != 1 else (1,) * nd
        Conv, BN = CONV_TYPES[nd], _BN[nd]
        body = nn.Sequential(
            Conv(cin, hidden, 1, padding=pad, groups=g, bias=False),
            BN(hidden),
            _clone(act),
            Conv(hidden, hidden, k, stride=tuple(conv.stride), dilation=dil, groups=hidden, bias=False),
            BN(hidden),
            _clone(act),
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
        chosen, skipped = select_targets(gm, targets=self.targets, fraction=self.fraction,
                                         eligible=self._eligible, pass_name=self.name,
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


def _clone(act: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(act)


InsertInvertedResidual = InsertInvertedResidualPass
