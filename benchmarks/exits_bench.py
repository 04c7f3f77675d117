"""BoostNet early exits on scikit-learn's digits: boosted vs joint-training exits, and real early exit.

An experiment for :class:`fxexpand.passes.InsertEarlyExits` and :mod:`fxexpand.exits` (BoostNet,
Yu et al., AAAI 2023):

* data: scikit-learn's bundled digits (``fxexpand.demo.load_digits``: a fixed stratified
  train/test split); a validation split (25 % of the train part, fixed generator) is carved out
  of the train part for fitting the exit thresholds. Nothing is downloaded;
* model: a 4-block CNN for 8x8 digits (stem conv-BN-ReLU; ``ConvBlock`` x 4 at 8x8, 8x8, 4x4,
  2x2; global average pooling; Linear). ``InsertEarlyExits(at="blocks", head="msdnet")`` puts an
  MSDNet head after blocks 1-3; the backbone's own classifier is exit 4;
* two variants per seed, with the same initialisation, data order, epochs, optimizer (SGD,
  momentum 0.9, cosine learning rate) and the same gradient rescaling (Eq. 7), as in the paper,
  whose baselines get the rescaling too: ``boosted`` (``F_n = 0.5 · stop_grad(F_{n-1}) + f_n``)
  and ``baseline`` (``boost=False``: ``F_n = f_n``, MSDNet-style joint training); loss
  ``fxexpand.exits.loss`` (sum of the exits' cross-entropies);
* per seed and variant: the anytime table on test (``exits.anytime``) and the budgeted-batch
  curve (``exits.budget_curve``, thresholds fitted on the validation split, flat-curve rule on);
  mean ± std over seeds and a 95 % confidence interval of the paired difference boosted − baseline;
* real early exit for seed 0's boosted model: ``exits.fit`` / ``exits.export`` / ``exits.Runner``
  at a few budgets; batch-1 latency per test sample in onnxruntime (1 thread), measured
  alternately with the contracted backbone's ONNX; the Runner's predictions are checked sample by
  sample against torch's.

Plain digits is nearly saturated (exit 1 alone reaches ~97 %); ``--noise 0.25`` adds fixed Gaussian noise
to every image (a harder task, written to ``exits_bench_noise0.25.*``).

    PYTHONPATH=. python benchmarks/exits_bench.py               # ~40 s on 2 cores (3 seeds; --seeds 10: ~2 min)
    PYTHONPATH=. python benchmarks/exits_bench.py --noise 0.25  # the harder variant
    PYTHONPATH=. python benchmarks/exits_bench.py --quick       # smoke run (the tests use it), ~10 s
    PYTHONPATH=. python benchmarks/exits_bench.py --replot      # rebuild .md / .png from the .json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, loadavg, machine_info, machine_line

import fxexpand
from fxexpand.exits import policy as ep
from fxexpand import exits
from fxexpand.core import ExitRecord, get_record
from fxexpand.demo import load_digits
from fxexpand.passes import InsertEarlyExits

VARIANTS = ("boosted", "baseline")
STEM = "exits_bench"


# -- model -------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """conv3x3-BN-ReLU; the class is used four times, so ``at="blocks"`` finds its instances."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Digits4Net(nn.Module):
    """Stem (conv-BN-ReLU), 4 ConvBlocks (8x8, 8x8, stride 2 -> 4x4, stride 2 -> 2x2), pool, Linear."""

    def __init__(self, widths=(8, 16, 32, 64), num_classes: int = 10):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        self.blocks = nn.Sequential(ConvBlock(w0, w0), ConvBlock(w0, w1), ConvBlock(w1, w2, stride=2),
                                    ConvBlock(w2, w3, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def build(variant: str, seed: int, cfg: dict, example: torch.Tensor) -> torch.fx.GraphModule:
    """Same backbone initialisation (torch seed) and head initialisation (the pass's seed) for both variants."""
    torch.manual_seed(seed)
    net = Digits4Net(tuple(cfg["widths"]))
    if variant == "boosted":
        p = InsertEarlyExits(at="blocks", head=cfg["head"], temperature=cfg["temperature"], seed=seed)
    else:
        p = InsertEarlyExits(at="blocks", head=cfg["head"], boost=False, seed=seed)
    multi = fxexpand.compile(net, passes=[p], example_inputs=(example,))
    rec = get_record(multi, ExitRecord)
    if rec is None or rec.num_exits != 4 or rec.boost != (variant == "boosted") or not rec.rescale_gradients:
        raise RuntimeError(f"unexpected exit record for {variant}: {rec}")
    with torch.no_grad():
        outs = multi.eval()(example)
    if not (isinstance(outs, tuple) and len(outs) == 4 and all(o.shape == (example.shape[0], 10) for o in outs)):
        raise RuntimeError(f"{variant}: expected 4 outputs (batch, 10)")
    return multi.train()


# -- data and training ---------------------------------------------------------------------------------
def load_data(val_fraction: float, split_seed: int, noise: float = 0.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train/val/test from ``fxexpand.demo.load_digits`` (val: ``val_fraction`` of its train part, fixed
    generator); with ``noise`` > 0, fixed Gaussian noise of that std is added to every image (a harder task)."""
    xtr, ytr, xte, yte = load_digits()
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(len(ytr), generator=g)
    n_val = round(val_fraction * len(ytr))
    val, train = perm[:n_val], perm[n_val:]
    data = {"train": (xtr[train], ytr[train]), "val": (xtr[val], ytr[val]), "test": (xte, yte)}
    if noise > 0:
        gn = torch.Generator().manual_seed(4321)
        data = {k: (x + noise * torch.randn(x.shape, generator=gn), y) for k, (x, y) in data.items()}
    return data


def batches(xy: tuple[torch.Tensor, torch.Tensor], size: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = xy
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def train(multi: nn.Module, xy, cfg: dict, seed: int) -> dict[str, float]:
    x, y = xy
    g = torch.Generator().manual_seed(10_000 + seed)  # the same data order for both variants
    steps = math.ceil(len(y) / cfg["batch_size"])
    opt = torch.optim.SGD(multi.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"] * steps)
    multi.train()
    t0 = time.perf_counter()
    last = []
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(y), generator=g)
        last = []
        for i in range(steps):
            idx = perm[i * cfg["batch_size"]:(i + 1) * cfg["batch_size"]]
            opt.zero_grad(set_to_none=True)
            loss = exits.loss(multi(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            last.append(loss.detach().item())
    multi.eval()
    return {"train_seconds": round(time.perf_counter() - t0, 2), "final_epoch_loss": round(statistics.mean(last), 4)}


#: threshold fitting: "flat" = fxexpand's default (fraction fit, then the flat-curve rule), "fraction" = the
#: pure fraction fit (MSDNet's protocol: the fitted fractions spend the budget on the validation split)
RULES = {"flat": True, "fraction": False}
RULE_NAMES = {"flat": "flat rule on (fxexpand default)", "fraction": "fraction fit only (flat rule off)"}


def evaluate_run(multi, data, cfg: dict, example) -> dict[str, Any]:
    test, val = batches(data["test"]), batches(data["val"])
    anytime = exits.anytime(multi, test, example)
    total = anytime[-1]["cost"]
    curves = {}
    for rule, flat in RULES.items():
        curve = exits.budget_curve(multi, val, test, example, budgets=cfg["budgets"], flat_rule=flat)
        for row, b in zip(curve, cfg["budgets"]):
            row["budget_fraction"] = b
            assert abs(row["budget"] / total - b) < 1e-9
        curves[rule] = curve
    return {"anytime": anytime, "budget_curves": curves}


# -- statistics ---------------------------------------------------------------------------------------
def ci_method() -> str:
    try:
        import scipy.stats  # noqa: F401
        return "Student t (scipy.stats.t, n-1 degrees of freedom)"
    except ImportError:
        return "normal approximation (z = 1.96)"


def _quantile(n: int) -> float:
    try:
        import scipy.stats
        return float(scipy.stats.t.ppf(0.975, n - 1))
    except ImportError:
        return 1.959964


def describe(vals: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "values": list(vals)}


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean, std and 95 % CI of the paired differences a - b, and a verdict."""
    d = [x - y for x, y in zip(a, b)]
    out = describe(d)
    out["n"] = len(d)
    if len(d) < 2:
        out.update(ci_low=None, ci_high=None, verdict="n/a (one seed)")
        return out
    half = _quantile(len(d)) * out["std"] / math.sqrt(len(d))
    lo, hi = out["mean"] - half, out["mean"] + half
    out.update(ci_low=lo, ci_high=hi)
    if lo > 0:
        out["verdict"] = "boosted better"
    elif hi < 0:
        out["verdict"] = "baseline better"
    else:
        out["verdict"] = "no significant difference"
    return out


def summarize(runs: list[dict], cfg: dict) -> dict[str, Any]:
    by = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]) for v in VARIANTS}
    any_rows = []
    n_exits = len(by["boosted"][0]["anytime"])
    for k in range(n_exits):
        acc = {v: [r["anytime"][k]["accuracy"] for r in by[v]] for v in VARIANTS}
        any_rows.append({"exit": k + 1, "cost_fraction": by["boosted"][0]["anytime"][k]["cost_fraction"],
                         **{v: describe(acc[v]) for v in VARIANTS},
                         "diff": paired(acc["boosted"], acc["baseline"])})
    budget = {}
    for rule in RULES:
        rows = []
        for j, b in enumerate(cfg["budgets"]):
            row = {"budget": b}
            for v in VARIANTS:
                cur = [r["budget_curves"][rule][j] for r in by[v]]
                row[v] = {"accuracy": describe([c["accuracy"] for c in cur]),
                          "mean_cost_fraction": describe([c["mean_cost_fraction"] for c in cur])}
            row["diff"] = paired(row["boosted"]["accuracy"]["values"], row["baseline"]["accuracy"]["values"])
            rows.append(row)
        budget[rule] = rows
    return {"anytime": any_rows, "budget": budget}


def conclusions(summary: dict, n_seeds: int) -> list[str]:
    if n_seeds < 2:
        return ["One seed: no confidence intervals; the differences are single paired runs."]
    groups: dict[str, list[str]] = {"boosted better": [], "baseline better": [], "no significant difference": []}
    for r in summary["anytime"]:
        groups[r["diff"]["verdict"]].append(f"anytime exit {r['exit']}")
    for rule, rows in summary["budget"].items():
        for r in rows:
            groups[r["diff"]["verdict"]].append(f"budget {r['budget']:.1f} ({rule})")
    lines = []
    for verdict, where in groups.items():
        if where:
            head = ("no significant difference (95 % CI contains 0)" if verdict == "no significant difference"
                    else f"{verdict} (95 % CI of the paired difference excludes 0)")
            lines.append(f"{head}: " + ", ".join(where) + ".")
    if not groups["boosted better"]:
        lines.append(f"Boosting does not significantly help anywhere here ({n_seeds} seeds).")
    else:
        lines.append("Boosting does not help at: "
                     + (", ".join(groups["no significant difference"] + groups["baseline better"]) or "nowhere") + ".")
    n_cmp = sum(len(g) for g in groups.values())
    lines.append(f"Caveat: {n_cmp} comparisons at 95 % each, so about {0.05 * n_cmp:.0f} 'significant' verdict(s) are "
                 "expected by chance alone; with few seeds a CI can also be narrow by luck. Rows are not independent: "
                 "budget rows whose samples all leave at the last exit repeat anytime exit 4.")
    # how the flat rule spends the budget (test split), boosted model
    fl, fr = summary["budget"]["flat"], summary["budget"]["fraction"]
    worse = [f"{a['budget']:.1f}" for a, b in zip(fl, fr)
             if a["boosted"]["accuracy"]["mean"] < b["boosted"]["accuracy"]["mean"] - 1e-12]
    lines.append("Flat rule vs fraction fit (boosted, mean over seeds): mean test cost "
                 + ", ".join(f"{a['budget']:.1f}: {a['boosted']['mean_cost_fraction']['mean']:.2f} vs "
                             f"{b['boosted']['mean_cost_fraction']['mean']:.2f}" for a, b in zip(fl, fr))
                 + (f"; the flat rule has the lower mean test accuracy at budgets {', '.join(worse)} (it stops raising "
                    "thresholds where the small validation split shows no gain)." if worse else "."))
    return lines


def latency_conclusions(lat: dict) -> list[str]:
    out = []
    for rule in RULES:
        rows = [r for r in lat["budgets"] if r["rule"] == rule]
        faster = [r for r in rows if r["latency_ratio"] < 1]
        pred = ", ".join(f"{r['budget']:.1f}: {r['latency_ratio']:.2f}x measured vs "
                         f"{r['predicted_cost_over_backbone']:.2f}x by FLOPs" for r in rows)
        head = (f"Real early exit ({rule}) is slower than the full backbone in onnxruntime at every budget measured"
                if not faster else
                f"Real early exit ({rule}) beats the full backbone in onnxruntime at {len(faster)} of {len(rows)} budgets")
        out.append(f"{head} (latency / backbone: {pred}).")
    return out


# -- real early exit in onnxruntime ------------------------------------------------------------------
def _session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency(multi, data, cfg: dict, workdir: Path) -> dict[str, Any]:
    """Real early exit for one model: fit / export / Runner per budget and rule, checked against torch,
    and batch-1 onnxruntime latency alternating between them and the contracted backbone."""
    xte, yte = data["test"]
    x1 = xte[:1].clone()
    example = (x1,)
    test, val = batches(data["test"]), batches(data["val"])
    costs = exits.exit_costs(multi, example)["flops"]
    c_total = sum(costs)
    # the full backbone alone (no exit heads): contraction, then ONNX
    backbone = fxexpand.contract(copy.deepcopy(multi).eval(), example)
    backbone_flops = fxexpand.count_flops(backbone, example)
    bb_path = fxexpand.export_onnx(backbone, example, workdir / "backbone.onnx")
    bb_sess = _session(bb_path)
    bb_in = bb_sess.get_inputs()[0].name
    # torch's boosted logits on test: the reference for every Runner decision
    logits, y = exits.collect(multi, test)
    assert torch.equal(y, yte)
    scores = ep.confidences(logits)
    labels = torch.stack([lg.argmax(1) for lg in logits])
    xs = [xte[s:s + 1].numpy().copy() for s in range(len(yte))]
    rows, runners = [], {}
    # budget 1.0 with the fraction fit is p = 0: every sample runs every segment (no early exit at all)
    for rule, flat in RULES.items():
        for b in cfg["latency_budgets"]:
            pol = exits.fit(multi, val, b, example, flat_rule=flat)
            ev = exits.evaluate(multi, test, pol)
            d = exits.export(multi, example, workdir / f"{rule}_{b:.2f}", pol)
            runner = exits.Runner(d, threads=1)
            runners[(rule, b)] = runner
            idx = ep.exit_indices(scores, pol.thresholds)
            hist = [0] * len(costs)
            correct = mismatches = 0
            for s in range(len(yte)):
                label, k = runner(xs[s])
                hist[k - 1] += 1
                correct += int(label == int(yte[s]))
                mismatches += int((label, k) != (int(labels[idx[s], s]), int(idx[s]) + 1))
            rows.append({"rule": rule, "flat_rule": flat, "budget": b, "p": pol.p,
                         "thresholds": pol.to_dict()["thresholds"],
                         "predicted_cost_fraction": ev["mean_cost_fraction"],
                         "predicted_cost_over_backbone": ev["mean_cost"] / backbone_flops,
                         "accuracy_torch": ev["accuracy"], "accuracy_runner": correct / len(yte),
                         "histogram_torch": ev["histogram"], "histogram_runner": hist, "mismatches": mismatches})
    # timing: rounds over the first n test samples; per sample the configurations run in a rotating order
    configs: list[Any] = ["backbone", *runners]

    def call(c, xa):
        if c == "backbone":
            return bb_sess.run(None, {bb_in: xa})
        return runners[c](xa)

    n = min(cfg["latency_samples"], len(xs))
    for s in range(min(n, 20)):  # warm-up
        for c in configs:
            call(c, xs[s])
    per_round: dict[Any, list[float]] = {c: [] for c in configs}
    for r in range(cfg["latency_rounds"]):
        tot = dict.fromkeys(configs, 0.0)
        for s in range(n):
            off = (r + s) % len(configs)
            for c in configs[off:] + configs[:off]:
                t0 = time.perf_counter()
                call(c, xs[s])
                tot[c] += time.perf_counter() - t0
        for c in configs:
            per_round[c].append(1000 * tot[c] / n)
    bb_ms = statistics.median(per_round["backbone"])
    for row in rows:
        ms = per_round[(row["rule"], row["budget"])]
        ratios = [m / bb for m, bb in zip(ms, per_round["backbone"])]
        row.update(latency_ms=statistics.median(ms), latency_ratio=statistics.median(ratios),
                   latency_ratio_min=min(ratios), latency_ratio_max=max(ratios))
    # per-segment onnxruntime time: every segment on every sample (as the Runner runs them at p = 0)
    runner = runners[("fraction", max(cfg["latency_budgets"]))]
    seg_ms = [0.0] * len(runner.segments)
    bb_seg_loop = 0.0  # the backbone, timed in the same loop
    m_seg = min(n, 200)
    for rep in range(2):  # the first pass warms up
        for s in range(m_seg):
            t0 = time.perf_counter()
            bb_sess.run(None, {bb_in: xs[s]})
            if rep == 1:
                bb_seg_loop += time.perf_counter() - t0
            values = {runner.segments[0][2]["inputs"][0]: xs[s]}
            for k, (sess, onnx_inputs, spec) in enumerate(runner.segments):
                feeds = {o: values[v] for o, v in zip(onnx_inputs, spec["inputs"])}
                t0 = time.perf_counter()
                res = sess.run(None, feeds)
                if rep == 1:
                    seg_ms[k] += time.perf_counter() - t0
                values.update(zip(spec["outputs"], res))
    seg_ms = [1000 * t / m_seg for t in seg_ms]
    bb_seg_loop = 1000 * bb_seg_loop / m_seg
    all_row = next(r for r in rows if r["rule"] == "fraction" and r["budget"] == max(cfg["latency_budgets"]))
    # fixed cost per onnxruntime call: a line through (FLOPs, time) of the segments and the backbone
    slope, intercept = np.polyfit(np.array([*costs, backbone_flops]) / 1e6, np.array([*seg_ms, bb_seg_loop]), 1)
    return {"seed": 0, "variant": "boosted", "threads": 1, "rounds": cfg["latency_rounds"], "samples": n,
            "backbone": {"latency_ms": bb_ms, "flops": backbone_flops, "flops_over_all_exits": backbone_flops / c_total,
                         "latency_ms_rounds": per_round["backbone"]},
            "all_exits_flops": c_total,
            "budgets": rows,
            "segments": [{"segment": k + 1, "flops": costs[k], "flops_fraction": costs[k] / c_total, "ort_ms": seg_ms[k]}
                         for k in range(len(costs))],
            "backbone_ms_in_segment_loop": bb_seg_loop,
            "runner_all_exits_ms": all_row["latency_ms"],
            "runner_overhead_ms": all_row["latency_ms"] - sum(seg_ms),
            "call_cost_fit": {"fixed_ms": float(intercept), "ms_per_mflop": float(slope)}}


# -- run ------------------------------------------------------------------------------------------------
def stem(quick: bool, noise: float) -> str:
    return STEM + (f"_noise{noise:g}" if noise > 0 else "") + ("_quick" if quick else "")


def config(args) -> dict[str, Any]:
    q = args.quick
    cfg = {
        "quick": q, "seeds": args.seeds or (1 if q else 3), "epochs": args.epochs or (2 if q else 30),
        "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine (per step)", "momentum": 0.9, "weight_decay": 5e-4,
        "widths": [8, 16, 32, 64], "head": "msdnet", "at": "blocks", "temperature": 0.5,
        "gradient_rescaling": "on for both variants (Eq. 7)", "loss": "fxexpand.exits.loss (sum of exit CEs)",
        "noise": args.noise, "val_fraction": 0.25, "split_seed": 1234, "rules": RULE_NAMES,
        "budgets": [0.3, 0.6, 1.0] if q else [round(0.2 + 0.1 * i, 1) for i in range(9)],
        "latency_budgets": [0.5, 1.0] if q else [0.4, 0.6, 0.8, 1.0],
        "latency_rounds": args.rounds or (2 if q else 15), "latency_samples": 100 if q else 450,
        "torch_threads": 1, "torch_flush_denormal": True, "ci_method": ci_method(),
    }
    return cfg


def run(cfg: dict) -> dict[str, Any]:
    torch.set_num_threads(cfg["torch_threads"])
    torch.set_flush_denormal(cfg["torch_flush_denormal"])
    machine = machine_info()
    t_start = time.perf_counter()
    data = load_data(cfg["val_fraction"], cfg["split_seed"], cfg["noise"])
    cfg["sizes"] = {k: len(v[1]) for k, v in data.items()}
    example = (data["test"][0][:2],)
    runs, models = [], {}
    for seed in range(cfg["seeds"]):
        for v in VARIANTS:
            multi = build(v, seed, cfg, example[0])
            info = train(multi, data["train"], cfg, seed)
            res = evaluate_run(multi, data, cfg, example)
            runs.append({"seed": seed, "variant": v, **info, **res})
            print(f"seed {seed} {v:8s}: train {info['train_seconds']:.1f} s, anytime "
                  + " ".join(f"{r['accuracy']:.3f}" for r in res["anytime"]), flush=True)
            if seed == 0:
                models[v] = multi
    rec = get_record(models["boosted"], ExitRecord)
    costs = exits.exit_costs(models["boosted"], example)
    cum = ep.cumulative_costs(costs["flops"])
    model = {"exit_points": rec.points[:-1], "num_exits": rec.num_exits, "temperatures": rec.temperatures,
             "step_flops": costs["flops"], "cum_cost_fraction": [c / cum[-1] for c in cum],
             "params_up_to_exit": costs["params"]}
    summary = summarize(runs, cfg)
    with tempfile.TemporaryDirectory(prefix="exits_bench_") as d:
        lat = latency(models["boosted"], data, cfg, Path(d))
    machine["loadavg_end"] = loadavg()
    return {"benchmark": STEM, "machine": machine, "settings": cfg, "model": model, "runs": runs,
            "summary": summary, "conclusions": conclusions(summary, cfg["seeds"]) + latency_conclusions(lat),
            "latency": lat, "total_seconds": round(time.perf_counter() - t_start, 1)}


# -- report ---------------------------------------------------------------------------------------------
def _pm(d: dict, scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * d['mean']:.{digits}f} ± {scale * d['std']:.{digits}f}"


def _diff(d: dict) -> str:
    if d.get("ci_low") is None:
        return f"{100 * d['mean']:+.2f}"
    return f"{100 * d['mean']:+.2f} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"


def markdown(res: dict) -> str:
    cfg, m, s, lat = res["settings"], res["model"], res["summary"], res["latency"]
    data = "scikit-learn digits" + (f" + fixed Gaussian noise (std {cfg['noise']:g})" if cfg["noise"] else "")
    L = [f"# BoostNet early exits on {data} ({'quick' if cfg['quick'] else 'full'} run)", "",
         (f"Settings: {cfg['seeds']} seeds, {cfg['epochs']} epochs, SGD lr {cfg['lr']} {cfg['lr_schedule']}, "
          f"momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}; widths "
          f"{cfg['widths']}, `InsertEarlyExits(at=\"blocks\", head=\"{cfg['head']}\")`, temperature "
          f"{cfg['temperature']} (boosted) / `boost=False` (baseline), gradient rescaling "
          f"{cfg['gradient_rescaling']}; train/val/test {cfg['sizes']['train']}/{cfg['sizes']['val']}/"
          f"{cfg['sizes']['test']} (val: exit thresholds). Accuracies in %, mean ± std over seeds; diff = "
          f"boosted − baseline in points (paired by seed) with a 95 % CI ({cfg['ci_method']}). "
          f"Total {res['total_seconds']:.0f} s."), "",
         f"Machine: {machine_line(res['machine'])}", "",
         "## Exits", "",
         "| exit | after | cumulative cost (fraction of all exits) | params up to exit |", "|---:|---|---:|---:|"]
    for k in range(m["num_exits"]):
        pt = m["exit_points"][k] if k < len(m["exit_points"]) else "backbone output"
        L.append(f"| {k + 1} | {pt} | {m['cum_cost_fraction'][k]:.3f} | {m['params_up_to_exit'][k]} |")
    L += ["", "## Anytime prediction (test)", "",
          "| exit | cost fraction | boosted | baseline | diff [95 % CI] | verdict |", "|---:|---:|---:|---:|---:|---|"]
    for r in s["anytime"]:
        L.append(f"| {r['exit']} | {r['cost_fraction']:.3f} | {_pm(r['boosted'])} | {_pm(r['baseline'])} | "
                 f"{_diff(r['diff'])} | {r['diff']['verdict']} |")
    for rule, rows in s["budget"].items():
        L += ["", f"## Budgeted batch, {cfg['rules'][rule]}: thresholds fitted on val, evaluated on test", "",
              ("| budget | mean cost boosted | accuracy boosted | mean cost baseline | accuracy baseline | "
              "diff [95 % CI] | verdict |"),
              "|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            b, a = r["boosted"], r["baseline"]
            L.append(f"| {r['budget']:.1f} | {_pm(b['mean_cost_fraction'], 1, 3)} | {_pm(b['accuracy'])} | "
                     f"{_pm(a['mean_cost_fraction'], 1, 3)} | {_pm(a['accuracy'])} | {_diff(r['diff'])} | "
                     f"{r['diff']['verdict']} |")
    c1 = m["cum_cost_fraction"][0]
    L += ["", (f"Mean cost: on the test split, as a fraction of running all exits. Budgets below exit 1's cost "
               f"({c1:.3f}) are infeasible (p is clamped to 1). The flat rule lowers a threshold wherever that "
               "does not cost validation accuracy, so it may spend well under the budget."), "",
          "## Conclusions", ""] + [f"- {c}" for c in res["conclusions"]]
    bb = lat["backbone"]
    L += ["", (f"## Real early exit in onnxruntime (seed {lat['seed']}, {lat['variant']}, batch 1, "
               f"{lat['threads']} thread, {lat['samples']} test samples x {lat['rounds']} rounds, alternating)"), "",
          (f"Full backbone (contracted, no exit heads): {bb['latency_ms'] * 1000:.1f} µs per sample; its FLOPs are "
           f"{bb['flops_over_all_exits']:.3f} of running all exits. Fraction fit at budget 1.0 is p = 0: no "
           "early exit, every segment runs."), "",
          ("| rule | budget | p | predicted cost (fraction of all exits) | predicted cost / backbone FLOPs | "
           "latency µs | latency / backbone [min, max over rounds] | exit histogram (Runner) | "
           "accuracy Runner / torch | mismatches |"),
          "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in lat["budgets"]:
        L.append(f"| {r['rule']} | {r['budget']:.1f} | {r['p']:.3f} | {r['predicted_cost_fraction']:.3f} | "
                 f"{r['predicted_cost_over_backbone']:.3f} | {1000 * r['latency_ms']:.1f} | {r['latency_ratio']:.3f} "
                 f"[{r['latency_ratio_min']:.3f}, {r['latency_ratio_max']:.3f}] | {r['histogram_runner']} | "
                 f"{100 * r['accuracy_runner']:.2f} / {100 * r['accuracy_torch']:.2f} | {r['mismatches']} |")
    L += ["", "| session call (the Runner's files, no early exit) | FLOPs (fraction of all exits) | onnxruntime µs |",
          "|---|---:|---:|"]
    for sg in lat["segments"]:
        L.append(f"| segment {sg['segment']} | {sg['flops_fraction']:.3f} | {1000 * sg['ort_ms']:.1f} |")
    L.append(f"| backbone | {bb['flops_over_all_exits']:.3f} | {1000 * lat['backbone_ms_in_segment_loop']:.1f} |")
    seg_sum = sum(sg["ort_ms"] for sg in lat["segments"])
    fit = lat["call_cost_fit"]
    L += ["", ("Overhead: each segment is a separate onnxruntime session call, and the Runner adds numpy work per "
               f"exit reached (boosting, softmax, threshold). The 4 segments' calls take {1000 * seg_sum:.1f} µs "
               f"together against {1000 * lat['backbone_ms_in_segment_loop']:.1f} µs for the one-call backbone "
               "(both timed in one loop over the first 200 test samples); the Runner with no "
               f"early exit takes {1000 * lat['runner_all_exits_ms']:.1f} µs, i.e. "
               f"{1000 * lat['runner_overhead_ms']:.1f} µs of Python/numpy on top of the calls. A least-squares line "
               f"through the 5 calls gives {1000 * fit['fixed_ms']:.1f} µs fixed per call + "
               f"{1000 * fit['ms_per_mflop']:.1f} µs per MFLOP. On a model this small the fixed costs dominate, so "
               "FLOPs do not predict latency: compare 'latency / backbone' with 'predicted cost / backbone FLOPs'.")]
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    s, cfg = res["summary"], res["settings"]
    fig = Figure(figsize=(12, 4.6))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = {"boosted": "tab:red", "baseline": "tab:blue"}
    styles = {"fraction": ("-", 0.18), "flat": (":", 0.08)}
    for v in VARIANTS:
        for rule, rows in s["budget"].items():
            ls, alpha = styles[rule]
            pts = sorted((r[v]["mean_cost_fraction"]["mean"], 100 * r[v]["accuracy"]["mean"],
                          100 * r[v]["accuracy"]["std"]) for r in rows)
            xs, ys, sd = zip(*pts)
            ax.plot(xs, ys, ls, marker=".", color=colors[v], label=f"{v}, budgeted ({rule})")
            ax.fill_between(xs, [y - e for y, e in zip(ys, sd)], [y + e for y, e in zip(ys, sd)],
                            color=colors[v], alpha=alpha, lw=0)
        ax.errorbar([r["cost_fraction"] for r in s["anytime"]], [100 * r[v]["mean"] for r in s["anytime"]],
                    yerr=[100 * r[v]["std"] for r in s["anytime"]], fmt="o", mfc="none", color=colors[v],
                    capsize=3, label=f"{v}, anytime exits")
    ax.set_xlabel("mean test cost (fraction of running all exits)")
    ax.set_ylabel("test accuracy (%)")
    noise = f", noise {cfg['noise']:g}" if cfg["noise"] else ""
    ax.set_title(f"digits{noise}: accuracy vs cost, mean ± std over {cfg['seeds']} seed(s)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")

    def err(d):
        if d.get("ci_low") is None:
            return [[0], [0]]
        return [[100 * (d["mean"] - d["ci_low"])], [100 * (d["ci_high"] - d["mean"])]]

    marks = {"fraction": ("s", "k", -0.012), "flat": ("D", "tab:gray", 0.0)}
    for rule, rows in s["budget"].items():
        mk, col, dx = marks[rule]
        for i, r in enumerate(rows):
            bx.errorbar([r["budget"] + dx], [100 * r["diff"]["mean"]], yerr=err(r["diff"]), fmt=mk, color=col,
                        capsize=3, ms=4, label=f"budgeted, {rule} (x = budget)" if i == 0 else None)
    for i, r in enumerate(s["anytime"]):
        bx.errorbar([r["cost_fraction"] + 0.012], [100 * r["diff"]["mean"]], yerr=err(r["diff"]), fmt="o",
                    color="tab:green", capsize=3, label="anytime exit (x = its cost)" if i == 0 else None)
    bx.axhline(0, color="grey", lw=0.8)
    bx.set_xlabel("budget / cost fraction")
    bx.set_ylabel("boosted − baseline (accuracy points)")
    bx.set_title("paired difference, 95 % CI" + (" (one seed: no CI)" if cfg["seeds"] < 2 else ""), fontsize=10)
    bx.grid(True, alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _clean(o):
    """NaN / infinity -> None (strict JSON); tuple keys are not used."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        return _clean(o.item())
    return o


def write_outputs(res: dict, out: Path, name: str) -> str:
    md = markdown(res)
    write_atomic(out / f"{name}.md", md)
    try:
        plot(res, out / f"{name}.png")
    except ImportError:
        pass
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, fewer budgets: a smoke run")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 3; --quick: 1)")
    ap.add_argument("--epochs", type=int, default=None, help="default 30 (--quick: 2)")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="std of fixed Gaussian noise added to every image (a harder task); default 0")
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds over the test samples")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--replot", action="store_true", help="rebuild the .md and .png from the saved .json")
    args = ap.parse_args()
    out = Path(args.out)
    name = stem(args.quick, args.noise)
    if args.replot:
        res = json.loads((out / f"{name}.json").read_text())
        print(write_outputs(res, out, name))
        return
    res = _clean(run(config(args)))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(res, indent=1, allow_nan=False))
    print(write_outputs(res, out, name))


if __name__ == "__main__":
    main()
