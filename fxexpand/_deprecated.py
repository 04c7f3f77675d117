"""The old flat module paths (``fxexpand.train``, ``fxexpand.bench``, ...) of modules that now live in
the application packages (docs/architecture.md). Each old path is a small module that imports the
new one and calls :func:`moved`, which warns once and makes the old name the new module itself
(``fxexpand.train is fxexpand.training.train``), so every name, public or not, stays where it was.
``fxexpand.exit_policy`` is the exception: it re-exports :mod:`fxexpand.exits.policy` and
``plot_curves`` (now in :mod:`fxexpand.demo.early_exits`)."""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "moved"]

#: old module path -> new module path
MOVED = {
    "fxexpand.bench": "fxexpand.deploy.bench",
    "fxexpand.cost": "fxexpand.deploy.cost",
    "fxexpand.export": "fxexpand.deploy.export",
    "fxexpand.report": "fxexpand.deploy.report",
    "fxexpand.ema": "fxexpand.training.ema",
    "fxexpand.growth": "fxexpand.training.growth",
    "fxexpand.netaug": "fxexpand.training.netaug",
    "fxexpand.protocols": "fxexpand.training.protocols",
    "fxexpand.schedule": "fxexpand.training.schedule",
    "fxexpand.train": "fxexpand.training.train",
    "fxexpand.data": "fxexpand.demo.data",
    "fxexpand.models": "fxexpand.demo.models",
    "fxexpand.exits_demo": "fxexpand.demo.early_exits",
}


def moved(old: str, module: ModuleType) -> None:
    """Warn that ``old`` moved (DeprecationWarning) and bind ``sys.modules[old]`` to ``module``, its
    new home (imported by the alias itself, so that import-linter sees the alias's layer)."""
    new = MOVED[old]
    if module.__name__ != new:
        raise ImportError(f"{old} is an alias of {new}, not of {module.__name__}")
    warnings.warn(f"{old} moved to {new}; import it from there (the old path will be removed)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = module
