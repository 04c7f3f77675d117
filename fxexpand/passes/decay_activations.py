"""DecayActivations: make the activations inside expanded regions decayable.

Pattern: an activation module (ReLU, ReLU6, LeakyReLU, GELU, SiLU, Hardswish, ...) inside the body
of an :class:`~fxexpand.core.ExpandedRegion`.

Rewrite: wrap it in :class:`~fxexpand.core.DecayActivation` with ``alpha = 0`` (a buffer):

* ``kind="leaky"`` — NetBooster's ``max(alpha·x, x)`` (ReLU/ReLU6/LeakyReLU only);
* ``kind="blend"`` — ``alpha·x + (1 − alpha)·act(x)`` for any activation;
* ``kind="auto"`` (default) — leaky where it applies, blend otherwise.

At ``alpha = 1`` every wrapped activation is the identity and the region is linear, so
:func:`fxexpand.contract` can fold it back into the original layer.

Preconditions (``requires``): every region named in ``targets`` exists. It decays the regions
that exist when it runs, so it goes after the expansion passes whose regions it should decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch.fx as fx
from torch import nn

from ..core import (
    ACTIVATION_MODULES,
    DecayActivation,
    Pass,
    PassResult,
    PreconditionError,
    find_regions,
    register_pass,
    set_module,
)

__all__ = ["DecayActivations"]

_LEAKY_OK = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)


@register_pass("decay_activations")
@dataclass(kw_only=True)
class DecayActivations(Pass):
    """Wrap activations inside expanded regions in DecayActivation (alpha buffer, starts at 0).

    Args:
        targets: "expanded" (every expanded region) or a list of region qualified names.
        kind: "auto", "leaky" or "blend".
    """

    targets: Any = "expanded"
    kind: Literal["auto", "leaky", "blend"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ("auto", "leaky", "blend"):
            raise ValueError("kind must be 'auto', 'leaky' or 'blend'")
        if self.targets != "expanded" and not (isinstance(self.targets, (list, tuple))
                                               and all(isinstance(t, str) for t in self.targets)):
            raise TypeError("targets must be 'expanded' or a list of expanded-region names")
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)

    def requires(self, graph_module: fx.GraphModule) -> None:
        if self.targets != "expanded":
            regions = find_regions(graph_module)
            missing = [t for t in self.targets if t not in regions]
            if missing:
                raise PreconditionError(f"{self.name}: {missing} are not expanded regions (have: {sorted(regions)})")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        regions = find_regions(gm)
        if self.targets != "expanded":
            regions = {n: regions[n] for n in self.targets}
        notes = []
        modified = False
        for rname, region in regions.items():
            modules = list(region.body.named_modules())
            # the activation an existing DecayActivation wraps is decayed already: never wrap it twice
            wrapped = {f"{n}.activation" if n else "activation" for n, m in modules if isinstance(m, DecayActivation)}
            for name, m in modules:
                if not isinstance(m, ACTIVATION_MODULES) or isinstance(m, DecayActivation) or name in wrapped:
                    continue
                kind = self.kind
                if kind == "auto":
                    kind = "leaky" if isinstance(m, _LEAKY_OK) else "blend"
                if kind == "leaky" and not isinstance(m, _LEAKY_OK):
                    notes.append(self.note("skipped", f"{rname}.body.{name}",
                                           f"kind='leaky' does not apply to {type(m).__name__}; use 'blend'"))
                    continue
                set_module(region.body, name, DecayActivation(m, kind=kind, alpha=0.0))
                notes.append(self.note("decayed", f"{rname}.body.{name}", f"{kind} {type(m).__name__}"))
                modified = True
        if not regions:
            notes.append(self.note("info", "-", "no expanded regions: run an expansion pass first"))
        return PassResult(gm, modified, notes)

