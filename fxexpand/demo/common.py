"""What the demos and the regime study share (:mod:`fxexpand.demo.compare`,
:mod:`fxexpand.demo.early_exits`, :mod:`fxexpand.demo.study`): the paired mini-batch loader, the
optimizers, the per-process dataset cache, accuracy, the process pool, writing JSON and formatting a
paired difference."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import data as datasets

__all__ = ["Loader", "sgd_one_cycle", "sgd_cosine", "SCHEDULES", "cached_splits", "accuracy", "process_pool",
           "map_tasks", "write_json", "format_diff"]


class Loader:
    """Shuffled mini-batches from a fixed generator (one per run: paired across methods)."""

    def __init__(self, x, y, batch_size, seed):
        self.x, self.y, self.bs = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return (len(self.y) + self.bs - 1) // self.bs

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.gen)
        for i in range(0, len(self.y), self.bs):
            j = perm[i:i + self.bs]
            yield self.x[j], self.y[j]


def sgd_one_cycle(lr: float) -> Callable:
    """``make_optimizer(params, total_steps)``: SGD with Nesterov momentum and a one-cycle learning rate
    peaking at ``lr`` (the demos' optimizer, restarted per phase)."""

    def make(params: Iterable[nn.Parameter], total_steps: int):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 2))
    return make


def sgd_cosine(lr: float) -> Callable:
    """``make_optimizer(params, total_steps)``: the same SGD (Nesterov momentum 0.9, weight decay
    5e-4) with a cosine learning rate from ``lr`` to 0 over the phase's steps (stepped per step)."""

    def make(params: Iterable[nn.Parameter], total_steps: int):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return make


#: learning-rate schedules by name: ``SCHEDULES[name](lr)`` is a ``make_optimizer``
SCHEDULES: dict[str, Callable[[float], Callable]] = {"one-cycle": sgd_one_cycle, "cosine": sgd_cosine}

_SPLITS: dict[tuple[str, int | None], datasets.Splits] = {}


def cached_splits(name: str, num_samples: int | None = None) -> datasets.Splits:
    """:func:`fxexpand.demo.data.load` once per process (``num_samples`` for MNIST-1D; None: its
    default). MNIST-1D with 80,000 samples takes ~35 s to generate, so a worker keeps it."""
    key = (name, None if num_samples is None else int(num_samples))
    if key not in _SPLITS:
        _SPLITS[key] = datasets.load(name, **({} if num_samples is None else {"num_samples": int(num_samples)}))
    return _SPLITS[key]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``(x, y)`` (a multi-exit model: its last exit)."""
    model.eval()
    with torch.no_grad():
        out = model(x)
        out = out[-1] if isinstance(out, (tuple, list)) else out
        return float((out.argmax(1) == y).float().mean())


def process_pool(workers: int):
    """A spawn-context process pool of ``workers`` processes (None for 1: run in this process)."""
    if workers == 1:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def map_tasks(pool, fn: Callable[[dict], dict], tasks: list[dict],
              progress: Callable[[int, dict], None] | None = None) -> list[dict]:
    """``fn`` over ``tasks`` in ``pool`` (None: in this process), in order; ``progress(i, result)``
    after each (i counts from 1)."""
    results = map(fn, tasks) if pool is None else pool.map(fn, tasks)
    out = []
    for r in results:
        out.append(r)
        if progress:
            progress(len(out), r)
    return out


def write_json(path: Path, obj: Any) -> Path:
    """``obj`` as JSON at ``path``, written to a temporary name first (no partial file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)
    return path


def format_diff(d: dict | None) -> str:
    """A paired difference (:func:`fxexpand.demo.paired_difference`) in percent with its CI, "—" for none."""
    if not d:
        return "—"
    ci = "" if math.isnan(d["low"]) else f" [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
    return f"{100 * d['mean']:+.2f}{ci}"
