"""Training cost of ExpandNets models run explicitly vs collapsed vs the original (issue: online collapse).

For each model and ExpandNets mode — the paper's names: CL and CK expand the convolutions, FC the
fully-connected layers, CL+FC / CK+FC both (``fxexpand.recipes.expandnets``, ratio 4, the layers the
paper expands: every k×k conv of a plain CNN, only the non-residual 3x3 convs of MobileNetV2, the
hidden FC layers); "-all": every eligible layer including 1x1 convs and the logit layer
(``layers="all"``) — one training step (forward, backward, SGD step) of

* the original model,
* the expanded model with ``train_mode="explicit"`` (every chain runs as its layers),
* the expanded model with ``train_mode="collapsed"`` (the default: each chain runs as one op whose
  weight is composed from the factors in that forward, where that costs fewer multiply-accumulates
  than the chain for the input at hand),

timed alternately in one process (rounds rotate the order; medians; torch threads 1), with

* peak training memory: the peak of all live tensors during one step (torch's ``MemTracker``:
  parameters, gradients, optimizer state, saved activations, temporaries), with its floor for the
  collapsed form — the original's activations plus the expanded model's parameters, gradients and
  optimizer state, which both expanded forms hold —; and the peak RSS growth of a fresh child
  process over a few steps (Linux ``VmHWM`` after ``malloc_trim``);
* the composition's own share of a collapsed step: the time to compose every region's kernel
  (forward, with autograd recording) over the collapsed step time; and the composition forward
  *plus* the backward of a kernel-shaped gradient through it to the factors, timed on its own — the
  weight-only work a collapsed step adds to the original's, as a share of the original step (timed
  alone it includes overheads the step shares, so it overstates the in-step cost somewhat). Only the
  regions that run collapsed on the benchmark input count (``collapse_pays``).

SmallNet runs at the paper's CIFAR batch, 128 (ExpandNets §4.1), and at 32: composing the kernel is
a fixed cost per step, so its share of a step shrinks as the batch grows, and so does the share of the
expanded weights' state in the memory.

    python benchmarks/collapse_bench.py           # ~8 min on 2 cores; benchmarks/results/collapse_bench.*
    python benchmarks/collapse_bench.py --quick   # smoke run (the tests use it)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, peak_rss_growth  # noqa: E402

import fxexpand  # noqa: E402
from fxexpand.core import find_regions  # noqa: E402
from fxexpand.core.collapse import collapse_pays, compose_chain  # noqa: E402
from fxexpand.demo import DemoConfig  # noqa: E402
from fxexpand.demo.models import SmallNet, TinyConv1d  # noqa: E402

VARIANTS = ("original", "explicit", "collapsed")


def _cases(quick: bool) -> list[tuple[str, str, int, int]]:
    """(model, mode, input side, batch)."""
    if quick:
        return [("smallnet", "CL", 32, 8), ("demo_tiny_conv1d", "FC", 40, 16)]
    cases = []
    for batch in (128, 32):  # the paper's CIFAR batch (ExpandNets §4.1), and a small one
        for mode in ("CL", "CK", "FC", "CL+FC", "CK+FC"):
            cases.append(("smallnet", mode, 32, batch))
    for side in (64, 112):  # MobileNetV2 has no hidden FC layer: FC expands nothing there
        for mode in ("CL", "CL-all"):
            cases.append(("mobilenet_v2_0.35", mode, side, 16))
    for mode in ("CL", "CK", "FC", "CK+FC"):  # the demo's model and batch (``fxexpand.demo.DemoConfig``)
        cases.append(("demo_tiny_conv1d", mode, 40, DemoConfig.batch_size))
    return cases


def _passes(mode: str) -> list:
    """ExpandNets recipes with the paper's layers: "CL"/"CK" convs only, "FC" FC only, "+FC" both;
    "-all" every eligible layer (convs and Linear layers)."""
    if mode.endswith("-all"):
        return fxexpand.recipes.expandnets(mode[:2], layers="all")
    return fxexpand.recipes.expandnets(mode[:2], fc=mode.endswith("+FC"))


def _model(name: str) -> torch.nn.Module:
    if name == "smallnet":
        return SmallNet()
    if name == "demo_tiny_conv1d":
        return TinyConv1d(width=DemoConfig.width)
    return torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)


def _build(name: str, mode: str, side: int, batch: int):
    torch.manual_seed(0)
    model = _model(name)
    x = torch.randn(batch, 1, side) if name == "demo_tiny_conv1d" else torch.randn(batch, 3, side, side)
    y = torch.randint(0, 10, (batch,))
    expanded = fxexpand.compile(model, passes=_passes(mode), example_inputs=(x[:2],))
    explicit = copy.deepcopy(expanded)
    fxexpand.set_train_mode(explicit, "explicit")
    collapsed = expanded
    models = {"original": model.train(), "explicit": explicit.train(), "collapsed": collapsed.train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    return models, opts, x, y


def _step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _peak_memory(model, opt, x, y) -> dict[str, int]:
    """Peak tensor memory of one training step (torch's ``MemTracker``: every live tensor, by kind),
    after a warm-up step so that gradients and optimizer state exist: ``total``; ``state``
    (parameters, buffers, gradients, optimizer state) and ``activations`` (saved activations and
    temporaries) at the peak."""
    _step(model, opt, x, y)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        _step(model, opt, x, y)
    snap = tracker.get_tracker_snapshot("peak")[x.device]
    kinds = {k.name if hasattr(k, "name") else k: v for k, v in snap.items()}
    state = sum(kinds.get(k, 0) for k in ("PARAM", "BUFFER", "GRAD", "OPT"))
    return {"total": int(kinds["Total"]), "state": int(state), "activations": int(kinds["Total"] - state)}


def _collapsing(model, x) -> list:
    """The regions that run collapsed on ``x`` (collapsed mode, and composing pays for their input:
    ``collapse_pays``; a weight-bound region, e.g. a hidden FC, runs its chain)."""
    probe = copy.deepcopy(model)
    shapes = {}
    hooks = [r.register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape)))
             for n, r in find_regions(probe).items()]
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    return [r for n, r in find_regions(model).items()
            if r.train_mode == "collapsed" and n in shapes and collapse_pays(r.body, shapes[n])]


def _compose_ms(model, x, rounds: int) -> float:
    regions = _collapsing(model, x)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for r in regions:
            compose_chain(r.body)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _compose_fwd_bwd_ms(model, x, rounds: int) -> float:
    """Time to compose the kernel of every region that runs collapsed *and* back-propagate a gradient
    of the kernel's shape through the composition to the factors: the weight-only work a collapsed
    step adds to the original's, timed on its own."""
    regions = _collapsing(model, x)
    if not regions:
        return 0.0
    grads = [torch.randn_like(compose_chain(r.body)["weight"]) for r in regions]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        loss = sum((compose_chain(r.body)["weight"] * g).sum() for r, g in zip(regions, grads))
        loss.backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return 1000 * statistics.median(times)


def _child(name: str, mode: str, side: int, batch: int, variant: str, steps: int) -> int:
    """Peak RSS growth (bytes) of ``steps`` steps of one variant in a fresh process (``peak_rss_growth``)."""
    torch.set_num_threads(1)
    models, opts, x, y = _build(name, mode, side, batch)
    model, opt = models[variant], opts[variant]
    del models

    def run() -> None:
        for _ in range(steps):
            _step(model, opt, x, y)

    return int(peak_rss_growth(run)[1] * 2**20)


def _rss(case, variant: str, steps: int) -> int:
    name, mode, side, batch = case
    out = subprocess.run([sys.executable, __file__, "--child", name, mode, str(side), str(batch), variant, str(steps)],
                         capture_output=True, text=True, timeout=900, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def run(quick: bool, rounds: int, mem_steps: int) -> dict:
    torch.set_num_threads(1)
    rows = []
    for case in _cases(quick):
        name, mode, side, batch = case
        models, opts, x, y = _build(name, mode, side, batch)
        regions = find_regions(models["collapsed"])
        n_coll = sum(r.train_mode == "collapsed" for r in regions.values())
        for v in VARIANTS:
            _step(models[v], opts[v], x, y)  # warm-up
        times = {v: [] for v in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for v in order:
                t0 = time.perf_counter()
                _step(models[v], opts[v], x, y)
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) for v, t in times.items()}
        peak = {v: _peak_memory(models[v], opts[v], x, y) for v in VARIANTS}
        total = {v: peak[v]["total"] for v in VARIANTS}
        # what a collapsed step would need with nothing but the expansion's own weights added: the
        # original's activations plus the expanded model's parameters, gradients and optimizer state
        floor = peak["original"]["activations"] + peak["explicit"]["state"]
        rss = {v: _rss(case, v, mem_steps) for v in VARIANTS}
        compose = _compose_ms(models["collapsed"], x, rounds)
        compose_fb = _compose_fwd_bwd_ms(models["collapsed"], x, rounds)
        rows.append({
            "model": name, "mode": mode, "input": list(x.shape), "regions": len(regions),
            "collapsed_regions": n_coll,
            "step_ms": {v: round(1000 * t, 3) for v, t in med.items()},
            "time_ratio": {v: round(med[v] / med["original"], 3) for v in VARIANTS},
            "peak_memory_bytes": peak,
            "peak_memory_ratio": {v: round(total[v] / total["original"], 3) for v in VARIANTS},
            "peak_memory_floor_ratio": round(floor / total["original"], 3),
            "rss_growth_bytes": rss,
            "rss_ratio": {v: round(rss[v] / max(rss["original"], 1), 3) for v in VARIANTS},
            "compose_ms": round(compose, 3), "compose_share_of_collapsed_step": round(compose / (1000 * med["collapsed"]), 3),
            "compose_fwd_bwd_ms": round(compose_fb, 3),
            "compose_fwd_bwd_share_of_original_step": round(compose_fb / (1000 * med["original"]), 3),
        })
        print(f"{name} {mode} {tuple(x.shape)}: time x{rows[-1]['time_ratio']}, peak memory x{rows[-1]['peak_memory_ratio']}",
              flush=True)
    return {"machine": machine_info(), "rounds": rounds, "mem_steps": mem_steps, "rows": rows}


def _fb(r: dict) -> str:
    if "compose_fwd_bwd_ms" not in r:  # results from before this column
        return "–"
    return f"{r['compose_fwd_bwd_ms']:.2f} ({100 * r['compose_fwd_bwd_share_of_original_step']:.0f} %)"


def _verdict(r: dict) -> str:
    """The target, per quantity: where the explicit form takes ≥ 3× the original's step time (or
    peak memory), the collapsed form takes ≤ 1.3× it; "n/a" where the explicit form is below 3×.
    A memory miss names its floor (see the module docstring) when the floor itself exceeds 1.3×."""
    parts = []
    for label, ratio in (("time", r["time_ratio"]), ("memory", r["peak_memory_ratio"])):
        if ratio["explicit"] < 3:
            parts.append(f"{label} n/a")
        elif ratio["collapsed"] <= 1.3:
            parts.append(f"{label} yes")
        elif label == "memory" and r["peak_memory_floor_ratio"] > 1.3:
            parts.append(f"{label} **no** (floor {r['peak_memory_floor_ratio']:.2f}×)")
        else:
            parts.append(f"{label} **no**")
    return ", ".join(parts)


def _markdown(res: dict) -> str:
    lines = ["| model | mode | input (batch first) | original step ms | time explicit / collapsed (× original) | "
             "peak training memory explicit / collapsed (× original) | collapsed memory floor (×) | "
             "peak RSS growth explicit / collapsed (×) | composition share of a collapsed step | "
             "composition forward + backward alone, ms (% of the original step) | "
             "target met (collapsed ≤ 1.3× where explicit ≥ 3×, per quantity) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        t, m = r["time_ratio"], r["rss_ratio"]
        pk = r["peak_memory_ratio"]
        met = _verdict(r)
        lines.append(f"| {r['model']} | {r['mode']} | {'x'.join(map(str, r['input']))} | {r['step_ms']['original']:.1f} | "
                     f"{t['explicit']:.2f} / {t['collapsed']:.2f} | {pk['explicit']:.2f} / {pk['collapsed']:.2f} | "
                     f"{r['peak_memory_floor_ratio']:.2f} | "
                     f"{m['explicit']:.2f} / {m['collapsed']:.2f} | {100 * r['compose_share_of_collapsed_step']:.1f} % | "
                     f"{_fb(r)} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--mem-steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help="rewrite the .md from the saved .json")
    args = ap.parse_args()
    if args.child:
        name, mode, side, batch, variant, steps = args.child
        print(_child(name, mode, int(side), int(batch), variant, int(steps)))
        return
    stem = "collapse_bench_quick" if args.quick else "collapse_bench"
    out = Path(args.out)
    if args.replot:
        res = json.loads((out / f"{stem}.json").read_text())
    else:
        res = run(args.quick, args.rounds or (3 if args.quick else 15), args.mem_steps or (1 if args.quick else 3))
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{stem}.json.tmp"
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(out / f"{stem}.json")
    (out / f"{stem}.md").write_text(_markdown(res))
    print(_markdown(res))


if __name__ == "__main__":
    main()
