"""AugmentWidth: NetAug's weight-shared augmented model around the tiny model (Cai et al., ICLR 2022).

Pattern: every *free* channel group of the traced model (:func:`fxexpand.core.analyse` with
LayerNorm accepted: channels tied across residual adds, concatenation, depthwise convs,
squeeze-excitation gates and flatten → Linear), i.e. a group produced by a conv / linear that
reaches no graph input or output and no operation that is not understood channel-wise. Frozen
groups (inputs, outputs, reshapes and channel shuffles, attention, grouped non-depthwise convs,
modules called twice, layer subclasses with extra behaviour) keep their width; the notes say why.
timm's ``BatchNormAct2d`` (a BatchNorm followed by parameter-free ``drop`` and ``act`` modules) is
not frozen: it becomes a :class:`~fxexpand.core.DynamicBatchNorm` that applies them.

Rewrite: every Conv1d/2d/3d (dense or depthwise), Linear, BatchNorm1d/2d/3d and LayerNorm (over the
last dim) that reads or writes a free group becomes a :class:`~fxexpand.core.DynamicLayer` at the
same qualified name, holding the largest widths' parameters with the original ones in its leading
(base) slice and the new entries drawn from PyTorch's default initialisation of the larger layer
(BatchNorm/LayerNorm: weight 1, bias 0, mean 0, variance 1).

Axes (paper §3.2, Fig. 2 right): a group tied by a residual add is a "width" group (block output
width, the width multiplier); any other group is an "expand" group (a block's hidden width, the
expand ratio). Each axis has its own multipliers; by default both are the paper's augmentation factor
``r`` and diversity factor ``s``: ``s + 1`` values evenly spaced from 1 to ``r`` (r = 3, s = 2 gives
1, 2, 3). A group of base width ``w`` then takes widths ``round(m · w)`` and its largest width is
``round(r · w)``. ``stop_width_at`` (fraction of training; the official scripts stop width
augmentation at epoch 75 of 150) is recorded for :class:`fxexpand.WidthSampler`.

Base mode is the tiny model exactly: every layer computes the original layer on its base slice.
Contraction (:class:`~fxexpand.passes.ExtractBase`) slices it back to the original architecture.

Preconditions (``requires``, before any change): shapes are known (``example_inputs`` given to
``compile``), multipliers are >= 1 and start at 1, and the model has at least one free group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from ..core import (
    DYNAMIC_SOURCES,
    DynamicBatchNorm,
    DynamicConv,
    DynamicLayer,
    DynamicLayerNorm,
    DynamicLinear,
    Pass,
    PassResult,
    PreconditionError,
    WidthGroup,
    WidthRecord,
    analyse,
    get_module,
    register_pass,
    require_shapes,
    set_module,
    set_record,
)

__all__ = ["AugmentWidth"]


def _multipliers(given: Sequence[float] | None, factor: float, diversity: int) -> list[float]:
    if given is None:
        return [1.0 + (factor - 1.0) * i / diversity for i in range(diversity + 1)]
    return [float(m) for m in given]


@register_pass("augment_width")
@dataclass(kw_only=True)
class AugmentWidth(Pass):
    """Make every free channel group augmentable (NetAug).

    Args:
        factor: augmentation factor r: the largest width is r times the base width.
        diversity: diversity factor s: s + 1 multipliers evenly spaced from 1 to r.
        width_multipliers: explicit multipliers of "width" groups (official MobileNetV2 scripts:
            ``[1.0, 1.8, 2.6]``); default from ``factor`` / ``diversity``.
        expand_multipliers: explicit multipliers of "expand" groups (official: ``[1.0, 1.6, 2.2, 2.8]``).
        stop_width_at: fraction of training after which "width" groups stay at their base width
            (paper scripts: 0.5); None never stops.
        seed: seed of the new parameters' initialisation.
    """

    factor: float = 3.0
    diversity: int = 2
    width_multipliers: Sequence[float] | None = None
    expand_multipliers: Sequence[float] | None = None
    stop_width_at: float | None = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.diversity, int) and self.diversity >= 1):
            raise ValueError(f"diversity must be an integer >= 1, got {self.diversity!r}")
        if not float(self.factor) >= 1.0:
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")
        for name in ("width_multipliers", "expand_multipliers"):
            ms = getattr(self, name)
            if ms is None:
                continue
            ms = [float(m) for m in ms]
            if not ms or ms[0] != 1.0 or any(m < 1.0 for m in ms) or any(not math.isfinite(m) for m in ms):
                raise ValueError(f"{name} must start at 1.0 and contain only finite values >= 1, got {ms}")
            setattr(self, name, ms)
        if self.stop_width_at is not None and not 0.0 <= float(self.stop_width_at) <= 1.0:
            raise ValueError(f"stop_width_at must be in [0, 1] or None, got {self.stop_width_at!r}")

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_shapes(graph_module, "AugmentWidth")
        if any(isinstance(m, DynamicLayer) for m in graph_module.modules()):
            raise PreconditionError("the model is already augmented (it has dynamic layers)")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        an = analyse(gm, layer_norm=True)
        frozen = dict(an.frozen)
        for la in an.layers:  # layer subclasses with extra behaviour stay as they are (timm's BatchNormAct2d,
            mod = get_module(gm, la.name)  # a BatchNorm + drop + act, becomes a DynamicBatchNorm)
            if type(mod) not in DYNAMIC_SOURCES and not (la.kind == "bn" and DynamicBatchNorm.accepts(mod)):
                spaces = list(la.inp.spaces if la.inp is not None else ()) + ([la.out] if la.out else [])
                for s in spaces:
                    frozen.setdefault(an.group_of[s], f"{type(mod).__name__} {la.name} is not a plain torch.nn layer")
        produced = {an.group_of[la.out] for la in an.layers if la.out is not None}
        mults = {"width": _multipliers(self.width_multipliers, float(self.factor), self.diversity),
                 "expand": _multipliers(self.expand_multipliers, float(self.factor), self.diversity)}
        groups: dict[str, WidthGroup] = {}
        notes = []
        for gid in an.members:
            if gid not in produced:
                continue
            if gid in frozen:
                notes.append(self.note("frozen", gid, frozen[gid]))
                continue
            axis = "width" if gid in an.residual else "expand"
            base = an.group_size(gid)
            choices = sorted({max(base, round(m * base)) for m in mults[axis]})
            if choices[-1] == base:
                notes.append(self.note("skipped", gid, f"multipliers {mults[axis]} give no wider choice for "
                                                       f"{base} channels"))
                continue
            groups[gid] = WidthGroup(axis, base, choices[-1], choices)
        if not groups:
            raise PreconditionError("AugmentWidth found no channel group it can augment: "
                                    + "; ".join(f"{n.where}: {n.reason}" for n in notes[:6]))
        width_of = {g: (groups[g].max if g in groups else an.group_size(g)) for g in an.members}
        gen = torch.Generator().manual_seed(int(self.seed))
        for la in an.layers:
            spaces = list(la.inp.spaces if la.inp is not None else ()) + ([la.out] if la.out else [])
            touched = sorted({an.group_of[s] for s in spaces if an.group_of[s] in groups})
            if not touched:
                continue
            mod = get_module(gm, la.name)
            dyn = self._dynamic(mod, la, an, width_of, gen)
            set_module(gm, la.name, dyn)
            for g in touched:
                groups[g].layers.append(la.name)
        for gid, spec in groups.items():
            notes.append(self.note("augmented", gid, f"{spec.axis} group, {len(spec.layers)} layers: "
                                                     f"{spec.base} -> widths {spec.choices}"))
        set_record(gm, WidthRecord(groups, {g: r for g, r in frozen.items() if g in produced},
                                   None if self.stop_width_at is None else float(self.stop_width_at)))
        gm.recompile()
        return PassResult(gm, True, notes)

    @staticmethod
    def _dynamic(mod, la, an, width_of: dict[str, int], gen: torch.Generator) -> DynamicLayer:
        """The dynamic layer for ``la`` with the original parameters in its base slice."""
        if la.inp is not None:
            per = la.inp.flat or 1
            in_spec = [(an.group_of[s], width_of[an.group_of[s]], per) for s in la.inp.spaces]
            base = {an.group_of[s]: an.space_size[s] for s in la.inp.spaces}
        else:  # the input's width is fixed (not a tracked tensor)
            cin = mod.weight.shape[1]
            in_spec, base = [(f"fixed:{la.name}", cin, 1)], {f"fixed:{la.name}": cin}
        out_group = an.group_of[la.out] if la.out is not None else None
        if out_group is not None:
            base[out_group] = an.space_size[la.out]
        max_in = sum(mx * per for _, mx, per in in_spec)
        if la.kind in ("conv", "dw"):
            max_out = width_of[out_group] if out_group else max_in
            dyn = DynamicConv(mod, in_spec, out_group, base, max_in, max_out, depthwise=la.kind == "dw")
        elif la.kind == "linear":
            dyn = DynamicLinear(mod, in_spec, out_group, base, max_in, width_of[out_group])
        elif la.kind == "bn":
            dyn = DynamicBatchNorm(mod, in_spec, base, max_in)
        else:
            dyn = DynamicLayerNorm(mod, in_spec, base, max_in)
        _fill(dyn, mod, gen)
        dyn.train(mod.training)
        return dyn


@torch.no_grad()
def _fill(dyn: DynamicLayer, mod, gen: torch.Generator) -> None:
    """Original parameters in the base slice; the rest: PyTorch's default init of the larger layer
    (uniform ±1/sqrt(fan_in) for conv/linear weights and biases; 1 / 0 for norms)."""
    cols = dyn.base_positions()
    if isinstance(dyn, (DynamicConv, DynamicLinear)):
        w = dyn.weight
        fan_in = math.prod(w.shape[1:])
        bound = 1.0 / math.sqrt(max(1, fan_in))
        fresh = (torch.rand(w.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        src = mod.weight.detach().double().cpu()  # composed on the CPU, copied to the layer's device
        if dyn.depthwise:
            fresh[cols] = src
        else:
            rows = src.shape[0]
            fresh[:rows, cols] = src
        w.copy_(fresh.to(w.dtype))
        if dyn.bias is not None:
            fb = (torch.rand(dyn.bias.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            pos = cols if dyn.depthwise else torch.arange(mod.bias.shape[0])
            fb[pos] = mod.bias.detach().double().cpu()
            dyn.bias.copy_(fb.to(dyn.bias.dtype))
        return
    for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        dst, src = getattr(dyn, name, None), getattr(mod, name, None)
        if dst is None or src is None:
            continue
        dst.fill_(fill)
        dst[cols] = src.detach()
