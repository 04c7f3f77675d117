"""Training helpers for expansion-then-contraction.

The schedule users need, NetBooster-style::

    epochs:  |------ train expanded (alpha = 0) ------|--- PLT decay 0 -> 1 ---|-- fine-tune at alpha = 1 --|
                                                      ^ decay_start             ^ decay_end

:class:`DecaySchedule` turns that into a :class:`~fxexpand.training.schedule.LinearDecay` over global steps
and can sit inside any training loop (call :meth:`DecaySchedule.step` after each optimizer step).
:class:`Trainer` is a small loop around it with callbacks; :func:`lightning_callback` adapts the
schedule to PyTorch Lightning when Lightning is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..api import contract
from ..core import unwrap
from ..exits.model import loss as exits_loss
from .netaug import WidthSampler, netaug_loss, set_width, sort_channels
from .schedule import LinearDecay, decay_modules

__all__ = ["DecaySchedule", "Trainer", "Callback", "lightning_callback", "netaug_lightning_callback", "unwrap",
           "sync_buffers"]


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Broadcast every buffer (BN running statistics, alpha, the decay step) from rank ``src``.

    DDP broadcasts buffers at the *start* of each forward, so after the last training step every
    rank holds running statistics updated with its own batch. Call this once after training (a
    no-op without an initialised process group) so that every rank contracts the same model.
    """

    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for b in unwrap(model).buffers():
            dist.broadcast(b, src)


@dataclass
class DecaySchedule:
    """Where the decay phase sits, in global steps.

    Args:
        model: the expanded model (or a DDP wrapper of it).
        epochs: total training epochs.
        steps_per_epoch: optimizer steps per epoch.
        decay_fraction: share of the epochs over which alpha rises 0 -> 1 (NetBooster: 0.2); 0 = no
            decay (alpha stays where it is, e.g. 0 while the deep giant trains).
        finetune_epochs: epochs at alpha = 1 after the decay (0 = decay ends with training).
    """

    model: nn.Module
    epochs: int
    steps_per_epoch: int
    decay_fraction: float = 0.2
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError("epochs and steps_per_epoch must be >= 1")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError("decay_fraction must lie in [0, 1]")
        if not 0 <= self.finetune_epochs < self.epochs:
            raise ValueError("finetune_epochs must be in [0, epochs)")
        self.linear = None
        if self.decay_fraction == 0.0:  # no decay: alpha is left as it is
            self.decay_start_epoch, self.decay_epochs = self.epochs, 0
            return
        decay_epochs = max(1, math.ceil(self.decay_fraction * self.epochs - 1e-9))
        decay_epochs = min(decay_epochs, self.epochs - self.finetune_epochs)
        self.decay_start_epoch = self.epochs - self.finetune_epochs - decay_epochs
        self.decay_epochs = decay_epochs
        if decay_modules(unwrap(self.model)):
            self.linear = LinearDecay(unwrap(self.model), total_steps=decay_epochs * self.steps_per_epoch,
                                      start_step=self.decay_start_epoch * self.steps_per_epoch)

    @property
    def alpha(self) -> float:
        if self.linear is not None:
            return self.linear.alpha
        mods = decay_modules(unwrap(self.model))
        return float(next(iter(mods.values())).alpha) if mods else 1.0

    @property
    def global_step(self) -> int:
        return 0 if self.linear is None else self.linear.global_step

    def step(self) -> float:
        """Call after every optimizer step; returns the new alpha (1.0 if nothing decays)."""
        return self.alpha if self.linear is None else self.linear.step()


class Callback(Protocol):
    def __call__(self, event: str, trainer: "Trainer", **info: Any) -> None: ...


class Trainer:
    """A small training loop for expanded models: train → PLT decay → fine-tune at alpha = 1 → contract.

    ``lr_scheduler`` steps once per epoch (``scheduler_interval="epoch"``) or after every optimizer
    step (``"step"``, e.g. ``OneCycleLR``). Callbacks are called as ``cb(event, trainer, **info)`` with events ``"step"`` (``loss``, ``alpha``,
    ``step``) and ``"epoch"`` (``epoch``, ``loss``, ``alpha``).

    A multi-exit model (``InsertEarlyExits``) is trained on the sum of its exits' losses
    (:func:`fxexpand.exits.loss`). NetAug (a model built with ``AugmentWidth``): pass ``netaug=WidthSampler(model, seed)`` (its
    ``total_steps`` is set from the epochs if unset); each step then minimises
    :func:`~fxexpand.netaug_loss` with ``netaug_alpha`` (one backward, or two with
    ``separate_backward=True``), ``sort_channels`` ("augmented" or "all") re-sorts hidden channels
    at the start of every epoch, and the model ends in the base (tiny) configuration.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int,
                 decay_fraction: float = 0.2, finetune_epochs: int = 0,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
                 callbacks: Iterable[Callable] = (), lr_scheduler: Any = None,
                 netaug: WidthSampler | None = None, netaug_alpha: float = 1.0, separate_backward: bool = False,
                 sort_channels: str | None = None, scheduler_interval: str = "epoch"):
        self.model, self.optimizer, self.epochs = model, optimizer, int(epochs)
        self.decay_fraction, self.finetune_epochs = decay_fraction, int(finetune_epochs)
        self.loss_fn, self.callbacks, self.lr_scheduler = loss_fn, list(callbacks), lr_scheduler
        self.schedule: DecaySchedule | None = None
        if netaug is not None and not isinstance(netaug, WidthSampler):
            raise TypeError(f"netaug must be a fxexpand.WidthSampler, got {type(netaug).__name__}")
        if sort_channels not in (None, "augmented", "all"):
            raise ValueError("sort_channels must be None, 'augmented' or 'all'")
        if sort_channels is not None and netaug is None:
            raise ValueError("sort_channels needs netaug=WidthSampler(...)")
        self.netaug, self.netaug_alpha = netaug, float(netaug_alpha)
        self.separate_backward, self.sort_channels = bool(separate_backward), sort_channels
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError("scheduler_interval must be 'epoch' or 'step'")
        self.scheduler_interval = scheduler_interval

    def _emit(self, event: str, **info: Any) -> None:
        for cb in self.callbacks:
            cb(event, self, **info)

    def fit(self, loader: Iterable, *, steps_per_epoch: int | None = None) -> nn.Module:
        """Train for ``epochs`` epochs over ``loader`` (an iterable of ``(inputs, targets)``)."""
        if steps_per_epoch is None:
            steps_per_epoch = len(loader)  # type: ignore[arg-type]
        self.schedule = DecaySchedule(self.model, self.epochs, steps_per_epoch, self.decay_fraction,
                                      self.finetune_epochs)
        if self.netaug is not None and self.netaug.total_steps is None:
            self.netaug.total_steps = self.epochs * steps_per_epoch
        step = 0
        for epoch in range(self.epochs):
            self.model.train()
            if self.sort_channels is not None:
                sort_channels(self.model, scope=self.sort_channels, optimizer=self.optimizer)
            total, n = 0.0, 0
            for x, y in loader:
                self.optimizer.zero_grad(set_to_none=True)
                if self.netaug is not None:
                    loss = netaug_loss(self.model, self.netaug, step, x, y, self.loss_fn, alpha=self.netaug_alpha,
                                       separate_backward=self.separate_backward)
                    if not self.separate_backward:
                        loss.backward()
                else:
                    out = self.model(x)
                    # a multi-exit model (InsertEarlyExits) returns (F_1, ..., F_N): BoostNet's summed loss
                    loss = exits_loss(out, y, self.loss_fn) if isinstance(out, (tuple, list)) else self.loss_fn(out, y)
                    loss.backward()
                step += 1
                self.optimizer.step()
                alpha = self.schedule.step()
                if self.lr_scheduler is not None and self.scheduler_interval == "step":
                    self.lr_scheduler.step()
                total, n = total + float(loss.detach()), n + 1
                self._emit("step", loss=float(loss.detach()), alpha=alpha, step=self.schedule.global_step)
            if self.lr_scheduler is not None and self.scheduler_interval == "epoch":
                self.lr_scheduler.step()
            self._emit("epoch", epoch=epoch, loss=total / max(n, 1), alpha=self.schedule.alpha)
        if self.netaug is not None:
            set_width(self.model, "base")
        self.model.eval()
        return self.model

    def contract(self, example_inputs: Any, **kwargs: Any) -> nn.Module:
        """Contract the trained model (unwrapped from DDP) back to the original architecture."""

        return contract(unwrap(self.model).eval(), example_inputs, **kwargs)


def lightning_callback(epochs: int, steps_per_epoch: int, decay_fraction: float = 0.2, finetune_epochs: int = 0):
    """A PyTorch Lightning ``Callback`` that runs the decay schedule on ``pl_module``.

    Raises ImportError if neither ``lightning`` nor ``pytorch_lightning`` is installed.
    """
    try:
        from lightning.pytorch import Callback as _PLCallback
    except ImportError:
        try:
            from pytorch_lightning import Callback as _PLCallback
        except ImportError as e:
            raise ImportError("lightning_callback needs `pip install lightning`") from e

    class DecayCallback(_PLCallback):
        def __init__(self):
            super().__init__()
            self.schedule: DecaySchedule | None = None

        def on_train_start(self, trainer, pl_module):
            self.schedule = DecaySchedule(pl_module, epochs, steps_per_epoch, decay_fraction, finetune_epochs)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.schedule is not None:
                self.schedule.step()
                pl_module.log("fxexpand_alpha", self.schedule.alpha, prog_bar=True)

    return DecayCallback()


def netaug_lightning_callback(sampler: WidthSampler, *, sort: str | None = None):
    """A PyTorch Lightning ``Callback`` for NetAug.

    Lightning's DDP wrapper calls ``training_step``, so the combined loss is computed there (one
    forward of each model inside one DDP forward, one backward, one all-reduce)::

        def training_step(self, batch, batch_idx):
            x, y = batch
            return fxexpand.netaug_loss(self, self.fxexpand_sampler, self.global_step, x, y, F.cross_entropy)

    The callback puts ``sampler`` on the module as ``fxexpand_sampler`` (with ``total_steps`` from
    ``trainer.estimated_stepping_batches`` if unset), re-sorts hidden channels at the start of every
    epoch when ``sort`` is "augmented" or "all", and puts the model in the base configuration
    before validation and at the end of training. Raises ImportError without Lightning.
    """
    try:
        from lightning.pytorch import Callback as _PLCallback
    except ImportError:
        try:
            from pytorch_lightning import Callback as _PLCallback
        except ImportError as e:
            raise ImportError("netaug_lightning_callback needs `pip install lightning`") from e
    if sort not in (None, "augmented", "all"):
        raise ValueError("sort must be None, 'augmented' or 'all'")

    class NetAugCallback(_PLCallback):
        def on_train_start(self, trainer, pl_module):
            if sampler.total_steps is None:
                sampler.total_steps = int(trainer.estimated_stepping_batches)
            pl_module.fxexpand_sampler = sampler

        def on_train_epoch_start(self, trainer, pl_module):
            if sort is not None:
                opts = trainer.optimizers
                sort_channels(pl_module, scope=sort, optimizer=opts[0] if opts else None)

        def on_validation_start(self, trainer, pl_module):
            set_width(pl_module, "base")

        def on_train_end(self, trainer, pl_module):
            set_width(pl_module, "base")

    return NetAugCallback()
