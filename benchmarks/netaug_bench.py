"""Training cost of a NetAug step against a vanilla step (issue: NetAug, benchmark item).

For each model (torchvision mobilenet_v2 at width 0.35, and the demo's tiny DigitsNet):

* step time: vanilla step (forward, backward, SGD step of the tiny model) and NetAug step
  (:func:`fxexpand.netaug_loss`: base + one sampled augmented model, one backward; and with
  ``separate_backward=True``), timed alternately in one process, ``--rounds`` rounds, medians;
* peak memory: (a) bytes of the tensors autograd saves for the backward (exact, from
  ``torch.autograd.graph.saved_tensors_hooks``), (b) peak RSS growth during ``--mem-steps`` steps
  of one variant in a fresh child process (what the operating system sees; Linux only);
* the FLOPs ratio — what a compute-bound step would cost (the issue's "floor"): (FLOPs of the base
  forward + mean FLOPs of the sampled augmented forwards) / FLOPs of the base forward
  (``torch.utils.flop_counter``). Per-step costs that do not scale with width (the optimizer step,
  Python overhead) pull the measured time ratio of a small model below it;
* onnxruntime latency of the contracted tiny model over the original's (alternately, batch 1);
* the paper's figure: +16.7 % GPU-hours (245 vs 210 h for MobileNetV2-Tiny on ImageNet, Table 3),
  which NetAug's authors attribute to data loading and communication dominating a tiny model's
  step; a CPU step with in-memory data has neither, so the compute ratio shows through.

    python benchmarks/netaug_bench.py            # ~3 min on 2 cores; writes benchmarks/results/netaug_bench.*
    python benchmarks/netaug_bench.py --quick    # a smoke run (the tests use it)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, peak_rss_growth  # noqa: E402

import fxexpand  # noqa: E402
from fxexpand.demo import DigitsNet  # noqa: E402
from fxexpand.passes import AugmentWidth  # noqa: E402

PAPER_OVERHEAD = 245 / 210  # NetAug Table 3: GPU hours, NetAug vs baseline (MobileNetV2-Tiny)


def _models(quick: bool):
    res = 64 if quick else 96
    return {
        "mobilenet_v2_0.35": (lambda: torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10),
                              (8 if quick else 32, 3, res, res)),
        "digits_tiny_cnn": (lambda: DigitsNet(), (64, 1, 8, 8)),
    }


def _build(name: str, quick: bool):
    make, shape = _models(quick)[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    y = torch.randint(0, 10, (shape[0],))
    aug = fxexpand.compile(model, passes=[AugmentWidth(width_multipliers=[1.0, 1.8, 2.6],
                                                       expand_multipliers=[1.0, 1.6, 2.2, 2.8])],
                           example_inputs=(x[:2],))
    return model.train(), aug.train(), x, y


def _step(variant: str, model, aug, sampler, step: int, x, y, opt_model, opt_aug) -> None:
    if variant == "vanilla":
        opt_model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt_model.step()
        return
    opt_aug.zero_grad(set_to_none=True)
    loss = fxexpand.netaug_loss(aug, sampler, step, x, y, F.cross_entropy, separate_backward=variant == "netaug-2bw")
    if variant == "netaug":
        loss.backward()
    opt_aug.step()


VARIANTS = ("vanilla", "netaug", "netaug-2bw")


def _saved_bytes(variant: str, model, aug, sampler, x, y) -> int:
    """Peak bytes of tensors saved for backward during one step (both graphs for one backward)."""
    live = {"now": 0, "peak": 0}

    def pack(t):
        n = t.numel() * t.element_size()
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        return (t, n)

    def unpack(p):
        return p[0]

    m, a = copy.deepcopy(model), copy.deepcopy(aug)
    # saved tensors are freed when their graph is freed: track the graph's lifetime by steps
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if variant == "vanilla":
            loss = F.cross_entropy(m(x), y)
            loss.backward()
        elif variant == "netaug":
            loss = fxexpand.netaug_loss(a, sampler, 0, x, y, F.cross_entropy)
            loss.backward()
        else:  # the base graph is freed by its backward before the augmented forward starts
            fxexpand.set_width(a, "base")
            base = F.cross_entropy(a(x), y)
            base.backward()
            base_peak = live["peak"]
            live["now"] = live["peak"] = 0
            with fxexpand.use_width(a, sampler.sample(0)):
                F.cross_entropy(a(x), y).backward()
            live["peak"] = max(base_peak, live["peak"])
    return live["peak"]


def _child(name: str, variant: str, steps: int, quick: bool) -> int:
    """Peak RSS growth (bytes) of ``steps`` steps of one variant, in a fresh process (Linux;
    ``_common.peak_rss_growth``: VmHWM after the steps minus the RSS before them)."""
    torch.set_num_threads(1)
    model, aug, x, y = _build(name, quick)
    sampler = fxexpand.WidthSampler(aug, seed=0, total_steps=1000)
    opt_m = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt_a = torch.optim.SGD(aug.parameters(), lr=0.01, momentum=0.9)

    def run() -> None:
        for s in range(steps):
            _step(variant, model, aug, sampler, s, x, y, opt_m, opt_a)

    return int(peak_rss_growth(run)[1] * 2**20)


def _rss(name: str, variant: str, steps: int, quick: bool) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", name, variant, str(steps)] + (["--quick"] if quick else []),
                         capture_output=True, text=True, timeout=900, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _rss_growth(name: str, steps: int, quick: bool) -> dict[str, int]:
    return {v: _rss(name, v, steps, quick) for v in VARIANTS}


def _onnx_ratio(model, aug, x, runs: int) -> float:
    """onnxruntime latency of the contracted tiny model over the original's (batch 1, 1 thread,
    timed alternately): the export is the same architecture, so this should be 1 within noise."""
    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d) / "original.onnx", Path(d) / "contracted.onnx"
        fxexpand.export_onnx(copy.deepcopy(model).eval(), (x,), a)
        fxexpand.export_onnx(fxexpand.contract(copy.deepcopy(aug).eval(), (x,)), (x,), b)
        sa, sb = fxexpand.compare_onnx([a, b], threads=1, runs=runs)
    return round(sb.median_ms / sa.median_ms, 3)


def _flops_ratio(aug, x, sampler, samples: int) -> tuple[float, float]:
    fxexpand.set_width(aug, "base")
    base = fxexpand.count_flops(aug, (x,))
    augs = []
    for s in range(samples):
        fxexpand.set_width(aug, sampler.sample(s), augmented=True)
        augs.append(fxexpand.count_flops(aug, (x,)))
    fxexpand.set_width(aug, "max")
    largest = fxexpand.count_flops(aug, (x,))
    fxexpand.set_width(aug, "base")
    return (base + statistics.mean(augs)) / base, largest / base


def run(quick: bool, rounds: int, mem_steps: int) -> dict:
    torch.set_num_threads(1)
    results = {}
    for name in _models(quick):
        model, aug, x, y = _build(name, quick)
        sampler = fxexpand.WidthSampler(aug, seed=0, total_steps=10_000)
        opt_m = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt_a = torch.optim.SGD(aug.parameters(), lr=0.01, momentum=0.9)
        times = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up
            _step(v, model, aug, sampler, 0, x, y, opt_m, opt_a)
        for r in range(rounds):  # alternate the variants, rotating the order
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for v in order:
                t0 = time.perf_counter()
                _step(v, model, aug, sampler, r + 1, x, y, opt_m, opt_a)
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        flops_step, flops_max = _flops_ratio(aug, x, sampler, 8 if quick else 32)
        saved = {v: _saved_bytes(v, model, aug, sampler, x, y) for v in VARIANTS}
        rss = _rss_growth(name, mem_steps, quick)
        onnx_ratio = _onnx_ratio(model, aug, x[:1], runs=20 if quick else 200)
        results[name] = {
            "input": list(x.shape), "rounds": rounds,
            "step_ms": {v: round(1000 * t, 3) for v, t in med.items()},
            "step_time_ratio": {v: round(med[v] / med["vanilla"], 3) for v in VARIANTS},
            "flops_ratio_floor": round(flops_step, 3), "flops_largest_over_base": round(flops_max, 3),
            "saved_activation_bytes": saved,
            "saved_activation_ratio": {v: round(saved[v] / saved["vanilla"], 3) for v in VARIANTS},
            "peak_rss_growth_bytes": rss,
            "onnx_latency_contracted_over_original": onnx_ratio,
        }
    return {"machine": machine_info(), "paper_overhead": round(PAPER_OVERHEAD, 3), "models": results}


def _markdown(res: dict) -> str:
    lines = ["| model | input | vanilla step ms | NetAug / vanilla time (1 bw / 2 bw) | FLOPs ratio | "
             "saved activations NetAug / vanilla (1 bw / 2 bw) | peak RSS growth MB (vanilla / 1 bw / 2 bw) | "
             "ORT latency contracted / original |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["models"].items():
        t, s, rss = r["step_time_ratio"], r["saved_activation_ratio"], r["peak_rss_growth_bytes"]
        lines.append(f"| {name} | {'x'.join(map(str, r['input']))} | {r['step_ms']['vanilla']:.1f} | "
                     f"{t['netaug']:.2f} / {t['netaug-2bw']:.2f} | {r['flops_ratio_floor']:.2f} | "
                     f"{s['netaug']:.2f} / {s['netaug-2bw']:.2f} | "
                     f"{rss['vanilla'] / 2**20:.0f} / {rss['netaug'] / 2**20:.0f} / {rss['netaug-2bw'] / 2**20:.0f} | "
                     f"{r.get('onnx_latency_contracted_over_original', float('nan')):.2f} |")
    lines.append(f"\nPaper (Table 3, GPU-hours, ImageNet, MobileNetV2-Tiny): {res['paper_overhead']:.3f}x.")
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: Path) -> None:
    import matplotlib  # bench extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["models"])
    bars = {"step time (1 backward)": [res["models"][n]["step_time_ratio"]["netaug"] for n in names],
            "step time (2 backwards)": [res["models"][n]["step_time_ratio"]["netaug-2bw"] for n in names],
            "FLOPs ratio": [res["models"][n]["flops_ratio_floor"] for n in names],
            "saved activations (1 bw)": [res["models"][n]["saved_activation_ratio"]["netaug"] for n in names]}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.8 / len(bars)
    for i, (label, vals) in enumerate(bars.items()):
        ax.bar([j + i * w for j in range(len(names))], vals, w, label=label)
    ax.axhline(res["paper_overhead"], color="k", ls="--", lw=1, label="paper: +16.7% GPU-hours")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names))], names)
    ax.set_ylabel("NetAug / vanilla")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--mem-steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help="rewrite the .md and .png from the saved .json")
    args = ap.parse_args()
    if args.child:
        name, variant, steps = args.child
        print(_child(name, variant, int(steps), args.quick))
        return
    if args.replot:
        stem = "netaug_bench_quick" if args.quick else "netaug_bench"
        res = json.loads((Path(args.out) / f"{stem}.json").read_text())
        (Path(args.out) / f"{stem}.md").write_text(_markdown(res))
        _plot(res, Path(args.out) / f"{stem}.png")
        return
    rounds = args.rounds or (3 if args.quick else 30)
    mem_steps = args.mem_steps or (2 if args.quick else 5)
    res = run(args.quick, rounds, mem_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "netaug_bench_quick" if args.quick else "netaug_bench"
    tmp = out / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out / f"{stem}.json")
    (out / f"{stem}.md").write_text(_markdown(res))
    try:
        _plot(res, out / f"{stem}.png")
    except ImportError:
        pass
    print(_markdown(res))


if __name__ == "__main__":
    main()
