"""How an expanded region remembers the layer it came from.

An expansion pass replaces one original layer (say ``features.3.conv.0``, a ``Conv2d``) with an
:class:`ExpandedRegion` installed *at the same qualified name*. The region holds the expanded
structure in ``body`` and records the original layer's type and constructor arguments as plain
Python values. Because this lives in the module tree (not in ``gm.meta`` / ``node.meta``, which
pickling drops), it survives ``torch.save`` of the expanded model; a ``state_dict`` round trip
works by re-running the same expansion and loading the weights.

Contraction restores only layer types from :data:`RESTORABLE_TYPES` (no import of a name read
from a file).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

__all__ = [
    "ExpandedRegion",
    "layer_config",
    "build_layer",
    "find_regions",
    "region_of",
    "RESTORABLE_TYPES",
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

    def extra_repr(self) -> str:
        return f"original={self.original_type}({self.original_config}), method={self.method!r}"

    def forward(self, *args, **kwargs):
        return self.body(*args, **kwargs)

    def build_original(self) -> nn.Module:
        return build_layer(self.original_type, self.original_config)


def find_regions(model: nn.Module) -> dict[str, ExpandedRegion]:
    """Qualified names of every :class:`ExpandedRegion` in ``model``'s module tree."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpandedRegion)}


def region_of(graph_module: fx.GraphModule, node: fx.Node) -> str | None:
    """The qualified name of the expanded region a node belongs to, or None.

    Uses the region list :func:`fxexpand.trace` stores in ``graph_module.meta`` (a cache rebuilt at
    every trace) and the node's ``nn_module_stack``; call_module/get_attr targets are used too.
    """
    regions = graph_module.meta.get("fxexpand_regions") or ()
    if not regions:
        return None
    if not isinstance(regions, (dict, set, frozenset)):
        regions = set(regions)
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
