"""Deprecated: moved to :mod:`fxexpand.deploy.export`."""

from ._deprecated import moved
from .deploy import export as _module

moved(__name__, _module)
