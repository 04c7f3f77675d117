"""``fxexpand demo``: do the methods make a tiny model better? A paired comparison on MNIST-1D.

The tiny model (:class:`fxexpand.demo.models.TinyConv1d`, a MobileNet-style Conv1d net that under-fits
MNIST-1D) is trained with each method's paper protocol (:mod:`fxexpand.training.protocols`), contracted
back to the tiny architecture (strict ``load_state_dict``), verified and evaluated; vanilla
training is the baseline at the method's epochs and at matched training compute (a ladder of
vanilla budgets, compared by interpolation in log-compute). Every method uses the same seeds
(paired), the same optimizer (SGD with Nesterov momentum, one-cycle learning rate, restarted per
phase) and its own learning rate, tuned on the validation split over one small grid
(:data:`LR_GRID`; the documented run's choices are :data:`TUNED_LR`). The test split is used once,
for the final table. Nothing is downloaded: MNIST-1D is generated offline by the ``mnist1d``
package.

:func:`run_demo` returns a :class:`DemoReport`; :func:`write_outputs` writes its JSON and PNG.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.table import Table
from torch import nn

from .. import api
from ..core import InputError
from ..deploy.bench import compare_onnx
from ..deploy.cost import count_flops, count_parameters
from ..deploy.export import export_onnx
from ..training import protocols
from . import data as datasets
from .common import SCHEDULES, Loader, accuracy, cached_splits, format_diff, map_tasks, process_pool, write_json
from .models import DigitsNet, TinyConv1d

__all__ = ["DigitsNet", "load_digits", "run_demo", "DemoConfig", "DemoReport", "METHODS", "DEFAULT_METHODS",
           "FULL_METHODS", "FULL_SEEDS", "full_config",
           "LR_GRID", "TUNED_LR", "results_table", "write_outputs", "paired_difference", "reading", "plot", "train_run", "markdown_table"]

#: the methods the demo can run (names of :data:`fxexpand.training.protocols.PROTOCOLS`)
METHODS = tuple(protocols.PROTOCOLS)
#: the default comparison (``fxexpand demo``, ≤ 6 min on 2 cores): a short vanilla ladder and one
#: protocol per method
DEFAULT_METHODS = ("vanilla", "vanilla-x2", "vanilla-x4", "netbooster", "expandnets-cl", "expandnets-ck",
                   "expandnets-ck-init", "netaug")
#: the documented run (``fxexpand demo --full``): every method, the E_d = 0 ablation, and a vanilla
#: ladder up to 8x the compute (``vanilla-x16`` is available with ``--methods``; NetBooster costs more
#: than 8x, and is then compared with the largest rung, which favours NetBooster)
FULL_METHODS = ("vanilla", "vanilla-x2", "vanilla-x4", "vanilla-x8", "netbooster", "netbooster-ed0",
                "expandnets-cl", "expandnets-ck", "expandnets-ck-init", "netaug")
FULL_SEEDS = 10
#: the learning-rate grid every method is tuned over (validation split)
LR_GRID = (0.03, 0.1, 0.3)
#: learning rates chosen on the validation split by the documented run's tuning phase
#: (``fxexpand demo --full``; grid :data:`LR_GRID`, tuning seed 1000; docs/demo/tuning.log).
#: vanilla-x16 was not tuned (not in the documented run): it uses vanilla-x8's rate.
TUNED_LR = {"vanilla": 0.3, "vanilla-x2": 0.3, "vanilla-x4": 0.3, "vanilla-x8": 0.3, "vanilla-x16": 0.3,
            "netbooster": 0.3, "netbooster-ed0": 0.3, "expandnets-cl": 0.1, "expandnets-ck": 0.3,
            "expandnets-ck-init": 0.3, "netaug": 0.3}
#: the seed used for tuning (disjoint from the final seeds 0..n-1)
TUNE_SEEDS = (1000,)


def load_digits(test_size: float = 0.25, split_seed: int = 0):
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)`` (the examples' loader; the demo
    uses :func:`fxexpand.demo.data.digits`, which also carves a validation split)."""

    # lazy: scikit-learn takes ~1 s to import and only the digits data needs it
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx = list(range(len(y)))
    tr, te = train_test_split(idx, test_size=test_size, random_state=split_seed, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


@dataclass
class DemoConfig:
    """What to run. ``epochs`` is the base epochs E (each protocol runs its phases' multiples)."""

    dataset: str = "mnist1d"
    width: int = 4
    epochs: int = 20
    batch_size: int = 128
    seeds: int = 3
    methods: tuple[str, ...] = DEFAULT_METHODS
    tune: bool = False
    lr: dict[str, float] = field(default_factory=lambda: dict(TUNED_LR))
    lr_grid: tuple[float, ...] = LR_GRID
    tune_seeds: tuple[int, ...] = TUNE_SEEDS
    workers: int = 2
    latency_runs: int = 300

    def check(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise InputError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        if "vanilla" not in self.methods:
            raise InputError("the comparison needs the 'vanilla' baseline among the methods")
        if self.dataset not in datasets.DATASETS:
            raise InputError(f"unknown dataset {self.dataset!r}; choose from {', '.join(datasets.DATASETS)}")
        for name in ("epochs", "batch_size", "seeds", "workers", "width", "latency_runs"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(lr <= 0 for lr in self.lr_grid) or any(v <= 0 for v in self.lr.values()):
            raise InputError("learning rates must be positive")


def full_config(**overrides: Any) -> DemoConfig:
    """The documented run: :data:`FULL_METHODS`, :data:`FULL_SEEDS` paired seeds, learning rates tuned."""
    return DemoConfig(**{"methods": FULL_METHODS, "seeds": FULL_SEEDS, "tune": True, **overrides})


# -- one training run (a worker process) -------------------------------------------------------------
def _tiny(dataset: str, width: int) -> nn.Module:
    return TinyConv1d(width=width) if dataset == "mnist1d" else DigitsNet(width=width)


def _split(d: datasets.Splits, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in ("train", "val", "test"):
        raise InputError(f"unknown split {name!r}; choose from train, val, test")
    return getattr(d, f"x_{name}"), getattr(d, f"y_{name}")


def train_run(task: dict) -> dict:
    """Train one (method, seed, lr) and evaluate it on ``task["split"]`` ("val" or "test"); run in a
    worker process. Returns accuracies, the giant's accuracy after NetBooster's phase 1, training
    compute (FLOPs per phase from ``torch.utils.flop_counter``), wall time and the deployed weights.

    Optional keys (the regime study's): ``num_samples`` (MNIST-1D's size), ``schedule`` (a name of
    :data:`fxexpand.demo.common.SCHEDULES`, default "one-cycle") and ``evaluate`` (splits whose
    accuracy is returned in ``"accuracies"``, e.g. ``("val", "test")``)."""

    torch.set_num_threads(1)
    d = cached_splits(task["dataset"], task.get("num_samples"))
    x_eval, y_eval = (d.x_val, d.y_val) if task["split"] == "val" else (d.x_test, d.y_test)
    proto = protocols.PROTOCOLS[task["method"]]()
    torch.manual_seed(task["seed"])
    tiny = _tiny(task["dataset"], task["width"])
    xb, yb = d.x_train[:task["batch_size"]], d.y_train[:task["batch_size"]]
    model = proto.compile(tiny, (xb,))
    loader = Loader(d.x_train, d.y_train, task["batch_size"], task["seed"])
    phase_flops: list[float] = []
    phase_acc: list[float] = []

    def on_phase_end(i: int, m: nn.Module) -> None:
        phase_flops.append(protocols.step_flops(m, xb, yb, netaug=proto.netaug))
        phase_acc.append(accuracy(m, x_eval, y_eval))

    t0 = time.perf_counter()
    protocols.run(model, proto, loader, epochs=task["epochs"], make_optimizer=SCHEDULES[task.get("schedule", "one-cycle")](task["lr"]),
                  seed=task["seed"], on_phase_end=on_phase_end)
    seconds = time.perf_counter() - t0
    steps = [max(1, round(p.factor * task["epochs"])) * len(loader) for p in proto.phases]
    flops = sum(f * s for f, s in zip(phase_flops, steps))
    err32 = err64 = 0.0
    diverged = not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    if proto.recipe is None or diverged:
        # a diverged run is a result (its accuracy is what its non-finite weights give), not a crash
        deployed = model
    else:
        small = api.contract(model.eval(), (x_eval[:64],))
        deployed = _tiny(task["dataset"], task["width"])
        deployed.load_state_dict(small.state_dict(), strict=True)  # the original architecture
        ver = small.fxexpand_report.verification
        err32, err64 = ver.max_rel_error("float32"), ver.max_rel_error("float64")
    return {
        **{k: task[k] for k in ("method", "seed", "lr", "split", "epochs")},
        "accuracy": accuracy(deployed, x_eval, y_eval),
        "train_accuracy": accuracy(deployed, d.x_train, d.y_train),
        "accuracies": {s: accuracy(deployed, *_split(d, s)) for s in task.get("evaluate", ())},
        "parameters": count_parameters(deployed),
        "phase_accuracy": phase_acc,
        "train_flops": flops,
        "train_seconds": seconds,
        "trained_parameters": sum(p.numel() for p in model.parameters()),
        "max_rel_error32": err32, "max_rel_error64": err64, "diverged": diverged,
        "state_dict": {k: v.clone() for k, v in deployed.state_dict().items()} if task.get("keep") else None,
    }


# -- statistics -------------------------------------------------------------------------------------------
def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``a[i] - b[i]`` with a t confidence interval (scipy.stats); the interval is NaN for one pair."""
    from scipy import stats  # ~0.3 s; only the summary needs it

    if len(a) != len(b) or not a:
        raise ValueError("paired samples must be non-empty and of equal length")
    diff = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diff)
    if len(diff) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": len(diff)}
    sem = statistics.stdev(diff) / math.sqrt(len(diff))
    if sem == 0:
        return {"mean": mean, "low": mean, "high": mean, "n": len(diff)}
    low, high = stats.t.interval(confidence, len(diff) - 1, loc=mean, scale=sem)
    return {"mean": mean, "low": float(low), "high": float(high), "n": len(diff)}


def _interpolate(points: list[tuple[float, float]], c: float) -> tuple[float, str]:
    """Accuracy at compute ``c`` on a vanilla ladder ``[(compute, acc)]`` (linear in log compute)."""
    points = sorted(points)
    if c <= points[0][0]:
        return points[0][1], "at the smallest budget"
    if c >= points[-1][0]:
        return points[-1][1], "beyond the ladder: largest budget used" if c > points[-1][0] * 1.05 else ""
    for (c0, a0), (c1, a1) in zip(points, points[1:]):
        if c0 <= c <= c1:
            t = (math.log(c) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return a0 + t * (a1 - a0), ""
    return points[-1][1], ""


# -- the whole comparison ---------------------------------------------------------------------------------
@dataclass
class DemoReport:
    config: dict
    runs: list[dict]
    tuning: dict[str, dict]
    summary: list[dict]
    latency: dict[str, dict]
    dataset: dict
    seconds: float


def run_demo(config: DemoConfig | None = None, *, progress: Callable[[str], None] | None = None) -> DemoReport:
    """Run the comparison (tuning first when ``config.tune``); see the module docstring."""

    cfg = config or DemoConfig()
    cfg.check()
    t_start = time.perf_counter()
    say = progress or (lambda msg: None)
    d = cached_splits(cfg.dataset)
    base = {"dataset": cfg.dataset, "width": cfg.width, "epochs": cfg.epochs, "batch_size": cfg.batch_size}
    lr = {m: cfg.lr.get(m, TUNED_LR.get(m, 0.05)) for m in cfg.methods}
    tuning: dict[str, dict] = {}
    pool = process_pool(cfg.workers)
    try:
        if cfg.tune:
            tasks = [dict(base, method=m, seed=s, lr=g, split="val") for m in cfg.methods for g in cfg.lr_grid
                     for s in cfg.tune_seeds]
            results = map_tasks(pool, train_run, tasks, lambda i, r: say(
                f"tuning {i}/{len(tasks)}: {r['method']} lr={r['lr']:g} seed {r['seed']} val {100 * r['accuracy']:.1f}%"))
            for m in cfg.methods:
                scores = {g: statistics.fmean(r["accuracy"] for r in results if r["method"] == m and r["lr"] == g)
                          for g in cfg.lr_grid}
                best = max(scores, key=lambda g: (scores[g], -abs(math.log(g / 0.1))))
                tuning[m] = {"val_accuracy": {str(g): v for g, v in scores.items()}, "chosen": best}
                lr[m] = best
        tasks = [dict(base, method=m, seed=s, lr=lr[m], split="test", keep=True) for s in range(cfg.seeds)
                 for m in cfg.methods]
        runs = map_tasks(pool, train_run, tasks, lambda i, r: say(
            f"run {i}/{len(tasks)}: {r['method']} seed {r['seed']} test {100 * r['accuracy']:.1f}% "
            f"({r['train_seconds']:.0f} s)"))
    finally:
        if pool is not None:
            pool.shutdown()
    say("timing the deployed models (onnxruntime, alternately)")
    latency = _latency(cfg, runs, d)
    for r in runs:
        r.pop("state_dict", None)
    summary = _summarise(cfg, runs, latency)
    return DemoReport(asdict(cfg), runs, tuning, summary, latency,
                      {"name": d.name, **d.sizes(), "input_shape": list(d.input_shape)},
                      time.perf_counter() - t_start)


def _latency(cfg: DemoConfig, runs: list[dict], d: datasets.Splits) -> dict[str, dict]:
    x1 = d.x_test[:1]
    models = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        if r.get("state_dict") is not None and not r.get("diverged") and r["method"] not in models:
            m = _tiny(cfg.dataset, cfg.width)
            m.load_state_dict(r["state_dict"], strict=True)
            models[r["method"]] = m.eval()
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [export_onnx(m, (x1,), Path(tmp) / f"{i}.onnx") for i, m in enumerate(models.values())]
        stats = compare_onnx(paths, threads=1, warmup=20, runs=cfg.latency_runs)
    ref = stats[list(models).index("vanilla")].median_ms if "vanilla" in models else stats[0].median_ms
    for name, m, st in zip(models, models.values(), stats):
        out[name] = {"median_ms": st.median_ms, "ratio_to_vanilla": st.median_ms / ref,
                     "parameters": count_parameters(m), "flops": count_flops(m, (x1,))}
    return out


def _summarise(cfg: DemoConfig, runs: list[dict], latency: dict[str, dict]) -> list[dict]:
    by: dict[str, list[dict]] = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
                                 for m in cfg.methods}
    van = by["vanilla"]
    van_flops = statistics.fmean(r["train_flops"] for r in van)
    van_secs = statistics.fmean(r["train_seconds"] for r in van)
    ladder = {m: protocols.PROTOCOLS[m]().epochs_factor for m in cfg.methods if m.startswith("vanilla")}
    out = []
    for m in cfg.methods:
        rs = by[m]
        proto = protocols.PROTOCOLS[m]()
        acc = [r["accuracy"] for r in rs]
        row: dict[str, Any] = {
            "method": m, "protocol": proto.name, "paper": proto.paper, "lr": rs[0]["lr"],
            "epochs": round(proto.epochs_factor * cfg.epochs), "n": len(rs),
            "accuracy_mean": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_accuracy_mean": statistics.fmean(r["train_accuracy"] for r in rs),
            "compute_ratio": statistics.fmean(r["train_flops"] for r in rs) / van_flops,
            "time_ratio": statistics.fmean(r["train_seconds"] for r in rs) / van_secs,
            "trained_parameters": rs[0]["trained_parameters"],
            "max_rel_error32": max(r["max_rel_error32"] for r in rs),
            "max_rel_error64": max(r["max_rel_error64"] for r in rs),
            "latency_ratio": latency.get(m, {}).get("ratio_to_vanilla"),
            "diverged": sum(bool(r.get("diverged")) for r in rs),
        }
        if len(proto.phases) > 1:
            row["phase1_accuracy_mean"] = statistics.fmean(r["phase_accuracy"][0] for r in rs)
        same_epochs = [v for v, f in ladder.items() if abs(f - proto.epochs_factor) < 1e-9]
        if same_epochs and not m.startswith("vanilla"):
            base = [r["accuracy"] for r in by[same_epochs[0]]]
            row["vs_vanilla_epochs"] = {"baseline": same_epochs[0], **paired_difference(acc, base)}
        if not m.startswith("vanilla") and len(ladder) > 1:
            matched, notes = [], set()
            for r in rs:
                pts = [(next(v["train_flops"] for v in by[b] if v["seed"] == r["seed"]),
                        next(v["accuracy"] for v in by[b] if v["seed"] == r["seed"])) for b in ladder]
                a, note = _interpolate(pts, r["train_flops"])
                matched.append(a)
                if note:
                    notes.add(note)
            row["vs_vanilla_compute"] = {"baseline": "vanilla ladder, interpolated", "note": "; ".join(sorted(notes)),
                                         **paired_difference(acc, matched)}
        out.append(row)
    return out


# -- output ------------------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def results_table(report: DemoReport) -> Table:
    """The comparison as a rich table."""
    c = report.config
    t = Table(title=f"fxexpand demo: {report.dataset['name']}, tiny model width {c['width']}, E = {c['epochs']} "
                    f"base epochs, {c['seeds']} paired seeds (test accuracy %, mean ± std; Δ = paired difference "
                    f"to vanilla with 95% CI; FLOPs / time: training cost × vanilla at E epochs)")
    cols = ("method", "epochs", "lr", "test acc", "train acc", "Δ same epochs", "Δ same compute",
            "FLOPs ×", "time ×", "latency ×", "err f32/f64")
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in report.summary:
        err = "—" if r["method"].startswith("vanilla") else f"{r['max_rel_error32']:.0e}/{r['max_rel_error64']:.0e}"
        lat = "—" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}"
        t.add_row(r["method"] + (f" ({r['diverged']} diverged)" if r.get("diverged") else ""), str(r["epochs"]), f"{r['lr']:g}",
                  f"{_pct(r['accuracy_mean'])} ± {_pct(r['accuracy_std'])}", _pct(r["train_accuracy_mean"]),
                  format_diff(r.get("vs_vanilla_epochs")), format_diff(r.get("vs_vanilla_compute")),
                  f"{r['compute_ratio']:.2f}", f"{r['time_ratio']:.2f}", lat, err)
    return t


def markdown_table(report: DemoReport | dict) -> str:
    """The comparison as a Markdown table (docs/demo.md is written from the documented run's JSON)."""
    rep = report if isinstance(report, dict) else asdict(report)
    lines = ["| method | epochs | lr | test acc. % | train acc. % | Δ vs vanilla, same epochs | Δ vs vanilla, same "
             "compute | train FLOPs × | train time × | latency × |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["summary"]:
        lat = "—" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}"
        name = r["method"] + (f" ({r['diverged']} diverged)" if r.get("diverged") else "")
        lines.append(f"| {name} | {r['epochs']} | {r['lr']:g} | {_pct(r['accuracy_mean'])} ± "
                     f"{_pct(r['accuracy_std'])} | {_pct(r['train_accuracy_mean'])} | {format_diff(r.get('vs_vanilla_epochs'))} "
                     f"| {format_diff(r.get('vs_vanilla_compute'))} | {r['compute_ratio']:.2f} | {r['time_ratio']:.2f} | {lat} |")
    return "\n".join(lines)


def _verdict(d: dict | None) -> str:
    if not d or math.isnan(d.get("low", math.nan)):
        return "no CI (one seed)" if d else "n/a"
    if d["low"] > 0:
        return "better (95% CI above 0)"
    if d["high"] < 0:
        return "worse (95% CI below 0)"
    return "no significant difference (95% CI contains 0)"


def reading(report: DemoReport) -> list[str]:
    """One plain sentence per method: better, worse or indistinguishable from each vanilla baseline."""
    lines = []
    for r in report.summary:
        if r["method"].startswith("vanilla"):
            continue
        e, c = r.get("vs_vanilla_epochs"), r.get("vs_vanilla_compute")
        msg = f"{r['method']}: vs vanilla at the same epochs {_verdict(e)}; vs vanilla at the same training compute " \
              f"{_verdict(c)}"
        if c and c.get("note"):
            msg += f" ({c['note']})"
        if r.get("diverged"):
            msg += f"; diverged (non-finite weights) in {r['diverged']} of {r['n']} seeds"
        if "phase1_accuracy_mean" in r:
            msg += f"; after phase 1 (giant / nonlinear counterpart) {_pct(r['phase1_accuracy_mean'])} %"
        lines.append(msg + ".")
    return lines


def plot(report: DemoReport, path: str | os.PathLike) -> Path:
    """Accuracy per method (each seed a dot) and accuracy against training compute."""
    from matplotlib.figure import Figure  # ~0.3 s; only the plot needs it

    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1.4, 1))
    names = [r["method"] for r in report.summary]
    for i, name in enumerate(names):
        accs = [100 * r["accuracy"] for r in report.runs if r["method"] == name]
        jitter = [i + 0.08 * ((k % 5) - 2) for k in range(len(accs))]
        ax1.scatter(jitter, accs, s=14, alpha=0.6, color="C0" if name.startswith("vanilla") else "C1")
        ax1.errorbar(i + 0.3, statistics.fmean(accs), yerr=statistics.stdev(accs) if len(accs) > 1 else 0,
                     fmt="o", color="k", capsize=3)
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("per method (dots: seeds; black: mean ± std)")
    ax1.grid(axis="y", alpha=0.3)
    ladder = sorted((r["compute_ratio"], 100 * r["accuracy_mean"]) for r in report.summary
                    if r["method"].startswith("vanilla"))
    ax2.plot(*zip(*ladder), "o-", color="C0", label="vanilla (budget ladder)")
    methods = [r for r in report.summary if not r["method"].startswith("vanilla")]
    for k, r in enumerate(methods):
        ax2.errorbar(r["compute_ratio"], 100 * r["accuracy_mean"], yerr=100 * r["accuracy_std"], fmt="s",
                     capsize=3, label=r["method"], color=f"C{k + 1}")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("training compute (FLOPs, × vanilla at E epochs)")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("accuracy against training cost")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    return out


def write_outputs(report: DemoReport, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``demo.json`` (every number) and ``demo.png`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / "demo.json", asdict(report)), plot(report, out / "demo.png")
