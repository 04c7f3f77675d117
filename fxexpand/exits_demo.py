"""Deprecated: moved to :mod:`fxexpand.demo.early_exits`."""

from ._deprecated import moved
from .demo import early_exits as _module

moved(__name__, _module)
