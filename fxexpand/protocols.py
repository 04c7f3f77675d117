"""Deprecated: moved to :mod:`fxexpand.training.protocols`."""

from ._deprecated import moved
from .training import protocols as _module

moved(__name__, _module)
