"""BoostNet's multi-exit model in torch: the training loss, segments, per-exit costs, anytime and
budgeted evaluation.

A model built by :class:`~fxexpand.passes.InsertEarlyExits` returns ``(F_1, ..., F_N)``. This module

* trains it with :func:`loss` (``Σ_n w_n · loss_fn(F_n, y)``);
* splits it at its exits into *segments* (:func:`segments`, with ``torch.fx.passes.split_module``):
  segment n computes the trunk from exit n-1 to exit n and head n's raw logits f_n; the last
  segment ends with the backbone's own head. Costs per exit come from running each segment under
  ``torch.utils.flop_counter`` (:func:`exit_costs`);
* evaluates anytime prediction (every F_n against its cumulative cost, :func:`anytime`) and
  budgeted-batch classification (:func:`fit`: a fraction p of the remaining samples exits at each
  exit, p solved by Newton–Raphson for the budget, confidence thresholds fitted on a held-out split
  with the flat-curve rule; :func:`evaluate`); the math is in :mod:`fxexpand.exits.policy`.

Real early exit in onnxruntime (:func:`~fxexpand.exits.export`, :class:`~fxexpand.exits.Runner`) is
in :mod:`fxexpand.exits.runtime`.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils.flop_counter import FlopCounterMode

from ..core import ExitRecord, GradientScale, InputError, as_inputs, get_module, get_record, unwrap
from . import policy as ep
from .policy import Policy

__all__ = ["exit_record", "loss", "segments", "Segment", "exit_costs", "collect", "anytime", "fit", "evaluate",
           "budget_curve"]


def exit_record(model: nn.Module) -> ExitRecord:
    """The :class:`~fxexpand.core.ExitRecord` of a model built with ``InsertEarlyExits``."""
    rec = get_record(unwrap(model), ExitRecord)
    if rec is None:
        raise InputError("this model has no early exits: build it with "
                         "fxexpand.compile(model, passes=[InsertEarlyExits()], example_inputs=...)")
    return rec


def loss(outputs: Iterable[torch.Tensor], target: torch.Tensor,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
         weights: Iterable[float] | None = None) -> torch.Tensor:
    """BoostNet's training loss ``Σ_n w_n · loss_fn(F_n, y)`` (w_n = 1): the stop-gradient and the
    gradient rescaling are already in the model's graph."""
    outs = list(outputs)
    ws = [1.0] * len(outs) if weights is None else list(weights)
    if len(ws) != len(outs):
        raise ValueError(f"{len(ws)} weights for {len(outs)} exits")
    return sum(w * loss_fn(o, target) for w, o in zip(ws, outs))


# -- segments ----------------------------------------------------------------------------------------
@dataclass
class Segment:
    """One piece of the split model: its module, the names of the values it reads and writes, and
    which of its outputs is the exit's raw logits."""

    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    logits: str
    example: tuple[torch.Tensor, ...] = field(default_factory=tuple)


def _inference_graph(model: nn.Module) -> tuple[fx.GraphModule, ExitRecord]:
    """An eval-mode copy returning the raw head logits (f_1, ..., f_N), without gradient scales."""
    rec = exit_record(model)
    gm = copy.deepcopy(unwrap(model)).eval()
    if not isinstance(gm, fx.GraphModule):
        raise InputError("segments need the GraphModule returned by fxexpand.compile")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    res = list(out.args[0])
    raw = [res[0]]
    for n in range(1, len(res)):
        node = res[n]
        raw.append(node.args[1] if rec.boost else node)
    out.args = (tuple(raw),)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(get_module(gm, node.target), GradientScale):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, rec


def segments(model: nn.Module, example_inputs: Any) -> list[Segment]:
    """Split a multi-exit model at its exits (``torch.fx.passes.split_module``): segment n reads the
    trunk at exit n-1 (the model's inputs for n = 1) and returns the trunk at exit n and f_n."""
    gm, rec = _inference_graph(model)
    inputs = as_inputs(example_inputs)
    nodes = list(gm.graph.nodes)
    cut_names = {name: k for k, name in enumerate(rec.points[:-1])}
    head_of = {f"exit_heads.{k}": k for k in range(rec.num_exits - 1)}
    # nodes between a cut and its head (a copy of the cut for an in-place trunk) belong to the head
    head_side: dict[fx.Node, int] = {}
    for node in nodes:
        k = head_of.get(node.target) if node.op == "call_module" else None
        if k is None:
            continue
        stack = list(node.all_input_nodes)
        while stack:
            a = stack.pop()
            if a.name in cut_names or a.op == "placeholder" or a in head_side:
                continue
            head_side[a] = k
            stack.extend(a.all_input_nodes)
    seg: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op in ("output", "get_attr"):
            continue
        best = 0
        mine = head_of.get(node.target) if node.op == "call_module" else head_side.get(node)
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                continue
            s = seg[a]
            k = cut_names.get(a.name)
            if k is not None and mine != k:
                s += 1  # the trunk goes on in the next segment; head k stays with its cut
            best = max(best, s)
        seg[node] = best
    for node in nodes:
        if node.op == "get_attr":
            seg[node] = min((seg[u] for u in node.users if u in seg), default=0)
    missing = [name for name in cut_names if name not in {n.name for n in nodes}]
    if missing:
        raise InputError(f"exit points {missing} are not in the model's graph")
    split = split_module(gm, gm, lambda n: seg[n], keep_original_order=True)
    # run the split graph once, recording what each segment reads and writes
    env: dict[str, Any] = {}
    placeholders = [n for n in split.graph.nodes if n.op == "placeholder"]
    for p, t in zip(placeholders, inputs):
        env[p.name] = t
    out_segments: list[Segment] = []
    producer: dict[str, tuple[int, int]] = {}
    final = next(n for n in split.graph.nodes if n.op == "output").args[0]
    final_names = [a.name for a in final]
    with torch.no_grad():
        for node in split.graph.nodes:
            if node.op == "call_module":
                mod = getattr(split, node.target)
                args = [env[a.name] for a in node.args]
                res = mod(*args)
                res = res if isinstance(res, tuple) else (res,)
                idx = len(out_segments)
                getters = {u.args[1]: u.name for u in node.users if u.target is operator.getitem}
                outs = [getters.get(i, node.name) for i in range(len(res))]
                for i, name in enumerate(outs):
                    env[name] = res[i]
                    producer[name] = (idx, i)
                out_segments.append(Segment(mod, [a.name for a in node.args], outs, "",
                                            tuple(t.detach().clone() for t in args)))
    if len(out_segments) != rec.num_exits:
        raise InputError(f"splitting at the exits gave {len(out_segments)} segments for {rec.num_exits} exits")
    for k, name in enumerate(final_names):
        idx, _ = producer[name]
        if idx != k:
            raise InputError(f"exit {k + 1}'s logits are computed in segment {idx + 1}")
        out_segments[k].logits = name
    return out_segments


def exit_costs(model: nn.Module, example_inputs: Any) -> dict[str, list[float]]:
    """Per exit: ``flops`` (c_n: the segment from exit n-1 to exit n, head n included, for one
    sample) and ``params`` (parameters used up to exit n), from ``torch.utils.flop_counter``."""
    segs = segments(model, as_inputs(example_inputs))
    batch = as_inputs(example_inputs)[0].shape[0]
    flops, params, seen = [], [], set()
    total = 0
    for s in segs:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            s.module(*s.example)
        flops.append(counter.get_total_flops() / batch)
        for p in s.module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        params.append(total)
    return {"flops": flops, "params": params}


# -- evaluation --------------------------------------------------------------------------------------
def collect(model: nn.Module, loader: Iterable) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's boosted logits F_n on ``loader`` (eval mode, no gradients) and the labels."""
    net = unwrap(model)
    training = net.training
    net.eval()
    outs: list[list[torch.Tensor]] = []
    ys = []
    with torch.no_grad():
        for x, y in loader:
            res = net(x)
            if not outs:
                outs = [[] for _ in res]
            for k, r in enumerate(res):
                outs[k].append(r.detach().float().cpu())
            ys.append(y.cpu())
    net.train(training)
    return [torch.cat(o) for o in outs], torch.cat(ys)


def _scores_correct(logits: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ep.confidences(logits), torch.stack([lg.argmax(1) == y for lg in logits])


def anytime(model: nn.Module, loader: Iterable, example_inputs: Any) -> list[dict]:
    """Anytime prediction: accuracy of every F_n against its cumulative cost (FLOPs per sample)."""
    logits, y = collect(model, loader)
    _, correct = _scores_correct(logits, y)
    return ep.anytime_table(correct, exit_costs(model, example_inputs)["flops"])


def fit(model: nn.Module, val_loader: Iterable, budget: float, example_inputs: Any, *,
        flat_rule: bool = True) -> Policy:
    """Budgeted-batch policy for ``budget`` (a fraction of the full model's cost, in (0, 1]): p from
    Newton–Raphson on ``C_avg(p) = Σ (1-p)^(n-1) c_n``, clamped to the feasible range, thresholds
    fitted on ``val_loader`` so that those fractions exit (flat-curve rule on by default)."""
    if not 0 < float(budget) <= 1:
        raise ValueError(f"budget is a fraction of the full cost in (0, 1], got {budget!r}")
    rec = exit_record(model)
    costs = exit_costs(model, example_inputs)["flops"]
    logits, y = collect(model, val_loader)
    scores, correct = _scores_correct(logits, y)
    pol = ep.fit_policy(scores, correct, costs, float(budget) * sum(costs), flat_rule=flat_rule)
    return dataclasses.replace(pol, temperatures=list(rec.temperatures), boost=rec.boost, step_costs=costs)


def evaluate(model: nn.Module, loader: Iterable, policy: Policy) -> dict[str, Any]:
    """Accuracy, mean cost (FLOPs per sample and fraction of the full model's) and exit histogram of
    ``policy`` on ``loader``."""
    logits, y = collect(model, loader)
    scores, correct = _scores_correct(logits, y)
    return ep.evaluate_policy(scores, correct, policy.thresholds, policy.step_costs)


def budget_curve(model: nn.Module, val_loader: Iterable, test_loader: Iterable, example_inputs: Any, *,
                 budgets: Iterable[float] | None = None, flat_rule: bool = True) -> list[dict]:
    """Test accuracy against mean cost for each budget (fractions of the full cost; default: the p
    grid k/20 as in the official code), thresholds fitted on ``val_loader``."""
    costs = exit_costs(model, example_inputs)["flops"]
    vl, vy = collect(model, val_loader)
    tl, ty = collect(model, test_loader)
    vs, vc = _scores_correct(vl, vy)
    ts, tc = _scores_correct(tl, ty)
    absolute = None if budgets is None else [float(b) * sum(costs) for b in budgets]
    return ep.budget_curve(vs, vc, ts, tc, costs, budgets=absolute, flat_rule=flat_rule)
