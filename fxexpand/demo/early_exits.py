"""``fxexpand demo --exits``: BoostNet's demo — boosted vs plain multi-exit training on MNIST-1D.

The tiny model (:class:`fxexpand.demo.models.TinyConv1d`) gets an exit after each of its first two
blocks (:class:`fxexpand.passes.InsertEarlyExits`, ``at="blocks"``, MSDNet heads); the backbone's
classifier is the last exit. Two variants per seed with the same initialisation, data order and
optimizer, and the paper's gradient rescaling (Eq. 7) in both, as in its baselines (BoostNet,
Sec. 3 and 4): **boosted** (``F_n = 0.5 · stop_grad(F_{n-1}) + f_n``) and **plain** (``boost=False``,
``F_n = f_n``: MSDNet-style joint training). Each is evaluated in the *anytime* setting (every sample
at every exit; :func:`fxexpand.exits.anytime`) and the *budgeted* setting (exit thresholds fitted on
the validation split for a mean-cost budget, accuracy on test; :func:`fxexpand.exits.budget_curve`
with the flat-curve rule off, which over-fits small validation splits — docs/exits.md). Reported:
mean ± std over paired seeds and the paired difference boosted − plain with a 95 % CI.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.table import Table

from .. import api, exits
from ..pipelines import early_exits
from ..training.train import Trainer
from . import data as datasets
from .common import Loader, format_diff, map_tasks, process_pool, sgd_one_cycle, write_json
from .compare import LR_GRID, TUNE_SEEDS, paired_difference
from .models import TinyConv1d

__all__ = ["run", "table", "write_outputs", "plot_curves", "ExitsReport", "BUDGETS"]

#: budgets as fractions of the full model's cost per sample
BUDGETS = (0.45, 0.55, 0.65, 0.75, 0.85, 1.0)
VARIANTS = ("boosted", "plain")


@dataclass
class ExitsReport:
    config: dict
    runs: list[dict]
    summary: dict
    seconds: float


def _batches(x, y, size=500):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def train_variant(task: dict) -> dict:
    """One (variant, seed): train, then the anytime table and the budget curve on test."""
    torch.set_num_threads(1)
    d = datasets.mnist1d()
    torch.manual_seed(task["seed"])
    tiny = TinyConv1d(width=task["width"])
    xb = d.x_train[:64]
    model = api.compile(tiny, passes=early_exits(boost=task["variant"] == "boosted", seed=task["seed"]),
                        example_inputs=(xb,))
    loader = Loader(d.x_train, d.y_train, 128, task["seed"])
    opt, sched = sgd_one_cycle(task["lr"])(model.parameters(), task["epochs"] * len(loader))
    t0 = time.perf_counter()
    Trainer(model, opt, epochs=task["epochs"], decay_fraction=0.0, lr_scheduler=sched,
            scheduler_interval="step").fit(loader)
    seconds = time.perf_counter() - t0
    test, val = _batches(d.x_test, d.y_test), _batches(d.x_val, d.y_val)
    if task.get("split") == "val":  # tuning: the validation split only
        return {**task, "seconds": seconds, "anytime": exits.anytime(model, val, (xb[:1],)), "budget_curve": []}
    anytime = exits.anytime(model, test, (xb[:1],))
    curve = exits.budget_curve(model, val, test, (xb[:1],), budgets=BUDGETS, flat_rule=False)
    return {**task, "seconds": seconds, "anytime": anytime, "budget_curve": curve}


def run(*, seeds: int = 3, epochs: int = 20, width: int = 4, lr: float = 0.1, workers: int = 2, tune: bool = False,
        lr_grid: tuple[float, ...] = LR_GRID, tune_seed: int = TUNE_SEEDS[0],
        progress: Callable[[str], None] | None = None) -> ExitsReport:
    """Train both variants for every seed and summarise (see the module docstring). With ``tune``,
    each variant's learning rate is first chosen on the validation split (last exit's accuracy)
    over ``lr_grid`` with ``tune_seed``, as the main demo does."""
    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    lrs = {v: lr for v in VARIANTS}
    tuning: dict = {}
    pool = process_pool(workers)
    try:
        if tune:
            tasks = [dict(variant=v, seed=tune_seed, epochs=epochs, width=width, lr=g, split="val")
                     for v in VARIANTS for g in lr_grid]
            res = map_tasks(pool, train_variant, tasks, lambda i, r: say(
                f"tuning {r['variant']} lr={r['lr']:g}: val last exit {100 * r['anytime'][-1]['accuracy']:.1f}%"))
            for v in VARIANTS:
                scores = {r["lr"]: r["anytime"][-1]["accuracy"] for r in res if r["variant"] == v}
                lrs[v] = max(scores, key=lambda g: scores[g])
                tuning[v] = {"val_last_exit_accuracy": {str(g): a for g, a in scores.items()}, "chosen": lrs[v]}
        tasks = [dict(variant=v, seed=s, epochs=epochs, width=width, lr=lrs[v]) for s in range(seeds) for v in VARIANTS]
        runs = map_tasks(pool, train_variant, tasks, lambda i, r: say(
            f"{r['variant']} seed {r['seed']}: last exit {100 * r['anytime'][-1]['accuracy']:.1f}%"))
    finally:
        if pool is not None:
            pool.shutdown()
    summary = _summarise(runs, seeds)
    return ExitsReport({"seeds": seeds, "epochs": epochs, "width": width, "lr": lrs, "tuning": tuning,
                        "budgets": list(BUDGETS)}, runs, summary, time.perf_counter() - t0)


def _summarise(runs: list[dict], seeds: int) -> dict:
    by = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]) for v in VARIANTS}
    out: dict = {"anytime": [], "budget": []}
    n_exits = len(runs[0]["anytime"])
    for e in range(n_exits):
        accs = {v: [r["anytime"][e]["accuracy"] for r in by[v]] for v in VARIANTS}
        out["anytime"].append({"exit": e + 1, "cost_fraction": runs[0]["anytime"][e]["cost_fraction"],
                               **{v: statistics.fmean(a) for v, a in accs.items()},
                               "diff": paired_difference(accs["boosted"], accs["plain"])})
    for i, b in enumerate(BUDGETS):
        accs = {v: [r["budget_curve"][i]["accuracy"] for r in by[v]] for v in VARIANTS}
        cost = {v: statistics.fmean(r["budget_curve"][i]["mean_cost_fraction"] for r in by[v]) for v in VARIANTS}
        out["budget"].append({"budget": b, **{v: statistics.fmean(a) for v, a in accs.items()},
                              **{f"{v}_cost": c for v, c in cost.items()},
                              "diff": paired_difference(accs["boosted"], accs["plain"])})
    return out


def table(rep: ExitsReport) -> Table:
    c = rep.config
    lr = c["lr"] if isinstance(c["lr"], dict) else {v: c["lr"] for v in VARIANTS}
    t = Table(title=f"BoostNet demo: MNIST-1D, width {c['width']}, {c['epochs']} epochs, {c['seeds']} paired seeds, "
                    f"lr boosted {lr['boosted']:g} / plain {lr['plain']:g}"
                    f"{' (tuned on validation)' if c.get('tuning') else ''} (test accuracy %, mean; Δ boosted − plain "
                    "with 95% CI)")
    for col in ("setting", "cost (fraction)", "boosted", "plain", "Δ"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for r in rep.summary["anytime"]:
        t.add_row(f"anytime exit {r['exit']}", f"{r['cost_fraction']:.2f}", f"{100 * r['boosted']:.2f}",
                  f"{100 * r['plain']:.2f}", format_diff(r["diff"]))
    for r in rep.summary["budget"]:
        t.add_row(f"budget {r['budget']:.2f}", f"{r['boosted_cost']:.2f} / {r['plain_cost']:.2f}",
                  f"{100 * r['boosted']:.2f}", f"{100 * r['plain']:.2f}", format_diff(r["diff"]))
    return t


def write_outputs(rep: ExitsReport, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``exits.json`` and ``exits.png`` (mean budget curves and anytime points) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = write_json(out / "exits.json", asdict(rep))
    curves = {v: [{"mean_cost_fraction": r[f"{v}_cost"], "accuracy": r[v]} for r in rep.summary["budget"]]
              for v in VARIANTS}
    anytime = {v: [{"cost_fraction": r["cost_fraction"], "accuracy": r[v]} for r in rep.summary["anytime"]]
               for v in VARIANTS}
    png = out / "exits.png"
    plot_curves(curves, png, anytime=anytime,
                title=f"BoostNet on MNIST-1D ({rep.config['seeds']} seeds, mean)")
    return js, png


def plot_curves(
    curves: dict[str, list[dict[str, Any]]],
    path: str | os.PathLike[str],
    *,
    anytime: dict[str, list[dict[str, Any]]] | None = None,
    title: str = "",
) -> None:
    """Plot accuracy (y) against mean cost fraction (x) and save it to ``path``.

    ``curves`` maps a name (e.g. ``"boosted"``, ``"baseline"``) to
    :func:`fxexpand.exits.policy.budget_curve` rows, drawn as one line each, sorted by cost;
    ``anytime`` maps names to :func:`fxexpand.exits.policy.anytime_table` rows, drawn as markers
    (in the colour of the curve with the same name, if any). The format follows the file suffix
    (PNG when there is none). The file is written to a temporary name next to ``path`` and
    moved into place with :func:`os.replace`, so a reader never sees a partial image. Needs
    matplotlib (an optional extra).
    """
    from matplotlib.figure import Figure  # lazy: matplotlib is an optional extra

    dest = os.fspath(path)
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colors: dict[str, Any] = {}
    for name, rows in curves.items():
        pts = sorted((float(r["mean_cost_fraction"]), float(r["accuracy"])) for r in rows)
        (line,) = ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=name)
        colors[name] = line.get_color()
    for name, rows in (anytime or {}).items():
        pts = sorted((float(r["cost_fraction"]), float(r["accuracy"])) for r in rows)
        kw = {"color": colors[name]} if name in colors else {}
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", linestyle="none",
                label=f"{name} (anytime)", **kw)
    ax.set_xlabel("mean cost (fraction of the full model)")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    suffix = os.path.splitext(dest)[1].lstrip(".").lower()
    fmt = suffix or "png"
    head, tail = os.path.split(dest)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
