"""LinearExpand (ExpandNets): over-parameterise a layer as a chain of linear layers.

Patterns and rewrites (no non-linearity between the new layers; installed as an
:class:`~fxexpand.core.ExpandedRegion` at the layer's name):

* ``mode="CL"`` — conv (C_in → C_out, k, s, p, d, g):
  ``1x1 (C_in → r·C_in, pad p) → k×k (r·C_in → r·C_out, stride s, dilation d) → 1x1 (→ C_out)``,
  all with groups g (so a depthwise conv stays depthwise after contraction);
* ``mode="CK"`` — odd square k > 3: ``(k−1)/2`` 3x3 convs (dilation d), the first padded by p, the
  stride on the last; widths as in the paper (Sec. 3.1): the first 3x3 outputs p_1 = r·C_in
  channels, the later ones p_i = r·C_out;
* ``mode="FC"`` — ``nn.Linear`` (m → n): ``m → r·m → r·n → n`` (``fc_layers=3``) or ``m → r·n → n``
  (``fc_layers=2``).

Which layers (``layers``): ``"all"`` — every eligible layer; ``"paper"`` — the paper's choice
(ExpandNets Sec. 4.1–4.2): only k×k convs with k > 1 (never 1x1 convs), and of those only the
*non-residual* ones when the model has residual adds (MobileNetV2: convs inside a branch that an add
joins are left alone, :func:`~fxexpand.core.residual_branch_nodes`); for FC only the hidden
``nn.Linear`` layers (not the one producing the output, :func:`~fxexpand.core.output_layers`).

``init="nonlinear"`` (the paper's **+Init**, Sec. 3.2): a ReLU — a
:class:`~fxexpand.core.DecayActivation` ``max(alpha·x, x)`` at alpha = 0 — sits between
consecutive factors, so the region is the ExpandNet's *nonlinear counterpart* (same parameters);
train it, then :func:`fxexpand.linearize` (alpha = 1, activations removed) turns it into the
ExpandNet with the trained weights, which is trained again and contracts exactly (``contract``
refuses the region while alpha < 1, like NetBooster's).

Padding sits on the first layer only (rule 1), so contraction is exact. The chain has no
BatchNorm and a bias only on its last layer, and only if the original layer has one, so every
selected layer contracts back to its original type and shapes.

Preconditions (checked when a layer is selected; otherwise it is left alone and the report says
why): ``nn.Conv1d``/``nn.Conv2d`` (CL, CK) or ``nn.Linear`` (FC), called from one place (rule 7),
with zero padding mode and representable padding; CK needs a square odd kernel larger than 3.

``init="preserve"`` (not in the papers): the chain computes exactly the original layer's function at
initialisation with every factor full-rank. For factors A (first), B (middle), C (last) with the
original weight W: A has orthonormal columns, C orthonormal rows, and
``B = C⁺ W A⁺ + (I − C⁺C) R`` with random R, so ``C B A = W`` while B is generically full-rank.
CK chains cannot represent an arbitrary k×k kernel with few channels, so ``init="preserve"`` is
refused for CK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from ..core import (
    CONV_TYPES,
    DecayActivation,
    ExpandedRegion,
    Pass,
    PassResult,
    conv_problem,
    norm_padding,
    output_layers,
    register_pass,
    residual_branch_nodes,
    select_targets,
    set_module,
)

__all__ = ["LinearExpand", "preserve_factors"]


@register_pass("linear_expand")
@dataclass(kw_only=True)
class LinearExpand(Pass):
    """ExpandNets' linear expansion (CL, CK or FC) of selected layers.

    Args:
        mode: "CL", "CK" or "FC".
        ratio: width multiplier r of the inner layers.
        targets: None (every eligible layer; see ``fraction``), "blocks", names or a predicate.
        fraction: share of eligible layers when ``targets`` is None (default 1.0: all).
        init: "random" (PyTorch's default init), "preserve" (exactly the original function) or
            "nonlinear" (+Init: ReLUs between the factors; the nonlinear counterpart).
        layers: "all" eligible layers or the paper's choice ("paper": k×k convs with k > 1, only
            non-residual ones in residual models; hidden FC layers only).
        fc_layers: 2 or 3 linear layers for FC.
        seed: seed for the random parts of ``init="preserve"``.
    """

    mode: Literal["CL", "CK", "FC"] = "CL"
    ratio: int = 4
    targets: Any = None
    fraction: float = 1.0
    init: Literal["random", "preserve", "nonlinear"] = "random"
    fc_layers: int = 3
    seed: int = 0
    layers: Literal["all", "paper"] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("CL", "CK", "FC"):
            raise ValueError(f"mode must be 'CL', 'CK' or 'FC', got {self.mode!r}")
        if self.init not in ("random", "preserve", "nonlinear"):
            raise ValueError("init must be 'random', 'preserve' or 'nonlinear'")
        if self.layers not in ("all", "paper"):
            raise ValueError(f"layers must be 'all' or 'paper', got {self.layers!r}")
        if self.ratio < 1:
            raise ValueError("ratio must be >= 1")
        if self.fc_layers not in (2, 3):
            raise ValueError("fc_layers must be 2 or 3")
        if self.mode == "CK" and self.init == "preserve":
            raise ValueError("init='preserve' is not available for CK: a chain of 3x3 convs with r·C channels "
                             "cannot represent an arbitrary k×k kernel; use CL or FC")
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)

    def _paper_problem(self, gm: fx.GraphModule, node: fx.Node, m: nn.Module) -> str:
        if self.layers != "paper":
            return ""
        if self.mode == "FC":
            if node.target in self._outputs:
                return "produces the output (layers='paper' expands hidden FC layers only)"
            return ""
        if all(k == 1 for k in getattr(m, "kernel_size", (1,))):
            return "1x1 conv (layers='paper' expands k×k convs only)"
        if node in self._residual:
            return "inside a residual branch (layers='paper' expands non-residual convs only)"
        return ""

    def _eligible(self, gm: fx.GraphModule, node: fx.Node, m: nn.Module) -> str:
        problem = self._basic_problem(gm, node, m)
        return problem or self._paper_problem(gm, node, m)

    def _basic_problem(self, gm: fx.GraphModule, node: fx.Node, m: nn.Module) -> str:
        if self.mode == "FC":
            return "" if type(m) is nn.Linear else f"{type(m).__name__} is not nn.Linear (mode FC)"
        problem = conv_problem(m, f" (mode {self.mode})")
        if problem:
            return problem
        if self.mode == "CK":
            k = tuple(m.kernel_size)
            if len(set(k)) != 1 or k[0] <= 3 or k[0] % 2 == 0:
                return f"kernel {k} is not square, odd and larger than 3 (mode CK)"
        return ""

    def build_block(self, layer: nn.Module) -> nn.Sequential:
        r = self.ratio
        if self.mode == "FC":
            m, n, bias = layer.in_features, layer.out_features, layer.bias is not None
            if self.fc_layers == 3:
                return self._chain([nn.Linear(m, r * m, bias=False), nn.Linear(r * m, r * n, bias=False),
                                    nn.Linear(r * n, n, bias=bias)])
            return self._chain([nn.Linear(m, r * n, bias=False), nn.Linear(r * n, n, bias=bias)])
        nd = 1 if isinstance(layer, nn.Conv1d) else 2
        Conv = CONV_TYPES[nd]
        cin, cout, g = layer.in_channels, layer.out_channels, layer.groups
        k, s, d = tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation)
        pad = norm_padding(layer.padding, k, d)
        bias = layer.bias is not None
        if self.mode == "CL":
            return self._chain([
                Conv(cin, r * cin, 1, padding=pad, groups=g, bias=False),
                Conv(r * cin, r * cout, k, stride=s, dilation=d, groups=g, bias=False),
                Conv(r * cout, cout, 1, groups=g, bias=bias),
            ])
        n = (k[0] - 1) // 2
        convs = [Conv(cin, r * cin, 3, padding=pad, dilation=d, groups=g, bias=False, stride=s if n == 1 else 1)]
        width = r * cin
        for i in range(1, n):
            last = i == n - 1
            convs.append(Conv(width, cout if last else r * cout, 3, dilation=d, groups=g,
                              stride=s if last else 1, bias=bias if last else False))
            width = r * cout
        return self._chain(convs)

    def _chain(self, layers: list[nn.Module]) -> nn.Sequential:
        """The factors in order; with ``init="nonlinear"`` a ReLU between consecutive ones."""
        if self.init != "nonlinear":
            return nn.Sequential(*layers)
        out: list[nn.Module] = []
        for i, layer in enumerate(layers):
            if i:
                out.append(DecayActivation(nn.ReLU(), kind="leaky", alpha=0.0))
            out.append(layer)
        return nn.Sequential(*out)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        self._residual = residual_branch_nodes(gm) if self.layers == "paper" else set()
        self._outputs = output_layers(gm) if self.layers == "paper" else set()
        chosen, skipped = select_targets(gm, targets=self.targets, fraction=self.fraction,
                                         eligible=self._eligible, pass_name=self.name)
        notes = [self.note("skipped", name, reason) for name, reason in skipped]
        gen = torch.Generator().manual_seed(self.seed)
        for node in chosen:
            layer = gm.get_submodule(node.target)
            body = self.build_block(layer).to(device=layer.weight.device, dtype=layer.weight.dtype)
            if self.init == "preserve":
                preserve_factors(layer, body, gen)
            set_module(gm, node.target, ExpandedRegion(body, layer, method=f"LinearExpand[{self.mode}]"))
            notes.append(self.note("expanded", node.target, f"{self.mode} x{self.ratio}, init={self.init}"))
        self._residual, self._outputs = set(), set()
        return PassResult(gm, bool(chosen), notes)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A rows×cols matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q if rows >= cols else q.T


@torch.no_grad()
def preserve_factors(layer: nn.Module, body: nn.Sequential, gen: torch.Generator) -> None:
    """Set the chain's weights so that it computes ``layer`` exactly (see the module docstring)."""
    layers = list(body)
    W = layer.weight.detach().double()
    g = getattr(layer, "groups", 1)
    first, last = layers[0], layers[-1]
    mids = layers[1:-1]
    if isinstance(layer, nn.Linear):
        g = 1
    taps = tuple(W.shape[2:])
    co, ci = W.shape[0] // g, W.shape[1]
    a_out = first.weight.shape[0] // g
    c_in = last.weight.shape[1]
    A = torch.zeros(first.weight.shape, dtype=torch.float64)
    C = torch.zeros(last.weight.shape, dtype=torch.float64)
    Bs = torch.zeros(mids[0].weight.shape, dtype=torch.float64) if mids else None
    for gi in range(g):
        Wg = W[gi * co:(gi + 1) * co]
        Ag = _orthonormal(a_out, ci, gen)                     # (a, ci): orthonormal columns
        if not mids:                                          # two factors: C A = W
            Wm = Wg.reshape(co, ci)
            Ap = torch.linalg.pinv(Ag)
            Cg = Wm @ Ap + torch.randn(co, a_out, generator=gen, dtype=torch.float64) @ (
                torch.eye(a_out, dtype=torch.float64) - Ag @ Ap) * 0.1
            A[gi * a_out:(gi + 1) * a_out] = Ag.reshape(A[gi * a_out:(gi + 1) * a_out].shape)
            C[gi * co:(gi + 1) * co] = Cg.reshape(C[gi * co:(gi + 1) * co].shape)
            continue
        Cg = _orthonormal(co, c_in, gen)                      # (co, b): orthonormal rows
        Ap, Cp = torch.linalg.pinv(Ag), torch.linalg.pinv(Cg)
        b = c_in
        null = torch.eye(b, dtype=torch.float64) - Cp @ Cg
        bsz = Bs.shape[0] // g
        Wt = Wg.reshape(co, ci, -1)
        Bg = torch.empty(bsz, a_out, Wt.shape[2], dtype=torch.float64)
        for t in range(Wt.shape[2]):
            R = torch.randn(b, a_out, generator=gen, dtype=torch.float64) * (1.0 / max(a_out, 1) ** 0.5)
            Bg[:, :, t] = Cp @ Wt[:, :, t] @ Ap + null @ R
        A[gi * a_out:(gi + 1) * a_out] = Ag.reshape(A[gi * a_out:(gi + 1) * a_out].shape)
        C[gi * co:(gi + 1) * co] = Cg.reshape(C[gi * co:(gi + 1) * co].shape)
        Bs[gi * bsz:(gi + 1) * bsz] = Bg.reshape((bsz, a_out) + tuple(taps))
    first.weight.copy_(A.to(first.weight.dtype))
    last.weight.copy_(C.to(last.weight.dtype))
    if mids:
        mids[0].weight.copy_(Bs.to(mids[0].weight.dtype))
    if layer.bias is not None:
        last.bias.copy_(layer.bias.detach())
