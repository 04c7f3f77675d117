"""The papers' settings as ready-made pass lists for :func:`fxexpand.compile` (defined in
:mod:`fxexpand.pipelines`, the one module that composes passes)."""

from .pipelines import RECIPES, early_exits, expandnets, get_recipe, netaug, netbooster

__all__ = ["netbooster", "expandnets", "netaug", "early_exits", "get_recipe", "RECIPES"]
