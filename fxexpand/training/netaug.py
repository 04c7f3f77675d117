"""NetAug training: sample an augmented model per step, combine the losses, keep channels sorted.

:class:`~fxexpand.passes.AugmentWidth` builds the weight-shared augmented model; this module trains
it (Cai et al., ICLR 2022, §3.2, Eq. 1–2):

* :func:`set_width` activates the tiny model (``"base"``), the largest model (``"max"``) or a
  sampled configuration;
* :class:`WidthSampler` draws one augmented configuration per step — every augmentable group takes
  one of its widths — deterministically from ``(seed, step)``, so every DDP rank runs the same
  augmented model and a resumed run continues the same sequence; "width" groups stay at their base
  width after ``stop_width_at`` of training;
* :func:`netaug_loss` computes ``L(W_t) + alpha · L([W_t, W_i])`` (alpha = 1 in the paper), with one
  backward pass over both forwards (default; both graphs are alive at once, so peak activation
  memory is about base + augmented) or two (``separate_backward=True``: the base graph is freed
  before the augmented forward — lower peak memory, same gradients; under DDP the first backward
  runs in ``no_sync`` so gradients are all-reduced once);
* :func:`sort_channels` reorders the channels of hidden ("expand") groups by L1 importance.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..core import DynamicLayer, InputError, WidthRecord, get_record, unwrap

__all__ = ["WidthSampler", "set_width", "use_width", "netaug_loss", "sort_channels", "width_record"]


def _augmented(model: nn.Module) -> tuple[nn.Module, WidthRecord]:
    """The module built by ``AugmentWidth`` (``model`` or a submodule, e.g. in a LightningModule)."""
    for m in unwrap(model).modules():
        rec = get_record(m, WidthRecord)
        if rec is not None:
            return m, rec
    raise InputError("this model has no augmentable widths: build it with "
                     "fxexpand.compile(model, passes=[AugmentWidth(...)], example_inputs=...)")


def width_record(model: nn.Module) -> WidthRecord:
    """The :class:`~fxexpand.core.WidthRecord` of a model built with ``AugmentWidth`` (or of the
    augmented module inside it, e.g. a LightningModule holding it)."""
    return _augmented(model)[1]


def _dynamic_layers(model: nn.Module) -> list[DynamicLayer]:
    return [m for m in unwrap(model).modules() if isinstance(m, DynamicLayer)]


def set_width(model: nn.Module, config: Literal["base", "max"] | dict[str, int] = "base", *,
              augmented: bool | None = None) -> dict[str, int]:
    """Activate a width configuration: ``"base"`` (the tiny model), ``"max"`` or ``{group: width}``
    (groups not named are at their base width). ``augmented`` (default: the configuration differs
    from the base) makes BatchNorms use batch statistics without touching the running statistics.
    Returns the full configuration."""
    rec = width_record(model)
    widths = rec.base()
    if config == "max":
        widths = rec.max()
    elif isinstance(config, dict):
        for g, w in config.items():
            if g not in rec.groups:
                raise InputError(f"unknown channel group {g!r}; groups: {', '.join(list(rec.groups)[:8])} ...")
            if not rec.groups[g].base <= int(w) <= rec.groups[g].max:
                raise InputError(f"width {w} of group {g!r} is outside [{rec.groups[g].base}, {rec.groups[g].max}]")
            widths[g] = int(w)
    elif config != "base":
        raise InputError(f"config must be 'base', 'max' or a dict of group widths, got {config!r}")
    if augmented is None:
        augmented = widths != rec.base()
    for layer in _dynamic_layers(model):
        layer.set_widths(widths, augmented)
    return widths


@contextlib.contextmanager
def use_width(model: nn.Module, config: Literal["base", "max"] | dict[str, int], *, augmented: bool = True):
    """Run the model in ``config`` inside the block, then return to the base configuration.

    Besides the dynamic BatchNorms (which never update their running statistics in an augmented
    configuration), the block restores the running statistics of every *other* BatchNorm — the
    layers of frozen channel groups downstream of augmented ones — so that an augmented forward
    leaves every statistic of the tiny model as it was."""
    inner = unwrap(model)
    norms = [m for m in inner.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, DynamicLayer)]
    saved = [(m, {n: b for n, b in m.named_buffers(recurse=False)}) for m in norms]
    for m, bufs in saved:  # the forward updates copies (autograd may keep them for the backward)
        for n, b in bufs.items():
            if b is not None:
                setattr(m, n, b.clone())
    set_width(model, config, augmented=augmented)
    try:
        yield
    finally:
        set_width(model, "base")
        for m, bufs in saved:
            for n, b in bufs.items():
                setattr(m, n, b)


class WidthSampler:
    """One augmented configuration per step, a function of ``(seed, step)`` only.

    Every augmentable group draws one of its widths uniformly (the official scripts draw one
    multiplier per layer per step). With ``total_steps`` known, "width" groups stay at their base
    width from step ``stop_width_at · total_steps`` on (the record's ``stop_width_at``); the
    "expand" axis goes on.
    """

    def __init__(self, model: nn.Module, seed: int = 0, total_steps: int | None = None):
        self.record = width_record(model)
        self.seed = int(seed)
        self.total_steps = total_steps
        self._warned = False

    def width_active(self, step: int) -> bool:
        """Whether "width" groups are still augmented at ``step``."""
        stop = self.record.stop_width_at
        if stop is not None and self.total_steps is None and not self._warned:
            self._warned = True
            warnings.warn("WidthSampler without total_steps: width augmentation will not stop at "
                          f"stop_width_at={stop}; pass total_steps (Trainer and the Lightning callback set it)",
                          stacklevel=3)
        return stop is None or self.total_steps is None or step < stop * self.total_steps

    def sample(self, step: int) -> dict[str, int]:
        """The configuration of ``step`` (the same on every rank and after a resume)."""
        rng = random.Random(f"fxexpand.netaug:{self.seed}:{int(step)}")
        width_on = self.width_active(step)
        config = {}
        for gid, spec in self.record.groups.items():
            choice = rng.choice(spec.choices)  # drawn for every group, so the stream does not shift
            config[gid] = choice if (spec.axis == "expand" or width_on) else spec.base
        return config

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.total_steps = int(state["seed"]), state["total_steps"]


def netaug_loss(model: nn.Module, sampler: WidthSampler, step: int, x: Any, y: Any,
                loss_fn: Callable[[Any, Any], torch.Tensor], *, alpha: float = 1.0,
                separate_backward: bool = False) -> torch.Tensor:
    """``loss_fn(base(x), y) + alpha · loss_fn(augmented(x), y)`` with the augmented model of ``step``.

    Default: returns the combined loss; call ``.backward()`` on it (one backward; the base and
    augmented graphs are both in memory). ``separate_backward=True`` runs the two backward passes
    itself (the base graph is freed first: lower peak memory, the same accumulated gradients; under
    DDP the first runs in ``model.no_sync()``) and returns the combined loss detached. The model is
    left in the base configuration either way.
    """
    config = sampler.sample(step)
    set_width(model, "base")
    if not separate_backward:
        base = loss_fn(model(x), y)
        with use_width(model, config):
            aug = loss_fn(model(x), y)
        return base + alpha * aug
    sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with sync:
        base = loss_fn(model(x), y)
        base.backward()
    with use_width(model, config):
        aug = loss_fn(model(x), y)
        (alpha * aug).backward()
    return (base + alpha * aug).detach()


@torch.no_grad()
def sort_channels(model: nn.Module, *, scope: Literal["augmented", "all"] = "augmented",
                  optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Reorder the channels of every "expand" group by L1 importance (the summed absolute weights
    that read each channel), most important first, in every layer that reads or writes them — and
    in ``optimizer``'s per-parameter state (momentum, Adam moments) when given.

    ``scope="augmented"`` (default) sorts only the channels beyond the base width: smaller augmented
    models get the more important augmented channels and the tiny model is unchanged (its function
    is preserved exactly). ``scope="all"`` sorts the whole group as the official code does: the tiny
    model then takes the most important channels of the augmented model and its function changes.
    Returns the permutation applied to each group."""
    if scope not in ("augmented", "all"):
        raise ValueError("scope must be 'augmented' or 'all'")
    root, rec = _augmented(model)
    layers = dict(root.named_modules())
    perms: dict[str, torch.Tensor] = {}
    for gid, spec in rec.groups.items():
        if spec.axis != "expand":
            continue
        importance = torch.zeros(spec.max, dtype=torch.float64)
        found = False
        for name in spec.layers:
            layer = layers[name]
            if layer.depthwise or not hasattr(layer, "weight") or layer.weight is None or layer.weight.dim() < 2:
                continue
            off = 0
            for g, mx, per in layer.in_spec:
                if g == gid:
                    cols = layer.weight.detach().abs().double().transpose(0, 1).flatten(1).sum(1)
                    importance += cols[off:off + mx * per].view(mx, per).sum(1).cpu()
                    found = True
                off += mx * per
        if not found:
            continue
        start = spec.base if scope == "augmented" else 0
        order = torch.argsort(importance[start:], descending=True, stable=True) + start
        perm = torch.cat([torch.arange(start), order])
        perms[gid] = perm
        for name in spec.layers:
            layer = layers[name]
            for pname, fn in layer.permuters(gid, perm).items():
                t = getattr(layer, pname, None)
                if t is None:
                    continue
                if optimizer is not None and isinstance(t, nn.Parameter):
                    state = optimizer.state.get(t, {})
                    for k, v in state.items():
                        if isinstance(v, torch.Tensor) and v.shape == t.shape:
                            state[k] = fn(v)
                t.data = fn(t.data)
    return perms
