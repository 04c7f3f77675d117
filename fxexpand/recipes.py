"""The papers' settings as ready-made pass lists for :func:`fxexpand.compile` (defined in
:mod:`fxexpand.pipelines`, the one module that composes passes)."""

from .pipelines import RECIPES, expandnets, get_recipe, netbooster

__all__ = ["netbooster", "expandnets", "get_recipe", "RECIPES"]
