"""Deprecated: moved to :mod:`fxexpand.training.ema`."""

from ._deprecated import moved
from .training import ema as _module

moved(__name__, _module)
