"""InsertEMABlocks: Network Expansion's depth growth.

Pattern: the chains of a model built by :meth:`fxexpand.GrowthPlan.initial_model` (their blocks
are single ``call_module`` calls, recorded in the model's growth record).

Rewrite: insert ``count`` blocks into each chain, each a deep copy of a block of the *EMA model*
(Network Expansion copies the averaged weights, not the trained ones). By default the copies are
the top blocks of the EMA stack, interleaved from the end: with k blocks and c new ones, a copy of
EMA block k-1 goes right after block k-1, a copy of EMA block k-2 right after block k-2, and so on
(wrapping around if c > k). ``positions`` gives the blocks to copy-and-follow explicitly.

Naming: a chain of m of the full model's n blocks uses the full model's names at
:func:`fxexpand.core.spread` (n, m) — evenly spaced, in order. Blocks are renamed as the chain
grows, so at the last stage the names (and ``state_dict`` keys) are exactly the full model's.
The pass reports the moves as a :class:`~fxexpand.core.ModuleRenames` record.

Preconditions (all checked before any change): the model carries a depth growth record; every
chain named in ``count`` exists; a chain's blocks still follow each other; there is room for the
new blocks; the EMA model's copied blocks match the model's (type and shapes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from ..core import (
    GrowthRecord,
    InputError,
    ModuleRenames,
    Pass,
    PassResult,
    PreconditionError,
    get_module,
    get_record,
    register_pass,
    set_module,
    spread,
)

__all__ = ["InsertEMABlocks"]


@register_pass("insert_ema_blocks")
@dataclass(kw_only=True)
class InsertEMABlocks(Pass):
    """Insert copies of EMA-model blocks into the chains of a growing model.

    Args:
        ema_model: the EMA of the model being grown (``fxexpand.EMA(...).module``); same
            architecture as the model.
        count: blocks to insert: an int (every growable chain) or ``{chain id: int}``
            (``Stage.new_blocks``).
        positions: optional ``{chain id: [block index, ...]}`` (or a list for every chain): after
            each listed block of the current chain insert a copy of the EMA model's same block.
    """

    ema_model: nn.Module
    count: Any = 1
    positions: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        counts = self.count.values() if isinstance(self.count, dict) else [self.count]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"count must be a non-negative int or a dict of them, got {self.count!r}")
        if self.positions is not None and not isinstance(self.positions, (list, tuple, dict)):
            raise TypeError("positions must be a list of block indices or a dict {chain id: list}")

    def _record(self, gm: fx.GraphModule) -> GrowthRecord:
        rec = get_record(gm, GrowthRecord)
        if rec is None or rec.mode != "depth":
            raise PreconditionError(
                "InsertEMABlocks grows models built by fxexpand.GrowthPlan(..., depth_factor=...)"
                ".initial_model() (their chains of blocks are recorded); build the start model with it")
        if isinstance(self.count, dict):
            unknown = sorted(set(self.count) - set(rec.chains))
            if unknown:
                raise PreconditionError(f"unknown chain(s) {unknown}; the chains are {sorted(rec.chains)}")
        return rec

    def requires(self, graph_module: fx.GraphModule) -> None:
        self._record(graph_module)

    def _plan(self, gm: fx.GraphModule, rec: GrowthRecord) -> list[tuple]:
        """Every check, before any change: per chain (id, record, nodes, new sequence, new names)."""
        plans = []
        for cid, ch in rec.chains.items():
            count = self.count.get(cid, 0) if isinstance(self.count, dict) else self.count
            members, slots = list(ch.members), list(ch.slots)
            k, n = len(members), len(slots)
            count = min(count, n - k) if not isinstance(self.count, dict) else count
            if count == 0:
                continue
            if k + count > n:
                raise PreconditionError(f"chain {cid} has {k} of {n} blocks; cannot insert {count} more")
            pos = self._positions(cid, k, count)
            nodes = _chain_nodes(gm, members)
            for a, b in zip(nodes, nodes[1:]):
                if b.args[0] is not a:
                    raise PreconditionError(f"chain {cid}: {b.target} does not follow {a.target} any more")
            for j in sorted(set(pos)):
                src, own = _get_or_none(self.ema_model, members[j]), get_module(gm, members[j])
                if src is None or type(src) is not type(own) or _shapes(src) != _shapes(own):
                    raise PreconditionError(
                        f"the EMA model's {members[j]} does not match the model's block (is it the EMA "
                        "of this model, taken before growing?)")
            # the new sequence: ("old", j) or ("new", j) = copy of EMA block j
            seq: list[tuple[str, int]] = []
            for j in range(k):
                seq.append(("old", j))
                seq.extend(("new", j) for _ in range(pos.count(j)))
            names = [slots[i] for i in spread(n, len(seq))]
            plans.append((cid, ch, nodes, pos, seq, names))
        return plans

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        rec = self._record(gm)
        plans = self._plan(gm, rec)
        renames: dict[str, str | None] = {}
        copied_from: dict[str, str] = {}
        notes = []
        for cid, ch, nodes, pos, seq, names in plans:
            members = list(ch.members)
            # 1. move the existing blocks out of the way, 2. place everything at its new name
            old_blocks = {}
            for j, name in enumerate(members):
                old_blocks[j] = get_module(gm, name)
                gm.delete_submodule(name)
            cur = nodes[0].args[0]
            for (kind, j), name in zip(seq, names):
                if kind == "old":
                    node = nodes[j]
                    node.target = name
                    set_module(gm, name, old_blocks[j])
                    renames[name] = members[j]
                else:
                    block = copy.deepcopy(get_module(self.ema_model, members[j]))
                    block.train(old_blocks[j].training)
                    for p in block.parameters():
                        p.requires_grad_(True)
                    set_module(gm, name, block)
                    with gm.graph.inserting_after(cur):
                        node = gm.graph.call_module(name, (cur,))
                    cur.replace_all_uses_with(node, delete_user_cb=lambda u, node=node: u is not node)
                    renames[name] = None
                    copied_from[name] = members[j]
                cur = node
            ch.members = names
            notes.append(self.note("grew", cid, f"{len(members)} -> {len(names)} blocks, copies of EMA "
                                                f"{sorted({members[j] for j in pos})}"))
        if plans:
            gm.graph.lint()
            gm.recompile()
        records = [ModuleRenames(renames, copied_from)] if plans else []
        return PassResult(gm, bool(plans), notes, records)

    def _positions(self, cid: str, k: int, count: int) -> list[int]:
        pos = self.positions
        if isinstance(pos, dict):
            pos = pos.get(cid)
        if pos is None:
            return [(k - 1 - i) % k for i in range(count)]
        pos = list(pos)
        if len(pos) != count or not all(isinstance(p, int) and 0 <= p < k for p in pos):
            raise PreconditionError(f"chain {cid}: positions must be {count} block indices in 0..{k - 1}, got {pos}")
        return pos


def _chain_nodes(gm: fx.GraphModule, members: list[str]) -> list[fx.Node]:
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    missing = [m for m in members if m not in by_target]
    if missing:
        raise InputError(f"the model has no call of {missing}: it does not match its growth record")
    return [by_target[m] for m in members]


def _get_or_none(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return get_module(root, name)
    except AttributeError:
        return None


def _shapes(m: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}
