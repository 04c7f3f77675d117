"""Decay schedules for :class:`~fxexpand.core.DecayActivation` (NetBooster's PLT).

alpha is a function of an integer *global step* that is stored in every DecayActivation's
``decay_step`` buffer. So every process of a distributed run that takes the same number of steps
computes the same alpha, and a run resumed from a ``state_dict`` continues from the saved step.

A model without decaying activations (a linear-only recipe such as ExpandNets) is accepted: there
is nothing to decay, :func:`set_decay` sets 0 activations and :class:`LinearDecay` only counts steps,
so one training loop serves every recipe. :func:`fxexpand.contract` still refuses a region that is
not linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import DecayActivation, ExpandedRegion, unwrap

__all__ = ["LinearDecay", "set_decay", "get_decay", "decay_modules", "linearize"]


def decay_modules(model: nn.Module) -> dict[str, DecayActivation]:
    """Every DecayActivation in ``model`` (unwrapping DDP / AveragedModel containers automatically)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DecayActivation)}


def set_decay(model: nn.Module, alpha: float) -> int:
    """Set every decaying activation's alpha (0 = original activation, 1 = identity); returns how
    many activations were set (0 for a model without any, e.g. one a linear-only recipe expanded)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    mods = decay_modules(model)
    with torch.no_grad():
        for m in mods.values():
            m.alpha.fill_(float(alpha))
    return len(mods)


def get_decay(model: nn.Module) -> float:
    """The current alpha (an error if the decaying activations disagree)."""
    mods = decay_modules(model)
    if not mods:
        raise ValueError("the model has no DecayActivation modules")
    vals = {float(m.alpha) for m in mods.values()}
    if len(vals) != 1:
        raise ValueError(f"decaying activations have different alphas: {sorted(vals)}")
    return vals.pop()


class LinearDecay:
    """alpha rises linearly from 0 to 1 over ``total_steps`` steps, starting at ``start_step``.

    ``alpha(step) = clamp((step − start_step) / total_steps, 0, 1)`` with ``step`` the global step,
    kept in the model's ``decay_step`` buffers. Call :meth:`step` once per optimizer step
    (or ``step(global_step)`` to jump to a given step). On a model without decaying activations the
    schedule only counts steps (``alpha`` is 1: the model is already linear where it matters).
    """

    def __init__(self, model: nn.Module, total_steps: int, start_step: int = 0):
        if total_steps < 1:
            raise ValueError("total_steps must be >= 1")
        if start_step < 0:
            raise ValueError("start_step must be >= 0")
        self.modules = list(decay_modules(model).values())
        self.total_steps, self.start_step = int(total_steps), int(start_step)
        steps = {int(m.decay_step) for m in self.modules} or {0}
        if len(steps) != 1:
            raise ValueError(f"decaying activations are at different steps: {sorted(steps)}")
        self._step = steps.pop()
        self._apply(self._step)

    def alpha_at(self, step: int) -> float:
        if not self.modules:
            return 1.0
        return min(1.0, max(0.0, (step - self.start_step) / self.total_steps))

    @property
    def global_step(self) -> int:
        return int(self.modules[0].decay_step) if self.modules else self._step

    @property
    def alpha(self) -> float:
        return self.alpha_at(self.global_step)

    @property
    def done(self) -> bool:
        return self.alpha == 1.0

    def _apply(self, step: int) -> None:
        self._step = step
        a = self.alpha_at(step)
        with torch.no_grad():
            for m in self.modules:
                m.decay_step.fill_(step)
                m.alpha.fill_(a)

    def step(self, global_step: int | None = None) -> float:
        """Advance one step (or go to ``global_step``); returns the new alpha."""
        nxt = self.global_step + 1 if global_step is None else int(global_step)
        if nxt < 0:
            raise ValueError("global_step must be >= 0")
        self._apply(nxt)
        return self.alpha

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "start_step": self.start_step, "global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.total_steps, self.start_step = int(state["total_steps"]), int(state["start_step"])
        self._apply(int(state["global_step"]))


def linearize(model: nn.Module, train_mode: str = "collapsed") -> int:
    """Turn decayable chains into linear chains, keeping their parameters: ExpandNets' **+Init**
    switch from the nonlinear counterpart to the ExpandNet (Sec. 3.2 of the paper).

    Every :class:`~fxexpand.core.DecayActivation` is set to alpha = 1 (the identity); those inside
    an expanded region whose body is an ``nn.Sequential`` are then removed, so the region's chain
    is its linear factors — the same parameter objects, now at consecutive indices, which is the
    ExpandNet's own ``state_dict`` layout — and the region is set to ``train_mode`` ("collapsed"
    where the chain allows it). Build a new optimizer afterwards (the paper trains the initialised
    ExpandNet anew). Returns how many activations were removed.
    """

    target = unwrap(model)
    set_decay(target, 1.0)
    removed = 0
    for region in [m for m in target.modules() if isinstance(m, ExpandedRegion)]:
        body = region.body
        if not isinstance(body, nn.Sequential) or not any(isinstance(m, DecayActivation) for m in body):
            continue
        kept = [m for m in body if not isinstance(m, DecayActivation)]
        removed += len(body) - len(kept)
        region.body = nn.Sequential(*kept).train(body.training)
        region.set_train_mode(train_mode)
    return removed
