"""EMA of a model's weights and buffers, following the model as it grows.

:class:`EMA` wraps :class:`torch.optim.swa_utils.AveragedModel` with the exponential-moving-average
update of :func:`torch.optim.swa_utils.get_ema_multi_avg_fn` (``use_buffers=True``: BatchNorm running
statistics are averaged too). When :meth:`EMA.update` receives a model grown by
:func:`fxexpand.compile` (new blocks, renamed blocks, more channels), the average is rebuilt for
the new architecture: every tensor that existed keeps its average (renamed blocks included; a grown
tensor keeps it in its leading corner), new tensors start from the model's values.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..core import InputError, ParameterOrigins, get_record
from .growth import embed

__all__ = ["EMA"]


def _named_tensors(m: nn.Module):
    return itertools.chain(m.named_parameters(), m.named_buffers())


class EMA:
    """Exponential moving average of ``model`` (weights and buffers): ``ema = decay·ema + (1-decay)·model``.

    Args:
        model: the model to average (copied; not modified).
        decay: in [0, 1).
        use_buffers: also average buffers (BatchNorm statistics); default True.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, use_buffers: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA expects an nn.Module, got {type(model).__name__}")
        if not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.use_buffers = use_buffers
        self.averaged = self._new(model)
        self._model = weakref.ref(model)

    def _new(self, model: nn.Module) -> AveragedModel:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=self.use_buffers)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same architecture as the model it follows)."""
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (rebuilding it first if ``model`` grew)."""
        if self._model() is not model:
            if not self._same_structure(model):
                self.follow(model)
            self._model = weakref.ref(model)
        self.averaged.update_parameters(model)

    def _same_structure(self, model: nn.Module) -> bool:
        a = {k: tuple(v.shape) for k, v in _named_tensors(self.module)}
        b = {k: tuple(v.shape) for k, v in _named_tensors(model)}
        return a == b

    @torch.no_grad()
    def follow(self, model: nn.Module) -> None:
        """Rebuild the average for ``model``, a grown version of the model averaged so far."""
        rec = get_record(model, ParameterOrigins)
        if rec is None:
            raise InputError(
                "EMA.update got a model with a different architecture that was not grown by fxexpand.compile(); "
                "start a new fxexpand.EMA for it")
        old = dict(_named_tensors(self.module))
        new = self._new(model)
        for name, t in _named_tensors(new.module):
            src = rec.origin.get(name)
            if src is not None and src[0] in old:
                e = embed(old[src[0]], t)
                if e is not None:
                    t.copy_(e)
        new.n_averaged.copy_(self.averaged.n_averaged)
        self.averaged = new

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
