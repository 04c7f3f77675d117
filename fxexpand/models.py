"""Deprecated: moved to :mod:`fxexpand.demo.models`."""

from ._deprecated import moved
from .demo import models as _module

moved(__name__, _module)
