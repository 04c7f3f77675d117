"""``fxexpand demo``: expansion-then-contraction end to end on scikit-learn's digits (8x8 images).

Trains a tiny CNN three ways with the same epochs, optimizer and seeds — vanilla; NetBooster
(inverted residual blocks + PLT decay over the last 20% of the epochs); ExpandNets (CL + FC) —
then contracts each expanded model back to the tiny CNN, verifies it, exports ONNX, times it in
onnxruntime and prints one table. Nothing is downloaded: the data ships with scikit-learn.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from . import api, recipes
from .bench import benchmark_onnx
from .cost import count_flops, count_parameters
from .export import export_onnx
from .train import Trainer

__all__ = ["DigitsNet", "load_digits", "run_demo", "DemoResult"]


class DigitsNet(nn.Module):
    """A tiny CNN for 8x8 digits (~3.4k parameters): stem 3x3, two pointwise+depthwise blocks, head."""

    def __init__(self, num_classes: int = 10, width: int = 12):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = _Block(w, 2 * w, stride=1)
        self.block2 = _Block(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.dw = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, groups=cout, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.dw(self.act(self.bn1(self.pw(x))))))


def load_digits(test_size: float = 0.25, split_seed: int = 0):
    """scikit-learn's bundled digits (1,797 8x8 images), a fixed stratified split, scaled to [0, 1]."""

    # lazy: scikit-learn takes ~1 s to import and only the digits data needs it
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = list(range(len(y)))
    tr, te = train_test_split(idx, test_size=test_size, random_state=split_seed, stratify=data.target)
    return x[tr], y[tr], x[te], y[te]


RECIPES = ("vanilla", "netbooster", "expandnets")


def _passes(recipe: str):
    if recipe == "netbooster":
        return recipes.netbooster(ratio=6, fraction=0.5)
    if recipe == "expandnets":
        return recipes.expandnets("CL", ratio=4)
    raise ValueError(recipe)


@dataclass
class DemoResult:
    recipe: str
    accuracies: list[float] = field(default_factory=list)
    max_rel_error32: float = 0.0
    max_rel_error64: float = 0.0
    parameters: int = 0
    train_parameters: int = 0
    flops: int = 0
    latency_ms: float = 0.0
    train_seconds: float = 0.0


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _train_one(recipe: str, seed: int, data, epochs: int, batch_size: int, lr: float, progress=None, task=None):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    base = DigitsNet()
    model = base if recipe == "vanilla" else api.compile(base, passes=_passes(recipe))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)

    class Loader:
        def __len__(self):
            return (len(ytr) + batch_size - 1) // batch_size

        def __iter__(self):
            perm = torch.randperm(len(ytr), generator=gen)
            for i in range(0, len(ytr), batch_size):
                j = perm[i:i + batch_size]
                yield xtr[j], ytr[j]

    def on_event(event, trainer, **info):
        if event == "epoch" and progress is not None:
            progress.advance(task)

    t0 = time.perf_counter()
    Trainer(model, opt, epochs=epochs, decay_fraction=0.2, lr_scheduler=sched, callbacks=[on_event]).fit(Loader())
    seconds = time.perf_counter() - t0
    train_params = sum(p.numel() for p in model.parameters())
    if recipe == "vanilla":
        return model, model, None, seconds, train_params
    small = api.contract(model.eval(), (xte[:64],))
    deployed = DigitsNet()
    deployed.load_state_dict(small.state_dict(), strict=True)  # the original architecture
    return deployed.eval(), model, small.fxexpand_report.verification, seconds, train_params


def run_demo(epochs: int = 20, seeds: int = 3, recipes: tuple[str, ...] = RECIPES, batch_size: int = 64,
             lr: float = 0.05, threads: int = 1, console=None) -> list[DemoResult]:
    """Run the demo; returns one :class:`DemoResult` per recipe (and prints progress to ``console``)."""

    if epochs < 1 or seeds < 1:
        raise ValueError("epochs and seeds must be >= 1")
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise ValueError(f"unknown recipes {bad}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(threads)
    data = load_digits()
    xte = data[2]
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        for recipe in recipes:
            res = DemoResult(recipe)
            deployed = None
            for s in range(seeds):
                task = progress.add_task(f"{recipe:<11} seed {s}", total=epochs)
                deployed, trained, ver, secs, tparams = _train_one(recipe, s, data, epochs, batch_size, lr,
                                                                   progress, task)
                res.accuracies.append(_accuracy(deployed, *data[2:]))
                res.train_seconds += secs
                res.train_parameters = tparams
                if ver is not None:
                    res.max_rel_error32 = max(res.max_rel_error32, ver.max_rel_error("float32"))
                    res.max_rel_error64 = max(res.max_rel_error64, ver.max_rel_error("float64"))
            x1 = xte[:1]
            res.parameters, res.flops = count_parameters(deployed), count_flops(deployed, (x1,))
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(deployed, (x1,), Path(tmp) / f"{recipe}.onnx")
                res.latency_ms = benchmark_onnx(path, threads=1, warmup=20, runs=200).median_ms
            results.append(res)
    return results


def results_table(results: list[DemoResult], epochs: int, seeds: int):
    t = Table(title=f"fxexpand demo: digits 8x8, {epochs} epochs, {seeds} seeds (test accuracy mean ± std)")
    for col in ("recipe", "test accuracy", "trained params", "deployed params", "deployed FLOPs",
                "ORT latency (ms, 1 thr)", "max contraction rel. error f32 / f64", "train time (s)"):
        t.add_column(col, justify="left" if col == "recipe" else "right")
    for r in results:
        mean = statistics.mean(r.accuracies)
        std = statistics.stdev(r.accuracies) if len(r.accuracies) > 1 else 0.0
        err = "—" if r.recipe == "vanilla" else f"{r.max_rel_error32:.1e} / {r.max_rel_error64:.1e}"
        t.add_row(r.recipe, f"{100 * mean:.2f} ± {100 * std:.2f} %", f"{r.train_parameters:,}", f"{r.parameters:,}",
                  f"{r.flops:,}", f"{r.latency_ms:.4f}", err, f"{r.train_seconds:.1f}")
    return t
