"""The one place that composes passes: contraction, the papers' recipes, and growth stages.

Everything above the engine that needs a *list of passes* asks this module for it; it is the only
engine-level importer of :mod:`fxexpand.passes` (import-linter checks this in CI).

* :func:`contraction` — the passes :func:`fxexpand.contract` runs: identity removal, BatchNorm
  folding and linear fusion to a fixed point, then (target "original") :class:`RestoreOriginal`;
* :func:`netbooster`, :func:`expandnets`, :data:`RECIPES`, :func:`get_recipe` — the papers' settings
  (also available as :mod:`fxexpand.recipes`);
* :func:`depth_growth`, :func:`width_growth` — the pass of one Network Expansion growth stage.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from .core import Pass, PassManager, build_pass
from .passes import (
    AugmentWidth,
    DecayActivations,
    ExtractBase,
    RemoveExits,
    FoldBatchNorm,
    FuseLinear,
    GrowWidth,
    InsertEarlyExits,
    InsertEMABlocks,
    InsertInvertedResidual,
    LinearExpand,
    RemoveIdentity,
    RestoreOriginal,
)

__all__ = [
    "contraction", "exit_removal", "netbooster", "expandnets", "netaug", "early_exits", "get_recipe", "RECIPES", "depth_growth", "width_growth",
    "RESTORE_PASS",
]

#: registered name of the pass that puts contracted regions back as their original layers
RESTORE_PASS = RestoreOriginal.registered_name


def contraction(
    target: Literal["original", "deploy"],
    *,
    extra_passes: tuple = (),
    verify_each: bool = False,
    example_inputs: Any = None,
    rtol: float = 1e-4,
    atol: float = 0.0,
) -> list[PassManager]:
    """The pass managers :func:`fxexpand.contract` runs, in order.

    0. :class:`ExtractBase`: NetAug's dynamic layers become the original layers at base width;
       :class:`RemoveExits`: BoostNet's exits come out (the output is the backbone's own f_N);
    1. :class:`RemoveIdentity`, :class:`FoldBatchNorm`, :class:`FuseLinear` (and ``extra_passes``) to
       a fixed point, limited to expanded regions for target "original";
    2. for target "original", :class:`RestoreOriginal` (declared to run after the three above).
    """
    scope = "expanded" if target == "original" else "all"
    passes: list[Pass] = [RemoveIdentity(scope=scope), FoldBatchNorm(scope=scope), FuseLinear(scope=scope),
                          *[build_pass(p) for p in extra_passes]]
    # the graph is linted once, when contract() generates its code (graph.lint() after every pass
    # was a tenth of a contraction); verify_each keeps the per-pass lint with its per-pass checks
    opts = dict(verify_each=verify_each, example_inputs=example_inputs, rtol=rtol, atol=atol, lint=verify_each)
    managers = [PassManager(passes=[ExtractBase(), RemoveExits()], **opts),
                PassManager(passes=passes, fixed_point=True, **opts)]
    if target == "original":
        managers.append(PassManager(passes=[RestoreOriginal()], **opts))
    return managers


def exit_removal() -> PassManager:
    """The pass manager that takes BoostNet's exits out of a multi-exit model (its output becomes
    the backbone's own f_N): the reference :func:`fxexpand.contract` verifies such a model against."""
    return PassManager(passes=[RemoveExits()])


# -- the papers' recipes ------------------------------------------------------------------------------
def netbooster(ratio: int = 6, fraction: float = 0.5, kernel_size: Any = "auto", targets: Any = "blocks") -> list:
    """NetBooster: inverted residual blocks (×6) in place of the first pointwise conv of every other
    repeated block (the block's first conv, with a matching depthwise kernel, when it has no
    pointwise conv, as for ResNet-18), with decayable activations for Progressive Linearization
    Tuning (leaky for ReLU-family activations, blend otherwise)."""
    return [InsertInvertedResidual(ratio=ratio, fraction=fraction, kernel_size=kernel_size, targets=targets),
            DecayActivations(kind="auto")]


def expandnets(mode: str = "CL", ratio: int = 4, fc: bool = True, init: str = "random", fc_layers: int = 3,
               layers: str = "paper") -> list:
    """ExpandNets (r = 4 as in the paper): CL or CK expansion of the convs and, with ``fc``, FC
    expansion of the Linear layers (CL+FC / CK+FC).

    ``layers="paper"`` (default) chooses the layers as the paper does (Sec. 4.1, 4.2): every k×k
    conv (k > 1; never 1x1 convs) of a plain CNN, only the non-residual ones of a residual model
    (MobileNetV2), and the hidden FC layers (not the logit layer); ``layers="all"`` expands every
    eligible layer. ``init="nonlinear"`` is **+Init** (Sec. 3.2): the regions start as the
    nonlinear counterpart; train, :func:`fxexpand.linearize`, train again
    (:func:`fxexpand.protocols.expandnets_init` is that protocol)."""
    if mode not in ("CL", "CK", "FC"):
        raise ValueError("mode must be 'CL', 'CK' or 'FC'")
    passes = [LinearExpand(mode=mode, ratio=ratio, init=init, fc_layers=fc_layers, layers=layers)]
    if fc and mode != "FC":
        passes.append(LinearExpand(mode="FC", ratio=ratio, init=init, fc_layers=fc_layers, layers=layers))
    return passes


def netaug(**kwargs: Any) -> list:
    """NetAug: every free channel group made augmentable (:class:`AugmentWidth`, its defaults are the
    paper's multipliers scaled to the model; keyword arguments go to the pass)."""
    return [AugmentWidth(**kwargs)]


def early_exits(boost: bool = True, at: str = "blocks", seed: int = 0, **kwargs: Any) -> list:
    """BoostNet: boosted early exits after the model's blocks (``boost=False``: plain joint training
    of the exits, the paper's baseline); keyword arguments go to :class:`InsertEarlyExits`."""
    return [InsertEarlyExits(at=at, boost=boost, seed=seed, **kwargs)]


RECIPES = {
    "netbooster": netbooster,
    "netbooster-match": lambda: netbooster(kernel_size="match"),
    "expandnets-cl": lambda: expandnets("CL"),
    "expandnets-ck": lambda: expandnets("CK"),
    "expandnets-fc": lambda: expandnets("FC"),
    "expandnets-ck-init": lambda: expandnets("CK", init="nonlinear"),
    "expandnets-cl-init": lambda: expandnets("CL", init="nonlinear"),
    "netaug": netaug,
    "early-exits": early_exits,
}


def get_recipe(name: str) -> list:
    """The pass list of a recipe in :data:`RECIPES`."""
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


# -- Network Expansion growth stages --------------------------------------------------------------------
def depth_growth(ema_model: nn.Module, new_blocks: dict[str, int]) -> list:
    """The pass of a depth growth stage: insert ``new_blocks[chain]`` copies of EMA blocks per chain."""
    return [InsertEMABlocks(ema_model=ema_model, count=dict(new_blocks))]


def width_growth(to: float, *, init: str, seed: int) -> list:
    """The pass of a width growth stage: grow every channel group to ``to`` of its full width."""
    return [GrowWidth(to=to, init=init, seed=seed)]
