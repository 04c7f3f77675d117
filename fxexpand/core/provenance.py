"""How an expanded region remembers the layer it came from.

An expansion pass replaces one original layer (say ``features.3.conv.0``, a ``Conv2d``) with an
:class:`ExpandedRegion` installed *at the same qualified name*. The region holds the expanded
structure in ``body`` and records the original layer's type and constructor arguments as plain
Python values. Because this lives in the module tree (not in ``gm.meta`` / ``node.meta``, which
pickling drops), it survives ``torch.save`` of the expanded model; a ``state_dict`` round trip
works by re-running the same expansion and loading the weights.

Contraction restores only layer types from :data:`RESTORABLE_TYPES` (no import of a name read
from a file).

What modules pass to each other about a model is a *typed record* (never a string key):
:class:`ModuleRenames` (a pass moved, renamed or copied modules; carried by ``PassResult.records``),
:class:`ParameterOrigins` (which tensor of the input model each parameter continues),
:class:`Recipe` (the passes that built an expanded model, so a file can rebuild it) and
:class:`GrowthRecord` (a growing model's chains or channel groups) and :class:`ModelFactory` (the
allowed factory that built a model, so a file can name it). :func:`set_record` /
:func:`get_record` keep them on a module, keyed by their type; persistent records survive
``copy.deepcopy`` and pickling of a GraphModule (see :func:`keep_attr`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.fx as fx
from torch import nn

from .collapse import chain_problem, collapse_pays, run_collapsed, runtime_problem

__all__ = [
    "ExpandedRegion",
    "layer_config",
    "build_layer",
    "find_regions",
    "region_of",
    "traced_regions",
    "set_traced_regions",
    "RESTORABLE_TYPES",
    "ModuleRenames",
    "ParameterOrigins",
    "Recipe",
    "ChainRecord",
    "GrowthRecord",
    "ModelFactory",
    "WidthGroup",
    "WidthRecord",
    "ExitRecord",
    "set_record",
    "get_record",
    "drop_record",
    "persistent_records",
    "keep_attr",
]

RESTORABLE_TYPES: dict[str, type[nn.Module]] = {
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Linear": nn.Linear,
}


def layer_config(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a restorable layer, as plain Python values."""
    if isinstance(module, nn.Linear):
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": tuple(module.kernel_size),
            "stride": tuple(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
            "dilation": tuple(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }
    raise TypeError(
        f"cannot record {type(module).__name__} as an expansion origin; restorable types: "
        f"{', '.join(RESTORABLE_TYPES)}"
    )


def build_layer(type_name: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate a restorable layer from its recorded type name and configuration."""
    try:
        cls = RESTORABLE_TYPES[type_name]
    except KeyError:
        raise TypeError(f"{type_name!r} is not a restorable layer type") from None
    return cls(**config)


class ExpandedRegion(nn.Module):
    """Container for the expanded replacement of one original layer.

    Attributes:
        body: the expanded structure (any traceable module).
        original_type: class name of the original layer (a key of :data:`RESTORABLE_TYPES`).
        original_config: its constructor arguments.
        method: which expansion produced it (free text, e.g. ``"InsertInvertedResidual"``).
    """

    def __init__(self, body: nn.Module, original: nn.Module, method: str = ""):
        super().__init__()
        self.body = body
        self.original_type = type(original).__name__
        self.original_config = layer_config(original)
        self.method = method
        self.train_mode = "explicit"
        self.last_form = ""  # how the last training forward ran: "collapsed" or "explicit: <why>"

    def set_train_mode(self, mode: str) -> str:
        """``"collapsed"``: in training mode, run the body as one op whose weight is composed from the
        factors each forward (:mod:`fxexpand.core.collapse`) — if the body is a linear,
        batch-independent chain in its state at that forward (BatchNorms in eval mode, decaying
        activations at alpha = 1, dropout off: :func:`~fxexpand.core.collapse.runtime_problem`), and
        for each input where that costs fewer multiply-accumulates than the chain (eval mode, export
        and tracing run the chain); ``"explicit"``: run the chain. Returns the mode in effect and, for
        an explicit region asked to collapse, why (``"explicit: <reason>"``; a region that collapses
        only in other states — a NetBooster block, whose BatchNorms train with the model and whose
        activations decay to alpha = 1 — says which states block it; its ``train_mode`` stays
        ``"collapsed"``)."""
        if mode not in ("collapsed", "explicit"):
            raise ValueError(f"train_mode must be 'collapsed' or 'explicit', got {mode!r}")
        problem = chain_problem(self.body) if mode == "collapsed" else ""
        self.train_mode = "explicit" if problem else mode
        self.last_form = ""
        if problem:
            return f"explicit: {problem}"
        if mode == "collapsed":
            # what blocks it in training as the model stands (BatchNorms train with the model)
            now = runtime_problem(self.body, assume_training=True)
            if now:
                return f"explicit: runs its chain while {now}; collapses once none holds"
        return self.train_mode

    def extra_repr(self) -> str:
        return (f"original={self.original_type}({self.original_config}), method={self.method!r}, "
                f"train_mode={getattr(self, 'train_mode', 'explicit')!r}")

    def forward(self, *args, **kwargs):
        # collapsed in training only; in eval mode, exported or traced (contraction inlines regions)
        # the region runs its explicit chain, which the passes contract
        if self.training and getattr(self, "train_mode", "explicit") == "collapsed" and len(args) == 1 and not kwargs \
                and isinstance(args[0], torch.Tensor) and not isinstance(args[0], fx.Proxy):
            why = runtime_problem(self.body, first=True) or (
                "" if collapse_pays(self.body, tuple(args[0].shape)) else "composing costs more than the chain on this input")
            self.last_form = f"explicit: {why}" if why else "collapsed"
            if not why:
                return run_collapsed(self.body, args[0])
        return self.body(*args, **kwargs)


def find_regions(model: nn.Module) -> dict[str, ExpandedRegion]:
    """Qualified names of every :class:`ExpandedRegion` in ``model``'s module tree."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpandedRegion)}


def region_of(graph_module: fx.GraphModule, node: fx.Node) -> str | None:
    """The qualified name of the expanded region a node belongs to, or None.

    Uses the region list :func:`fxexpand.trace` stores in ``graph_module.meta`` (a cache rebuilt at
    every trace) and the node's ``nn_module_stack``; call_module/get_attr targets are used too.
    """
    regions = traced_regions(graph_module)
    if not regions:
        return None
    paths: list[str] = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        for key, val in stack.items():
            paths.append(val[0] if isinstance(val, tuple) else key)
    if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
        paths.append(node.target)
    # the shortest region r with p == r or p.startswith(r + "."): look up p's dotted prefixes,
    # shortest first (O(depth) hash lookups per path instead of a scan over every region)
    best = None
    for p in paths:
        parts = p.split(".")
        for i in range(1, len(parts) + 1):
            r = ".".join(parts[:i])
            if r in regions:
                if best is None or len(r) < len(best):
                    best = r
                break
    return best


_REGIONS_KEY = "fxexpand_regions"


def set_traced_regions(graph_module: fx.GraphModule, regions: dict[str, tuple[str, dict]]) -> None:
    """Cache, on a GraphModule traced *through* its regions, each region's (original type, config).

    ``gm.meta`` is not pickled, so this is a cache rebuilt at every :func:`fxexpand.core.trace`."""
    graph_module.meta[_REGIONS_KEY] = regions


def traced_regions(graph_module: fx.GraphModule) -> dict[str, tuple[str, dict]]:
    """``{region name: (original type name, constructor arguments)}`` of the regions the trace went
    through (empty for a trace that kept regions as single calls)."""
    regions = graph_module.meta.get(_REGIONS_KEY) or {}
    if not isinstance(regions, dict):
        regions = {r: None for r in regions}
    return regions


# -- typed records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleRenames:
    """Reported by a pass that moves modules (``PassResult.records``).

    ``renames``: new module name -> the name it had before the pass (None for a new module);
    ``copied_from``: new module name -> the module it is a copy of."""

    renames: dict[str, str | None] = field(default_factory=dict)
    copied_from: dict[str, str] = field(default_factory=dict)


@dataclass
class ParameterOrigins:
    """For each parameter/buffer of a compiled model, the tensor of the input model it continues:
    ``origin[name] = (old name, weakref to the old tensor)``; ``copied_from[name]`` names the tensor
    a new parameter was copied from. Transient (not deep-copied; pickled empty); used by
    :func:`fxexpand.rebuild_optimizer` and :class:`fxexpand.EMA` after growth."""

    origin: dict[str, tuple[str, weakref.ref]] = field(default_factory=dict)
    copied_from: dict[str, str] = field(default_factory=dict)

    def __reduce__(self):
        # weak references to another model's tensors mean nothing in another process: a pickled
        # model (torch.save) carries an empty record
        return (ParameterOrigins, ())


@dataclass
class Recipe:
    """The registered passes (name, plain keyword arguments) that built a model, in order; None for
    a pass that cannot be recorded (an unregistered pass or non-plain arguments)."""

    passes: list[tuple[str, dict] | None] = field(default_factory=list)

    @property
    def replayable(self) -> bool:
        return all(p is not None for p in self.passes)


@dataclass
class ChainRecord:
    """One chain of a depth-growing model: its block class, the full model's block names
    (``slots``) and the blocks present now (``members``)."""

    cls: str
    slots: list[str]
    members: list[str]


@dataclass
class GrowthRecord:
    """How a model built by :meth:`fxexpand.GrowthPlan.initial_model` relates to the full model.

    ``mode`` "depth": ``chains`` (chain id -> :class:`ChainRecord`); ``mode`` "width": ``groups``
    (channel group id -> full width) and the depthwise convs; ``inputs``: example input shapes
    and dtypes."""

    mode: Literal["depth", "width"]
    chains: dict[str, ChainRecord] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    depthwise: list[str] = field(default_factory=list)
    inputs: list[tuple[list[int], str]] = field(default_factory=list)

    def example_inputs(self, like: nn.Module) -> tuple[torch.Tensor, ...]:
        """Zeros shaped like the recorded inputs, in ``like``'s floating dtype and device."""
        p = next((t for t in like.parameters() if t.is_floating_point()), None)
        dtype = p.dtype if p is not None else torch.float32
        device = p.device if p is not None else None
        return tuple(torch.zeros(shape, dtype=getattr(torch, dt) if dt.startswith("int") else dtype, device=device)
                     for shape, dt in self.inputs)


@dataclass(frozen=True)
class ModelFactory:
    """The registered or allowed factory (``"torchvision:mobilenet_v2"``, ``"pkg.mod:fn"``) and the
    keyword arguments that built a model (:func:`fxexpand.build_model`)."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class WidthGroup:
    """One augmentable channel group of a NetAug model: its axis ("width": the group reaches a
    residual stream; "expand": a block's hidden width), base (tiny-model) width, largest width and
    the widths a sampler may choose (``choices[0]`` is the base width)."""

    axis: Literal["width", "expand"]
    base: int
    max: int
    choices: list[int]
    layers: list[str] = field(default_factory=list)


@dataclass
class WidthRecord:
    """What :class:`~fxexpand.passes.AugmentWidth` built: the augmentable groups, the frozen ones
    (group id -> reason) and when width augmentation stops (fraction of training, or None)."""

    groups: dict[str, WidthGroup] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)
    stop_width_at: float | None = None

    def base(self) -> dict[str, int]:
        return {g: s.base for g, s in self.groups.items()}

    def max(self) -> dict[str, int]:
        return {g: s.max for g, s in self.groups.items()}


@dataclass
class ExitRecord:
    """What :class:`~fxexpand.passes.InsertEarlyExits` built: for each exit (in order, the
    backbone's own output last) the trunk node it reads (None for the last), its head module
    (None for the last: the backbone's own tail) and its temperature; whether outputs are boosted
    and gradients rescaled; the number of classes."""

    points: list[str | None] = field(default_factory=list)
    heads: list[str | None] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    boost: bool = True
    rescale_gradients: bool = True
    num_classes: int = 0

    @property
    def num_exits(self) -> int:
        return len(self.heads)


_PERSISTENT_KEY = "fxexpand_records"
_TRANSIENT_KEY = "_fxexpand_transient_records"
_TRANSIENT = (ParameterOrigins,)
R = TypeVar("R")


def keep_attr(module: nn.Module, name: str, value: Any) -> None:
    """Set an attribute that survives ``copy.deepcopy`` and pickling of a GraphModule.

    (``GraphModule.__deepcopy__`` rebuilds the module and keeps only attributes registered in
    ``meta["_user_preserved_attributes"]``.) On any other module it is a plain attribute.
    """
    setattr(module, name, value)
    if isinstance(module, fx.GraphModule):
        module.meta.setdefault("_user_preserved_attributes", {})[name] = value


def set_record(module: nn.Module, record: Any) -> None:
    """Attach a typed record to ``module`` (one per record type; a new one replaces the old).
    :class:`ParameterOrigins` is transient (not deep-copied or pickled); the others persist."""
    key = _TRANSIENT_KEY if isinstance(record, _TRANSIENT) else _PERSISTENT_KEY
    table = dict(getattr(module, key, None) or {})
    table[type(record).__name__] = record
    if key == _PERSISTENT_KEY:
        keep_attr(module, key, table)
    else:
        setattr(module, key, table)


def get_record(module: nn.Module, kind: type[R]) -> R | None:
    """The record of type ``kind`` attached to ``module``, or None."""
    for key in (_PERSISTENT_KEY, _TRANSIENT_KEY):
        rec = (getattr(module, key, None) or {}).get(kind.__name__)
        if isinstance(rec, kind):
            return rec
    return None


def drop_record(module: nn.Module, kind: type) -> None:
    """Remove ``module``'s record of type ``kind`` (a pass that undoes what the record describes)."""
    for key in (_PERSISTENT_KEY, _TRANSIENT_KEY):
        table = dict(getattr(module, key, None) or {})
        if table.pop(kind.__name__, None) is not None:
            if key == _PERSISTENT_KEY:
                keep_attr(module, key, table)
            else:
                setattr(module, key, table)


def persistent_records(module: nn.Module) -> list[Any]:
    """Every persistent record attached to ``module`` (what a model built from it inherits)."""
    return list((getattr(module, _PERSISTENT_KEY, None) or {}).values())
