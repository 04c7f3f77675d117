"""Deprecated: moved to :mod:`fxexpand.training.growth`."""

from ._deprecated import moved
from .training import growth as _module

moved(__name__, _module)
