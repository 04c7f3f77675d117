"""Deprecated: moved to :mod:`fxexpand.deploy.bench`."""

from ._deprecated import moved
from .deploy import bench as _module

moved(__name__, _module)
