"""Deprecated: moved to :mod:`fxexpand.training.schedule`."""

from ._deprecated import moved
from .training import schedule as _module

moved(__name__, _module)
