"""InsertEarlyExits: BoostNet's boosted early exits on any traced backbone (Yu et al., AAAI 2023).

Pattern: a classifier backbone whose graph has one output, a ``(batch, classes)`` tensor, and
*cut points*: feature maps ``(batch, channels, *spatial)`` through which everything that follows
flows (no earlier tensor is read after them). Exit points are chosen among the cut points:

* ``at="stages"`` — the last block boundary (the end of a called module with child modules) of
  each feature-map resolution, except the last resolution (the backbone's own output is the last
  exit there): after each stage, as MSDNet/BoostNet place their classifiers. A plain CNN without
  blocks (VGG-like) gets an exit at the last cut point of each resolution but the last;
* ``at="blocks"`` — after every block (a called module with child modules and parameters whose
  class is used at least twice) ending at a cut point, except the last one;
* a list of module names (the exit follows the module's call) or node names.

Rewrite: a head per exit point — ``head="msdnet"`` (default; MSDNet's classifier: two 3×3
stride-2 conv-BN-ReLU of the feature's width, global average pooling, Linear), ``"linear"``
(pooling, Linear) or a callable ``(channels, num_classes) -> nn.Module`` — installed under
``exit_heads.<n>``. The backbone's own output is the last head f_N. The graph returns the tuple
``(F_1, ..., F_N)``: ``F_1 = f_1`` and ``F_n = t_n · stop_grad(F_{n-1}) + f_n`` (paper Eq. 3–5;
``t_n = temperature``, 0.5 by default; ``boost=False`` gives ``F_n = f_n``, plain joint training
as MSDNet). The stop-gradient (``detach``), the temperature (a multiplication) and the gradient
rescaling are graph nodes: with ``rescale_gradients`` (default) a
:class:`~fxexpand.core.GradientScale` multiplies the gradient entering exit n's head by
``1/(N-n+1)`` and the trunk's by ``(N-n)/(N-n+1)``, so block n receives
``1/(N-n+1) · Σ_{i≥n} ∂L_i/∂b_n`` (Eq. 7). The backbone's parameters keep their names.

Contraction (``fxexpand.contract``, :class:`~fxexpand.passes.RemoveExits`) returns the backbone
alone: its output is the raw last head f_N, which is *not* F_N.

Preconditions (``requires``): shapes are known (``example_inputs``), the output is one
``(batch, classes)`` tensor, the model has no exits yet, and at least one exit point exists.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..core import (
    ExitRecord,
    GradientScale,
    Pass,
    PassResult,
    PreconditionError,
    get_record,
    has_module,
    register_pass,
    require_shapes,
    set_module,
    set_record,
)

__all__ = ["InsertEarlyExits"]

_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def msdnet_head(channels: int, num_classes: int, dims: int = 2) -> nn.Module:
    """MSDNet's classifier: two 3×3 stride-2 conv-BN-ReLU, global average pooling, Linear."""
    conv, bn = _CONV[dims], _BN[dims]
    return nn.Sequential(
        conv(channels, channels, 3, stride=2, padding=1, bias=False), bn(channels), nn.ReLU(inplace=True),
        conv(channels, channels, 3, stride=2, padding=1, bias=False), bn(channels), nn.ReLU(inplace=True),
        _POOL[dims](1), nn.Flatten(), nn.Linear(channels, num_classes))


def linear_head(channels: int, num_classes: int, dims: int = 2) -> nn.Module:
    """Global average pooling and a Linear classifier."""
    return nn.Sequential(_POOL[dims](1), nn.Flatten(), nn.Linear(channels, num_classes))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _stack(node: fx.Node) -> list[tuple[str, type]]:
    return [(v[0] if isinstance(v, tuple) else k, v[1] if isinstance(v, tuple) else type(None))
            for k, v in (node.meta.get("nn_module_stack") or {}).items()]


@register_pass("insert_early_exits")
@dataclass(kw_only=True)
class InsertEarlyExits(Pass):
    """Insert boosted early exits (BoostNet) into a classifier backbone.

    Args:
        at: "stages", "blocks", or a list of module / node names to put exits after.
        head: "msdnet", "linear", or a callable ``(channels, num_classes) -> nn.Module``.
        temperature: t in ``F_n = t · stop_grad(F_{n-1}) + f_n`` (a number, or one per exit n ≥ 2).
        boost: False gives ``F_n = f_n`` (the joint-training baseline).
        rescale_gradients: Eq. 7's gradient rescaling (GradientScale nodes).
        seed: seed of the heads' initialisation.
    """

    at: Any = "stages"
    head: Any = "msdnet"
    temperature: Any = 0.5
    boost: bool = True
    rescale_gradients: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.at in ("stages", "blocks") or (isinstance(self.at, (list, tuple)) and self.at
                                                     and all(isinstance(a, str) for a in self.at))):
            raise ValueError(f"at must be 'stages', 'blocks' or a non-empty list of names, got {self.at!r}")
        if isinstance(self.at, tuple):
            self.at = list(self.at)
        if not (self.head in ("msdnet", "linear") or callable(self.head)):
            raise ValueError(f"head must be 'msdnet', 'linear' or a callable (channels, num_classes), got {self.head!r}")
        temps = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        if not all(isinstance(t, (int, float)) and t >= 0 for t in temps):
            raise ValueError(f"temperature must be a number >= 0 or a list of them, got {self.temperature!r}")

    # -- analysis -----------------------------------------------------------------------------------
    @staticmethod
    def _output(gm: fx.GraphModule) -> fx.Node:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        res = out.args[0]
        if not isinstance(res, fx.Node):
            raise PreconditionError("InsertEarlyExits needs a backbone with one output tensor (batch, classes); "
                                    f"this graph returns {type(res).__name__}")
        shape = _shape(res)
        if shape is None or len(shape) != 2:
            raise PreconditionError(f"InsertEarlyExits needs a (batch, classes) output; the output has shape {shape}")
        return res

    @staticmethod
    def cut_points(gm: fx.GraphModule) -> list[fx.Node]:
        """Feature maps (ndim ≥ 3) through which all later computation flows, in graph order: no
        earlier node is read after them."""
        nodes = [n for n in gm.graph.nodes if n.op != "output"]
        index = {n: i for i, n in enumerate(nodes)}
        cuts, reach = [], -1  # reach: the last position read by any node before the current one
        for i, n in enumerate(nodes):
            shape = _shape(n)
            if reach <= i and n.op in ("call_module", "call_function", "call_method") and shape is not None \
                    and len(shape) >= 3:
                cuts.append(n)
            reach = max(reach, max((index.get(u, len(nodes)) for u in n.users), default=i))
        return cuts

    def _points(self, gm: fx.GraphModule, output: fx.Node) -> list[fx.Node]:
        cuts = self.cut_points(gm)
        if isinstance(self.at, list):
            by_name = {n.name: n for n in cuts}
            chosen = []
            for name in self.at:
                node = by_name.get(name)
                if node is None:  # a module name: the last node of its call
                    inside = [n for n in gm.graph.nodes if any(p == name for p, _ in _stack(n))]
                    node = inside[-1] if inside else None
                    if node is not None and node not in cuts:
                        raise PreconditionError(f"exit point {name!r}: later layers read tensors computed inside it "
                                                "(not a cut point of the graph); choose a block boundary")
                if node is None:
                    raise PreconditionError(f"exit point {name!r} is neither a module nor a cut node of the graph")
                chosen.append(node)
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            return sorted(set(chosen), key=order.__getitem__)
        if self.at == "stages":
            return self._stage_points(gm, cuts)
        return self._block_points(gm, cuts)

    @staticmethod
    def _block_ends(gm: fx.GraphModule) -> dict[fx.Node, list[str]]:
        """For each node, the called modules with child modules (blocks, containers) whose call it
        ends — unless a block around that module (not a mere Sequential/ModuleList) goes on after
        it (the end of a block's inner conv-BN-act is not a block boundary)."""
        last: dict[str, fx.Node] = {}
        cls: dict[str, type] = {}
        for n in gm.graph.nodes:
            for path, c in _stack(n):
                last[path], cls[path] = n, c
        ends: dict[fx.Node, list[str]] = {}
        for path, n in last.items():
            if not (path and has_module(gm, path) and any(True for _ in gm.get_submodule(path).children())):
                continue
            around = [q for q in last if path.startswith(q + ".")]
            if all(last[q] is n or issubclass(cls[q], (nn.Sequential, nn.ModuleList)) for q in around):
                ends.setdefault(n, []).append(path)
        return ends

    def _stage_points(self, gm: fx.GraphModule, cuts: list[fx.Node]) -> list[fx.Node]:
        ends = self._block_ends(gm)
        stages: list[list[fx.Node]] = []
        for n in cuts:
            if stages and _shape(stages[-1][-1])[2:] == _shape(n)[2:]:
                stages[-1].append(n)
            else:
                stages.append([n])
        bounded = [[n for n in st if n in ends] for st in stages]
        with_blocks = [i for i, b in enumerate(bounded) if b]
        if len(with_blocks) <= 1:  # a plain CNN (no blocks): the last cut point of each resolution
            return [st[-1] for st in stages[:-1]]
        return [bounded[i][-1] for i in with_blocks[:-1]]

    def _block_points(self, gm: fx.GraphModule, cuts: list[fx.Node]) -> list[fx.Node]:
        ends = self._block_ends(gm)
        classes: dict[str, type] = {}
        for n in gm.graph.nodes:
            for path, cls in _stack(n):
                classes[path] = cls
        counts: dict[type, int] = {}
        for cls in classes.values():
            counts[cls] = counts.get(cls, 0) + 1
        cands: dict[str, fx.Node] = {}
        for n in cuts:
            for path in ends.get(n, ()):
                cls = classes[path]
                if counts[cls] >= 2 and not issubclass(cls, (nn.Sequential, nn.ModuleList)) \
                        and any(True for _ in gm.get_submodule(path).parameters()):
                    cands[path] = n
        outer = [p for p in cands if not any(p.startswith(q + ".") for q in cands if q != p)]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        points = sorted({cands[p] for p in outer}, key=order.__getitem__)
        return points[:-1]

    def requires(self, graph_module: fx.GraphModule) -> None:
        require_shapes(graph_module, "InsertEarlyExits")
        if get_record(graph_module, ExitRecord) is not None:
            raise PreconditionError("the model already has early exits")
        self._output(graph_module)

    # -- rewrite ------------------------------------------------------------------------------------
    def _make_head(self, channels: int, num_classes: int, dims: int) -> nn.Module:
        if self.head == "msdnet":
            return msdnet_head(channels, num_classes, dims)
        if self.head == "linear":
            return linear_head(channels, num_classes, dims)
        return self.head(channels, num_classes)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        output = self._output(gm)
        points = self._points(gm, output)
        if not points:
            raise PreconditionError(f"InsertEarlyExits found no exit point for at={self.at!r}: the graph has no "
                                    "block boundary before its last stage")
        num_classes = _shape(output)[1]
        n_exits = len(points) + 1
        temps = (list(self.temperature) if isinstance(self.temperature, (list, tuple))
                 else [float(self.temperature)] * (n_exits - 1))
        if len(temps) != n_exits - 1:
            raise PreconditionError(f"{len(temps)} temperatures for {n_exits} exits (one per exit n >= 2)")
        ref = next((p for p in gm.parameters() if p.is_floating_point()), None)
        with torch.random.fork_rng():  # the heads' init is seeded; the caller's CPU and CUDA streams are kept
            torch.manual_seed(int(self.seed))
            heads = []
            for node in points:
                shape = _shape(node)
                head = self._make_head(shape[1], num_classes, len(shape) - 2)
                if ref is not None:
                    head = head.to(device=ref.device, dtype=ref.dtype)
                heads.append(head)
        gm.add_submodule("exit_heads", nn.ModuleList(heads))
        if self.rescale_gradients:
            gm.add_submodule("exit_scales", nn.Module())
        graph = gm.graph
        out_node = next(n for n in graph.nodes if n.op == "output")
        logits: list[fx.Node] = []
        names = []
        for i, node in enumerate(points):
            n = i + 1  # 1-based exit index
            users = [u for u in node.users]
            with graph.inserting_after(node):
                src = node
                if self.rescale_gradients:
                    trunk_scale = f"exit_scales.trunk_{n}"
                    set_module(gm, trunk_scale, GradientScale((n_exits - n) / (n_exits - n + 1)))
                    trunk = graph.call_module(trunk_scale, (node,))
                    for u in users:
                        u.replace_input_with(node, trunk)
                    with graph.inserting_after(trunk):
                        head_scale = f"exit_scales.head_{n}"
                        set_module(gm, head_scale, GradientScale(1.0 / (n_exits - n + 1)))
                        src = graph.call_module(head_scale, (node,))
            if not self.rescale_gradients and any(_in_place(gm, u) for u in users):
                with graph.inserting_after(node):  # the trunk overwrites the cut tensor: the head reads a copy
                    src = graph.call_method("clone", (node,))
            with graph.inserting_after(src):  # right after the cut: before any later (in-place) trunk op
                f = graph.call_module(f"exit_heads.{i}", (src,))
            logits.append(f)
            names.append(f"exit_heads.{i}")
        logits.append(output)
        with graph.inserting_before(out_node):
            boosted = [logits[0]]
            for n in range(1, n_exits):
                if self.boost:
                    prev = graph.call_method("detach", (boosted[-1],))
                    scaled = graph.call_function(torch.mul, (prev, float(temps[n - 1])))
                    boosted.append(graph.call_function(torch.add, (scaled, logits[n])))
                else:
                    boosted.append(logits[n])
        out_node.args = (tuple(boosted),)
        graph.lint()
        gm.recompile()
        set_record(gm, ExitRecord([p.name for p in points] + [None], names + [None],
                                  [float(t) for t in temps], bool(self.boost), bool(self.rescale_gradients),
                                  int(num_classes)))
        notes = [self.note("exit", p.name, f"exit {i + 1}/{n_exits}: head on {tuple(_shape(p)[1:])}")
                 for i, p in enumerate(points)]
        notes.append(self.note("exit", output.name, f"exit {n_exits}/{n_exits}: the backbone's own output"))
        return PassResult(gm, True, notes)


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may overwrite its input (``ReLU(inplace=True)``, ``x.add_()``, ``inplace=True``)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return bool(node.kwargs.get("inplace", False)) or node.target in _IN_PLACE_FUNCTIONS
