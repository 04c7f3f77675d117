"""GrowWidth: Network Expansion's width growth.

Pattern: a model built by :meth:`fxexpand.GrowthPlan.initial_model` with ``width_factor`` (its
channel groups and their full widths are recorded in its :class:`~fxexpand.core.GrowthRecord`; see
:mod:`fxexpand.core.channels` for how groups are found with networkx).

Rewrite: every channel group of full width C grows to ``max(current, floor(to·C))`` channels (C at
``to=1``). The new output filters of each conv/linear producing the group are orthogonal to its
existing filters and to each other (random directions in the SVD null space; random where the null
space is too small). The new *incoming* weights of consumers for the new channels are zero with
``init="preserve"`` — the grown model computes exactly the same function — or random with
``init="orthogonal"`` (the paper's choice: the function changes at growth).

Preconditions (``requires``, before any change): the model carries a width growth record whose
channel groups all exist in the traced graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

from ..core import (
    GrowthRecord,
    Pass,
    PassResult,
    PreconditionError,
    analyse,
    get_record,
    propagate_shapes,
    register_pass,
    resize,
)

__all__ = ["GrowWidth"]


@register_pass("grow_width")
@dataclass(kw_only=True)
class GrowWidth(Pass):
    """Grow every recorded channel group of a width-grown model to ``to`` of its full width.

    Args:
        to: target fraction of the full width, in (0, 1].
        init: "preserve" (function unchanged) or "orthogonal" (random incoming weights, as the paper).
        seed: seed of the random directions.
    """

    to: float = 1.0
    init: Literal["preserve", "orthogonal"] = "preserve"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < float(self.to) <= 1:
            raise ValueError(f"to must be in (0, 1], got {self.to!r}")
        if self.init not in ("preserve", "orthogonal"):
            raise ValueError("init must be 'preserve' or 'orthogonal'")

    @staticmethod
    def _record(gm: fx.GraphModule) -> GrowthRecord:
        rec = get_record(gm, GrowthRecord)
        if rec is None or rec.mode != "width":
            raise PreconditionError(
                "GrowWidth grows models built by fxexpand.GrowthPlan(..., width_factor=...).initial_model() "
                "(their channel groups and full widths are recorded); build the start model with it")
        return rec

    def requires(self, graph_module: fx.GraphModule) -> None:
        self._record(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        rec = self._record(gm)
        if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op != "output"):
            propagate_shapes(gm, rec.example_inputs(gm))
        an = analyse(gm, depthwise=rec.depthwise)
        full = rec.groups
        missing = sorted(set(full) - set(an.members))
        if missing:  # found before anything changes
            raise PreconditionError(f"the model's channel groups do not match its growth record (missing {missing})")
        targets = {}
        for gid, c_full in full.items():
            cur = an.group_size(gid)
            want = max(cur, max(1, math.floor(float(self.to) * c_full + 1e-9)))
            if want != cur:
                targets[gid] = want
        if not targets:
            return PassResult(gm, False, [self.note("skipped", "model", f"every group is already at {self.to}")])
        changed = resize(gm, an, targets, init=self.init, seed=self.seed)
        notes = [self.note("grew", gid, f"{an.group_size(gid)} -> {n} channels") for gid, n in targets.items()]
        notes += [self.note("random", name, f"{c['random_rows']} new filters are random, not orthogonal: "
                                            "the layer has fewer inputs x kernel entries than filters")
                  for name, c in changed.items() if c.get("random_rows")]
        return PassResult(gm, True, notes)
