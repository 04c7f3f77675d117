"""Deprecated: moved to :mod:`fxexpand.training.train`."""

from ._deprecated import moved
from .training import train as _module

moved(__name__, _module)
