"""The papers' training protocols: which passes, which phases, and what happens between them.

A :class:`Protocol` is a recipe (the pass list :func:`fxexpand.compile` runs) plus its training
phases; :func:`run` trains a model through them with :class:`fxexpand.training.Trainer` (a fresh
optimizer and learning-rate schedule per phase, as the papers restart them) and returns the trained
model, ready for :func:`fxexpand.contract`. Epochs are given per protocol as a *base* number ``E``;
each phase runs ``round(factor · E)`` epochs.

* :func:`vanilla` — the tiny model itself, ``factor · E`` epochs (the baselines: the method's
  epochs, or a ladder of budgets for the matched-compute comparison).
* :func:`netbooster` — NetBooster (Sec. 3.2–3.3 and 4.1 of the paper): phase 1 trains the
  expanded "deep giant" with its inserted activations at alpha = 0; phase 2 restarts the schedule,
  runs PLT (alpha 0 → 1) over its first ``decay_fraction`` (the paper's E_d: 40 of 150 fine-tuning
  epochs on ImageNet, 20 % of the tuning epochs downstream) and fine-tunes at alpha = 1.
  ``decay_fraction=0`` is the E_d = 0 ablation: alpha jumps to 1 at the start of phase 2.
* :func:`expandnets` — ExpandNets CL / CK / FC (Sec. 3.1, 4.1): the expanded model trained as the
  tiny one would be (one phase; collapsed training where the chains allow it).
* :func:`expandnets_init` — ExpandNets **+Init** (Sec. 3.2): phase 1 trains the nonlinear
  counterpart (ReLUs between the factors), :func:`fxexpand.linearize` keeps its weights and removes
  the activations, phase 2 trains the ExpandNet anew.
* :func:`netaug` — NetAug (Sec. 3, 4.1): one phase of base + one sampled augmented model per step
  (:func:`fxexpand.netaug_loss`, alpha = 1), channel re-sorting off.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import api, pipelines
from ..core import InputError
from .netaug import WidthSampler, netaug_loss, set_width
from .schedule import decay_modules, linearize, set_decay
from .train import Trainer

__all__ = ["Phase", "Protocol", "vanilla", "netbooster", "expandnets", "expandnets_init", "netaug", "run",
           "step_flops", "PROTOCOLS"]


@dataclass(frozen=True)
class Phase:
    """One training phase: ``factor · E`` epochs with a fresh optimizer and schedule.

    Args:
        factor: epochs as a multiple of the protocol's base epochs ``E``.
        alpha: set every decayable activation to this at the phase's start (None: leave it).
        decay_fraction: PLT over the phase's *first* ``decay_fraction`` (0: no decay).
        linearize: call :func:`fxexpand.linearize` at the phase's start (+Init's switch).
    """

    factor: float = 1.0
    alpha: float | None = None
    decay_fraction: float = 0.0
    linearize: bool = False


@dataclass(frozen=True)
class Protocol:
    """A method's recipe and training phases (see the module docstring)."""

    name: str
    recipe: Callable[[], list] | None
    phases: tuple[Phase, ...]
    paper: str = ""
    netaug: bool = False
    note: str = ""

    @property
    def epochs_factor(self) -> float:
        """Total epochs as a multiple of the base epochs."""
        return sum(p.factor for p in self.phases)

    def compile(self, model: nn.Module, example_inputs: Any) -> nn.Module:
        """The model this protocol trains: ``model`` itself for vanilla (a copy), else the expanded one."""
        if self.recipe is None:
            return copy.deepcopy(model)
        return api.compile(model, passes=self.recipe(), example_inputs=example_inputs)


def vanilla(factor: float = 1.0) -> Protocol:
    """The tiny model trained for ``factor · E`` epochs."""
    return Protocol(f"vanilla x{factor:g}", None, (Phase(factor),), paper="baseline")


def netbooster(decay_fraction: float = 0.2, giant: float = 1.0, tune: float = 1.0, ratio: int = 6,
               fraction: float = 0.5) -> Protocol:
    """NetBooster: giant at alpha = 0 for ``giant · E`` epochs, then ``tune · E`` epochs with PLT over
    the first ``decay_fraction`` and fine-tuning at alpha = 1 (``decay_fraction=0``: the E_d = 0
    ablation, alpha = 1 from the start of phase 2)."""
    if not 0.0 <= decay_fraction < 1.0:
        raise InputError("decay_fraction must lie in [0, 1): phase 2 must end at alpha = 1")
    phase2 = Phase(tune, alpha=1.0 if decay_fraction == 0 else None, decay_fraction=decay_fraction)
    name = "netbooster" if decay_fraction == 0.2 else f"netbooster Ed={decay_fraction:g}"
    return Protocol(name, lambda: pipelines.netbooster(ratio=ratio, fraction=fraction),
                    (Phase(giant, alpha=0.0), phase2), paper="NetBooster Sec. 3.3, 4.1")


def expandnets(mode: str = "CL", fc: bool = True, ratio: int = 4, layers: str = "paper") -> Protocol:
    """ExpandNets CL / CK (+FC with ``fc``) or FC alone: one phase, as the tiny model trains."""
    name = f"expandnets {mode}" + ("+FC" if fc and mode != "FC" else "")
    return Protocol(name, lambda: pipelines.expandnets(mode, ratio=ratio, fc=fc, layers=layers), (Phase(1.0),),
                    paper="ExpandNets Sec. 3.1, 4.1")


def expandnets_init(mode: str = "CK", fc: bool = True, ratio: int = 4, layers: str = "paper",
                    init_factor: float = 1.0) -> Protocol:
    """ExpandNets +Init: the nonlinear counterpart for ``init_factor · E`` epochs, then the ExpandNet
    (initialised with its weights) for ``E`` epochs."""
    name = f"expandnets {mode}" + ("+FC" if fc and mode != "FC" else "") + "+Init"
    return Protocol(name, lambda: pipelines.expandnets(mode, ratio=ratio, fc=fc, layers=layers, init="nonlinear"),
                    (Phase(init_factor, alpha=0.0), Phase(1.0, linearize=True)), paper="ExpandNets Sec. 3.2")


def netaug(alpha: float = 1.0) -> Protocol:
    """NetAug: base + one sampled augmented model per step (loss weight ``alpha``), one phase."""
    return Protocol("netaug", pipelines.netaug, (Phase(1.0),), paper="NetAug Sec. 3, 4.1", netaug=True,
                    note=f"alpha={alpha:g}")


#: the protocols by name (the demo's methods)
PROTOCOLS: dict[str, Callable[[], Protocol]] = {
    "vanilla": vanilla,
    "vanilla-x2": lambda: vanilla(2.0),
    "vanilla-x4": lambda: vanilla(4.0),
    "vanilla-x8": lambda: vanilla(8.0),
    "vanilla-x16": lambda: vanilla(16.0),
    "netbooster": netbooster,
    "netbooster-ed0": lambda: netbooster(decay_fraction=0.0),
    "expandnets-cl": lambda: expandnets("CL"),
    "expandnets-ck": lambda: expandnets("CK"),
    "expandnets-ck-init": lambda: expandnets_init("CK"),
    "netaug": netaug,
}


def run(model: nn.Module, protocol: Protocol, loader: Iterable, *, epochs: int,
        make_optimizer: Callable[[Iterable[nn.Parameter], int], tuple[torch.optim.Optimizer, Any]],
        seed: int = 0, on_phase_end: Callable[[int, nn.Module], None] | None = None,
        callbacks: Iterable[Callable] = (), steps_per_epoch: int | None = None,
        loss_fn: Callable = nn.functional.cross_entropy) -> nn.Module:
    """Train ``model`` (already compiled with ``protocol.recipe``) through the protocol's phases.

    ``make_optimizer(parameters, total_steps)`` returns ``(optimizer, per-step lr scheduler or
    None)`` and is called at every phase's start. ``on_phase_end(i, model)`` runs after phase ``i``
    (e.g. to evaluate NetBooster's giant). ``loss_fn(output, target)`` is the training loss
    (e.g. :func:`fxexpand.demo.stacked.stacked_cross_entropy` for K seeds trained at once).
    Returns ``model`` in eval mode (NetAug: base width).
    """

    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    steps = steps_per_epoch if steps_per_epoch is not None else len(loader)  # type: ignore[arg-type]
    for i, phase in enumerate(protocol.phases):
        if phase.linearize:
            linearize(model)
        if phase.alpha is not None and decay_modules(model):
            set_decay(model, phase.alpha)
        n = max(1, round(phase.factor * epochs))
        opt, sched = make_optimizer(model.parameters(), n * steps)
        sampler = WidthSampler(model, seed=seed) if protocol.netaug else None
        # PLT at the phase's start: the decay's epochs first, the rest fine-tunes at alpha = 1
        decay_epochs = max(1, math.ceil(phase.decay_fraction * n - 1e-9)) if phase.decay_fraction > 0 else 0
        Trainer(model, opt, epochs=n, decay_fraction=phase.decay_fraction,
                finetune_epochs=n - decay_epochs if decay_epochs else 0,
                lr_scheduler=sched, scheduler_interval="step", netaug=sampler, callbacks=callbacks,
                loss_fn=loss_fn).fit(loader, steps_per_epoch=steps)
        if on_phase_end is not None:
            on_phase_end(i, model)
    return model.eval()


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, netaug: bool = False, samples: int = 4,
               loss_fn: Callable = nn.functional.cross_entropy) -> float:
    """Floating-point operations of one training step (forward + backward, as the model trains:
    collapsed regions count their composition and one op) from ``torch.utils.flop_counter``,
    on a copy (``model`` is not changed). NetAug: the mean over ``samples`` sampled steps."""

    m = copy.deepcopy(model).train()
    sampler = WidthSampler(m, seed=0, total_steps=10 ** 9) if netaug else None
    total = 0.0
    n = samples if netaug else 1
    for step in range(n):
        with FlopCounterMode(display=False) as counter:
            if sampler is not None:
                netaug_loss(m, sampler, step, x, y, loss_fn).backward()
            else:
                out = m(x)
                loss_fn(out, y).backward() if not isinstance(out, (tuple, list)) else \
                    sum(loss_fn(o, y) for o in out).backward()
        total += counter.get_total_flops()
        m.zero_grad(set_to_none=True)
    if sampler is not None:
        set_width(m, "base")
    return total / n
