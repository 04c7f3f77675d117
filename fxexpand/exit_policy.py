"""Deprecated: moved to :mod:`fxexpand.exits.policy` (``ExitPolicy`` is now :class:`fxexpand.exits.Policy`;
``plot_curves`` is :func:`fxexpand.demo.early_exits.plot_curves`)."""

import warnings

from .demo.early_exits import plot_curves
from .exits.policy import *  # noqa: F403 - the old module's names
from .exits.policy import __all__ as _policy_names

__all__ = [*_policy_names, "plot_curves"]

warnings.warn("fxexpand.exit_policy moved to fxexpand.exits.policy (plot_curves to fxexpand.demo.early_exits); "
              "import it from there (the old path will be removed)", DeprecationWarning, stacklevel=2)
