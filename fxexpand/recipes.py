"""The papers' settings as ready-made pass lists for :func:`fxexpand.compile`."""

from __future__ import annotations

from typing import Any

from .passes import DecayActivations, InsertInvertedResidual, LinearExpand

__all__ = ["netbooster", "expandnets", "get_recipe", "RECIPES"]


def netbooster(ratio: int = 6, fraction: float = 0.5, kernel_size: Any = "auto", targets: Any = "blocks") -> list:
    """NetBooster: inverted residual blocks (×6) in place of the first pointwise conv of every other
    repeated block (the block's first conv, with a matching depthwise kernel, when it has no
    pointwise conv, as for ResNet-18), with decayable activations for Progressive Linearization
    Tuning (leaky for ReLU-family activations, blend otherwise)."""
    return [InsertInvertedResidual(ratio=ratio, fraction=fraction, kernel_size=kernel_size, targets=targets),
            DecayActivations(kind="auto")]


def expandnets(mode: str = "CL", ratio: int = 4, fc: bool = True, init: str = "random", fc_layers: int = 3) -> list:
    """ExpandNets: linear expansion of every eligible conv (CL or CK) and, with ``fc``, every Linear."""
    if mode not in ("CL", "CK", "FC"):
        raise ValueError("mode must be 'CL', 'CK' or 'FC'")
    passes = [LinearExpand(mode=mode, ratio=ratio, init=init, fc_layers=fc_layers)]
    if fc and mode != "FC":
        passes.append(LinearExpand(mode="FC", ratio=ratio, init=init, fc_layers=fc_layers))
    return passes


RECIPES = {
    "netbooster": netbooster,
    "netbooster-match": lambda: netbooster(kernel_size="match"),
    "expandnets-cl": lambda: expandnets("CL"),
    "expandnets-ck": lambda: expandnets("CK"),
    "expandnets-fc": lambda: expandnets("FC"),
}


def get_recipe(name: str) -> list:
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
