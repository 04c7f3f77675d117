"""ExtractBase: slice every width-dynamic layer back to the original layer at its base width.

Pattern: a :class:`~fxexpand.core.DynamicLayer` call (built by
:class:`~fxexpand.passes.AugmentWidth`) in a traced graph.

Rewrite: install ``layer.extract()`` — the original layer type (Conv1d/2d/3d, Linear,
BatchNorm1d/2d/3d, LayerNorm) holding the leading (base) slice of every parameter and buffer — at
the same qualified name. The graph is unchanged; the model's function in the base configuration is
unchanged (the dynamic layer computed exactly this slice), so the result has the original model's
architecture, ``state_dict`` keys and shapes.

Preconditions (all layers are checked before any is replaced): every dynamic layer is in the base
configuration (``fxexpand.set_width(model, "base")``); otherwise the model computes an augmented
network that the tiny model cannot reproduce, and :class:`~fxexpand.core.ContractionError` is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..core import (
    ContractionError,
    DynamicLayer,
    Pass,
    PassResult,
    WidthRecord,
    drop_record,
    get_module,
    register_pass,
    set_module,
)

__all__ = ["ExtractBase"]


@register_pass("extract_base")
@dataclass(kw_only=True)
class ExtractBase(Pass):
    """Replace each dynamic (NetAug) layer by the original layer holding its base slice."""

    @staticmethod
    def _dynamic(gm: fx.GraphModule) -> list[str]:
        seen: list[str] = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target not in seen \
                    and isinstance(get_module(gm, node.target), DynamicLayer):
                seen.append(node.target)
        return seen

    def requires(self, graph_module: fx.GraphModule) -> None:
        bad = [n for n in self._dynamic(graph_module) if not get_module(graph_module, n).is_base]
        if bad:
            raise ContractionError(
                f"cannot contract: {len(bad)} dynamic layer(s) are not in the base configuration "
                f"({', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}); call fxexpand.set_width(model, 'base') first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        names = self._dynamic(gm)
        if not names:
            return PassResult(gm, False, [])
        notes = []
        for name in names:
            layer = get_module(gm, name)
            set_module(gm, name, layer.extract())
            notes.append(self.note("extracted", name, f"{layer.original_cls.__name__} at widths {layer.base_widths}"))
        gm.recompile()
        drop_record(gm, WidthRecord)  # the result is the tiny model: no augmentable widths any more
        return PassResult(gm, True, notes)
