"""Network Expansion: train a shallower or thinner model and grow it in stages to the full model.

* :func:`find_chains` finds the *chains of repeated blocks* of a model on its traced graph.
* :class:`GrowthPlan` builds the small start model (:meth:`GrowthPlan.initial_model`) and the
  stage schedule; each :class:`Stage` says how many blocks to insert (depth) or which width to grow
  to, and rebuilds the optimizer after growth (:func:`rebuild_optimizer`).
* The growth itself is done by two passes run with :func:`fxexpand.compile`:
  :class:`~fxexpand.passes.InsertEMABlocks` (depth) and :class:`~fxexpand.passes.GrowWidth` (width).

**What counts as a block.** A module call, seen while tracing, that

1. is a *composite* module (it has child modules) with parameters, called from exactly one place;
2. takes one tensor and returns one tensor of the same shape and dtype (shape-preserving), and reads
   nothing else from outside (no extra tensor arguments, no tensor computed outside it);
3. whose intermediate values are used only inside it.

A **chain** is a maximal run of such calls of the *same class* with the same parameter and buffer
names and shapes, where each block's output feeds only the next block. Chains may not overlap: where a container (a whole ``nn.Sequential`` stage that is
itself shape-preserving) and the blocks inside it both qualify, the longer chain wins (between
equally long ones, the outer). Examples:
torchvision VisionTransformer's ``encoder.layers`` (12 ``EncoderBlock``), ResNet stage blocks after
each stage's first (``layer1.0..layer1.1`` — ResNet-18's ``layer1.0`` keeps the shape — and the
single-block chains ``layer2.1``, ...), MobileNetV2's residual ``InvertedResidual`` runs,
ConvNeXt ``CNBlock`` and Swin block stages, and a user ``nn.Sequential`` of such blocks.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from .. import pipelines
from ..api import compile
from ..core import (
    ChainRecord,
    GrowthRecord,
    InputError,
    ParameterOrigins,
    analyse,
    as_inputs,
    get_module,
    get_record,
    keep_attr,
    propagate_shapes,
    resize,
    set_record,
    spread,
    trace,
    trace_with_calls,
)

__all__ = ["Chain", "find_chains", "GrowthPlan", "Stage", "rebuild_optimizer", "embed"]


@dataclass(frozen=True)
class Chain:
    """A chain of repeated, shape-preserving blocks: ``blocks`` are qualified names in call order."""

    id: str
    cls: str
    blocks: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.blocks)


def _meta(node: fx.Node) -> tuple | None:
    tm = node.meta.get("tensor_meta") if node is not None else None
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(tm.shape), tm.dtype


def find_chains(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    min_length: int = 1,
) -> list[Chain]:
    """Chains of repeated, shape-preserving blocks of ``model`` (see the module docstring), found on
    its torch.fx trace with shapes from ``example_inputs``; ``model`` is not modified."""
    gm, calls = trace_with_calls(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    propagate_shapes(gm, as_inputs(example_inputs))
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    per_module = Counter(c[0] for c in calls)

    def is_block(name, mod, inp, out, start, end) -> bool:
        if not name or per_module[name] != 1 or inp is None or out is None or start >= end:
            return False
        if next(mod.children(), None) is None or next(mod.parameters(), None) is None:
            return False
        if _meta(inp) is None or _meta(inp) != _meta(out):
            return False
        for n in nodes[start:end]:
            for a in n.all_input_nodes:
                if a is not inp and not (start <= index[a] < end):
                    return False  # reads a tensor computed outside the block
            if n is not out and any(not (start <= index[u] < end) for u in n.users):
                return False  # an intermediate value escapes
        return True

    blocks = [c for c in calls if is_block(*c)]
    blocks.sort(key=lambda c: c[4])
    runs: list[list[tuple]] = []
    run_ending_at: dict[fx.Node, list[tuple]] = {}  # output node of a run's last block -> the run
    for c in blocks:  # (blocks nested in other blocks come in between; link by data flow)
        run = run_ending_at.get(c[2])
        prev = run[-1] if run else None
        if (prev is not None and type(prev[1]) is type(c[1]) and _signature(prev[1]) == _signature(c[1])
                and all(c[4] <= index[u] < c[5] for u in prev[3].users)):
            run.append(c)
        else:
            run = [c]
            runs.append(run)
        run_ending_at[c[3]] = run
    # no overlapping chains: the longest wins (a shape-preserving container loses to its blocks)
    accepted: list[list[tuple]] = []
    taken: list[tuple[int, int]] = []
    for run in sorted(runs, key=lambda r: (-len(r), r[0][4], r[0][4] - r[-1][5])):  # ties: the outer one
        spans = [(c[4], c[5]) for c in run]
        if any(s < te and ts < e for s, e in spans for ts, te in taken):
            continue
        accepted.append(run)
        taken.extend(spans)
    accepted.sort(key=lambda r: r[0][4])
    chains = []
    for run in accepted:
        if len(run) < min_length:
            continue
        names = tuple(c[0] for c in run)
        chains.append(Chain(_chain_id(model, names), type(run[0][1]).__name__, names))
    return chains


def _signature(m: nn.Module) -> tuple:
    """Names and shapes of a module's parameters and buffers: blocks of one chain must agree, so
    that any of them can stand in for (or be copied to) any other position."""
    return tuple((k, tuple(v.shape)) for k, v in m.state_dict().items())


def _chain_id(model: nn.Module, names: tuple[str, ...]) -> str:
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) == 1:
        parent = parents.pop()
        if parent:
            try:
                children = [f"{parent}.{k}" for k, _ in get_module(model, parent).named_children()]
            except AttributeError:
                children = []
            if tuple(children) == names:
                return parent
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    size = getattr(model, "image_size", None)
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
            s = size if isinstance(size, int) else (64 if nd < 3 else 16)
            return (torch.randn(1, m.in_channels, *([s] * nd)),)
        if isinstance(m, nn.Linear):
            return (torch.randn(1, m.in_features),)
    raise InputError(f"cannot guess an input for {type(model).__name__}; pass example_inputs=")


@dataclass
class Stage:
    """One growth stage: train at ``alpha`` for epochs ``[start_epoch, end_epoch)``, then grow.

    ``new_blocks`` (depth) maps chain id -> blocks to insert at the end of the stage; ``grow_to``
    (width) is the next width fraction. Both are empty/None at the last stage."""

    index: int
    alpha: float
    start_epoch: int | None
    end_epoch: int | None
    new_blocks: dict[str, int]
    grow_to: float | None
    plan: "GrowthPlan" = field(repr=False)

    @property
    def is_last(self) -> bool:
        return self.index == len(self.plan) - 1

    def passes(self, ema_model: nn.Module | None = None) -> list:
        """The passes that grow a model at the end of this stage (empty at the last stage)."""
        if self.plan.mode == "depth":
            if not any(self.new_blocks.values()):
                return []
            if ema_model is None:
                raise InputError("depth growth copies blocks from the EMA model: pass ema.module")
            return pipelines.depth_growth(ema_model, self.new_blocks)
        if self.grow_to is None:
            return []
        return pipelines.width_growth(self.grow_to, init=self.plan.init, seed=self.plan.seed + self.index + 1)

    def grow(self, model: nn.Module, ema: Any = None) -> nn.Module:
        """``fxexpand.compile(model, self.passes(ema))``; ``ema`` is an :class:`fxexpand.EMA` or a module."""
        ema_model = getattr(ema, "module", ema)
        return compile(model, self.passes(ema_model))

    def rebuild_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """See :func:`rebuild_optimizer`."""
        return rebuild_optimizer(optimizer, model)


class GrowthPlan:
    """Network Expansion schedule from a small model to ``full_model``.

    Args:
        full_model: the architecture to end with (not modified; its weights seed the start model).
        depth_factor: α0 for depth growth: each chain of n blocks starts with ``round(α0·n)`` (≥ 1)
            evenly spaced blocks.
        width_factor: α0 for width growth (CNNs): every resizable channel group of C channels
            starts with its first ``floor(α0·C)`` (≥ 1) channels.
        stages: n_g; stage i trains at α_i, linearly spaced from α0 to 1.
        epochs: total epochs, split equally into the stages (sets ``start_epoch``/``end_epoch``).
        example_inputs: inputs the model accepts (shapes decide which blocks keep their shape);
            guessed from the first layer (or ``image_size``) if omitted.
        init: width growth: ``"preserve"`` (new incoming weights zero: the function is unchanged)
            or ``"orthogonal"`` (the paper: random incoming weights).
        leaf_modules / concrete_args: passed to :func:`fxexpand.trace`.
    """

    def __init__(
        self,
        full_model: nn.Module,
        *,
        depth_factor: float | None = None,
        width_factor: float | None = None,
        stages: int = 3,
        epochs: int | None = None,
        example_inputs: Any = None,
        init: str = "preserve",
        seed: int = 0,
        leaf_modules: Sequence[type | str] = (),
        concrete_args: dict[str, Any] | None = None,
    ):
        if not isinstance(full_model, nn.Module):
            raise TypeError(f"GrowthPlan expects an nn.Module, got {type(full_model).__name__}")
        if (depth_factor is None) == (width_factor is None):
            raise ValueError("give exactly one of depth_factor= (depth growth) or width_factor= (width growth)")
        alpha0 = depth_factor if depth_factor is not None else width_factor
        if not isinstance(alpha0, (int, float)) or not 0 < alpha0 <= 1:
            raise ValueError(f"the growth factor must be in (0, 1], got {alpha0!r}")
        if not isinstance(stages, int) or stages < 1 or (stages == 1 and alpha0 < 1):
            raise ValueError(f"stages must be an int ≥ 2 (or 1 with factor 1), got {stages!r}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < stages):
            raise ValueError(f"epochs must be an int ≥ stages ({stages}), got {epochs!r}")
        if init not in ("preserve", "orthogonal"):
            raise ValueError("init must be 'preserve' or 'orthogonal'")
        self.full_model = full_model
        self.mode = "depth" if depth_factor is not None else "width"
        self.alpha0 = float(alpha0)
        self.stages = stages
        self.epochs = epochs
        self.init = init
        self.seed = seed
        self.leaf_modules = tuple(leaf_modules)
        self.concrete_args = concrete_args
        self.example_inputs = as_inputs(example_inputs) if example_inputs is not None else _default_inputs(full_model)
        self.alphas = [self.alpha0 + (1 - self.alpha0) * i / (stages - 1) if stages > 1 else 1.0
                       for i in range(stages)]
        if self.mode == "depth":
            self.chains = find_chains(full_model, self.example_inputs, leaf_modules=self.leaf_modules,
                                      concrete_args=concrete_args)
            growable = [c for c in self.chains if len(c) >= 2]
            if not growable:
                raise InputError(
                    f"{type(full_model).__name__} has no chain of two or more repeated shape-preserving blocks "
                    "to grow by depth (see fxexpand.find_chains); try width_factor=")
            self.counts = {c.id: [max(1, _round(a * len(c))) for a in self.alphas] for c in growable}
            self.groups: dict[str, int] = {}
        else:
            self.chains = []
            self.counts = {}
            gm = self._trace(copy.deepcopy(full_model))
            an = analyse(gm)
            self.groups = {g: an.group_size(g) for g in an.free_groups()}
            self.depthwise = sorted(la.name for la in an.layers if la.kind == "dw")
            self.frozen = dict(an.frozen)
            if not self.groups:
                raise InputError(f"{type(full_model).__name__} has no channel group that can change width "
                                 f"(frozen: {self.frozen})")

    def _trace(self, model: nn.Module, leaf_names: Sequence[str] = ()) -> fx.GraphModule:
        gm = trace(model, leaf_modules=self.leaf_modules + tuple(leaf_names), concrete_args=self.concrete_args)
        propagate_shapes(gm, self.example_inputs)
        return gm

    def __len__(self) -> int:
        return self.stages

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stage(i) for i in range(self.stages))

    def stage(self, i: int) -> Stage:
        if not 0 <= i < self.stages:
            raise IndexError(i)
        last = i == self.stages - 1
        if self.epochs is not None:
            start = _round(i * self.epochs / self.stages)
            end = _round((i + 1) * self.epochs / self.stages)
        else:
            start = end = None
        new = {} if last else {cid: k[i + 1] - k[i] for cid, k in self.counts.items()}
        grow_to = None if (last or self.mode == "depth") else self.alphas[i + 1]
        return Stage(i, self.alphas[i], start, end, new, grow_to, self)

    def stage_at(self, epoch: int) -> Stage:
        """The stage that trains epoch ``epoch`` (needs ``epochs=``)."""
        if self.epochs is None:
            raise ValueError("GrowthPlan(epochs=...) is needed to map epochs to stages")
        for s in self:
            if s.start_epoch <= epoch < s.end_epoch:
                return s
        raise IndexError(f"epoch {epoch} is outside 0..{self.epochs - 1}")

    def initial_model(self) -> fx.GraphModule:
        """The shallow (depth) or thin (width) start model, a trainable GraphModule whose parameter
        names are the full model's (a subset, or the same names with fewer channels)."""
        full = copy.deepcopy(self.full_model)
        if self.mode == "depth":
            members = [b for c in self.chains if c.id in self.counts for b in c.blocks]
            gm = self._trace(full, members)
            info_chains = {}
            for c in self.chains:
                if c.id not in self.counts:
                    continue
                keep = spread(len(c), self.counts[c.id][0])
                for j, name in enumerate(c.blocks):
                    if j in keep:
                        continue
                    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    gm.delete_submodule(name)
                info_chains[c.id] = ChainRecord(c.cls, list(c.blocks), [c.blocks[j] for j in keep])
            info = GrowthRecord("depth", chains=info_chains)
        else:
            gm = self._trace(full)
            an = analyse(gm)
            resize(gm, an, {g: max(1, math.floor(self.alpha0 * n)) for g, n in self.groups.items()},
                   init=self.init, seed=self.seed)
            info = GrowthRecord("width", groups=dict(self.groups), depthwise=list(self.depthwise))
        info.inputs = [(list(t.shape), str(t.dtype).replace("torch.", "")) for t in self.example_inputs
                       if isinstance(t, torch.Tensor)]
        gm.graph.lint()
        gm.recompile()
        gm.train(self.full_model.training)
        set_record(gm, info)
        keep_attr(gm, "_version", getattr(self.full_model, "_version", 1))
        return gm

    def __repr__(self) -> str:
        what = (f"chains={ {c: k for c, k in self.counts.items()} }" if self.mode == "depth"
                else f"groups={len(self.groups)}")
        return (f"GrowthPlan({type(self.full_model).__name__}, {self.mode}, alphas="
                f"{[round(a, 3) for a in self.alphas]}, {what})")


def embed(old: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """``old`` placed in the leading corner of a zero tensor shaped like ``like`` (None if it cannot)."""
    if old.shape == like.shape:
        return old.detach().clone().to(like.device)
    if old.dim() != like.dim() or any(o > n for o, n in zip(old.shape, like.shape)):
        return None
    out = torch.zeros_like(like, dtype=old.dtype)
    out[tuple(slice(0, s) for s in old.shape)] = old.detach()
    return out


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Point ``optimizer`` at the parameters of ``model``, grown by :func:`fxexpand.compile` from the
    model the optimizer was built for. Done in place (LR schedulers bound to it keep working) and
    the optimizer is returned.

    Hyper-parameters of every param group (learning rate included) are kept. Per-parameter state
    (momentum, Adam moments, step) moves to the parameter's successor; for a parameter that grew
    (width growth) the old state fills the leading corner and the new entries are zero. New
    parameters (inserted blocks) join the group of the parameter they were copied from, else the
    first group, with empty state.
    """
    rec = get_record(model, ParameterOrigins)
    if rec is None:
        raise InputError("rebuild_optimizer needs the model returned by fxexpand.compile() "
                         "(it records where each parameter came from)")
    origin, copied_from = rec.origin, rec.copied_from
    new_of: dict[int, torch.Tensor] = {}
    new_params = dict(model.named_parameters())
    for name, p in new_params.items():
        o = origin.get(name)
        old = o[1]() if o else None
        if old is not None:
            new_of[id(old)] = p
    group_of_old_name: dict[str, int] = {}
    old_ids_group = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for name, o in origin.items():
        old = o[1]()
        if old is not None and id(old) in old_ids_group:
            group_of_old_name[o[0]] = old_ids_group[id(old)]
    new_state = {}
    assigned: set[int] = set()
    for g in optimizer.param_groups:
        kept = []
        for p in g["params"]:
            q = new_of.get(id(p))
            if q is None or id(q) in assigned:
                continue
            kept.append(q)
            assigned.add(id(q))
            st = optimizer.state.get(p)
            if st:
                moved = {}
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        e = embed(v, q)
                        if e is None:
                            moved = None
                            break
                        moved[k] = e
                    else:
                        moved[k] = copy.deepcopy(v)
                if moved:
                    new_state[q] = moved
        g["params"] = kept
    for name, p in new_params.items():
        if id(p) in assigned:
            continue
        src = copied_from.get(name)
        gi = group_of_old_name.get(src, 0) if src else 0
        optimizer.param_groups[gi]["params"].append(p)
        assigned.add(id(p))
    optimizer.state.clear()
    optimizer.state.update(new_state)
    return optimizer
