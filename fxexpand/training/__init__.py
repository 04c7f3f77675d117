"""Training: the loop (:mod:`~fxexpand.training.train`: ``Trainer``, ``DecaySchedule``, the Lightning
callbacks), decay schedules (:mod:`~fxexpand.training.schedule`), Network Expansion
(:mod:`~fxexpand.training.growth`, :mod:`~fxexpand.training.ema`), NetAug
(:mod:`~fxexpand.training.netaug`) and the papers' protocols (:mod:`~fxexpand.training.protocols`,
used as a module: ``protocols.netbooster()``, ``protocols.run(...)``)."""

from . import protocols
from .ema import EMA
from .growth import Chain, GrowthPlan, Stage, embed, find_chains, rebuild_optimizer
from .netaug import WidthSampler, netaug_loss, set_width, sort_channels, use_width, width_record
from .schedule import LinearDecay, decay_modules, get_decay, linearize, set_decay
from .train import (
    Callback,
    DecaySchedule,
    Trainer,
    lightning_callback,
    netaug_lightning_callback,
    sync_buffers,
    unwrap,
)

__all__ = ["protocols", "Trainer", "DecaySchedule", "Callback", "lightning_callback", "netaug_lightning_callback",
           "sync_buffers", "unwrap", "LinearDecay", "set_decay", "get_decay", "decay_modules", "linearize", "EMA",
           "Chain", "find_chains", "GrowthPlan", "Stage", "rebuild_optimizer", "embed", "WidthSampler", "set_width",
           "use_width", "netaug_loss", "sort_channels", "width_record"]
