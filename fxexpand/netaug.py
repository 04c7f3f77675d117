"""Deprecated: moved to :mod:`fxexpand.training.netaug`."""

from ._deprecated import moved
from .training import netaug as _module

moved(__name__, _module)
