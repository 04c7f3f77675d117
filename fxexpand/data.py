"""Deprecated: moved to :mod:`fxexpand.demo.data`."""

from ._deprecated import moved
from .demo import data as _module

moved(__name__, _module)
