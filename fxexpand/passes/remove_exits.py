"""RemoveExits: take BoostNet's early exits out of a multi-exit model, leaving the backbone.

Pattern: a model built by :class:`~fxexpand.passes.InsertEarlyExits` (its
:class:`~fxexpand.core.ExitRecord` says whether outputs are boosted): the graph returns
``(F_1, ..., F_N)`` with ``F_N = t · detach(F_{N-1}) + f_N`` (boosted) or ``F_N = f_N``.

Rewrite: the graph returns the raw last head ``f_N`` (the backbone's own output), not ``F_N``;
every :class:`~fxexpand.core.GradientScale` call (the identity in the forward pass) is replaced by
its input; the heads and boosting ops become dead code and are removed, and the exit record
is dropped. The backbone's modules
and parameter names are untouched, so the result loads strictly into the original backbone.

Preconditions: the model carries an exit record and its output has the recorded number of exits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..core import (
    ExitRecord,
    GradientScale,
    Pass,
    PassResult,
    PreconditionError,
    drop_record,
    get_module,
    get_record,
    register_pass,
)

__all__ = ["RemoveExits"]


@register_pass("remove_exits")
@dataclass(kw_only=True)
class RemoveExits(Pass):
    """Return the backbone's own output (f_N) and drop the exit heads and gradient scales."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        rec = get_record(gm, ExitRecord)
        if rec is None:
            return PassResult(gm, False, [])
        out = next(n for n in gm.graph.nodes if n.op == "output")
        res = out.args[0]
        if not isinstance(res, (tuple, list)) or len(res) != rec.num_exits:
            raise PreconditionError(f"the model's output is not the {rec.num_exits} exits its record describes")
        last = res[-1]
        if rec.boost and rec.num_exits > 1:
            if not (isinstance(last, fx.Node) and last.target in (torch.add,) and len(last.args) == 2):
                raise PreconditionError("the last exit is not t * F_{N-1} + f_N as InsertEarlyExits builds it")
            last = last.args[1]
        out.args = (last,)
        removed = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(get_module(gm, node.target), GradientScale):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        drop_record(gm, ExitRecord)  # the result is the backbone: nothing describes exits any more
        return PassResult(gm, True, [self.note("removed", "exits", f"{rec.num_exits - 1} early exits and "
                                                                   f"{removed} gradient scales; output = f_{rec.num_exits}")])
