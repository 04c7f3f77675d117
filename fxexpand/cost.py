"""Deprecated: moved to :mod:`fxexpand.deploy.cost`."""

from ._deprecated import moved
from .deploy import cost as _module

moved(__name__, _module)
