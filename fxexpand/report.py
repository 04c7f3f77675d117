"""Deprecated: moved to :mod:`fxexpand.deploy.report`."""

from ._deprecated import moved
from .deploy import report as _module

moved(__name__, _module)
