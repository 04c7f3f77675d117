"""Training speed of the tiny model on one CPU core: one seed at a time vs K seeds at once (issue 28).

    python benchmarks/study_speed.py                  # widths 2, 4, 8; K = 2, 4, 8; 5 rounds
    python benchmarks/study_speed.py --widths 4 --rounds 3 --epochs 2

A 606-parameter TinyConv1d spends a training step (batch 128) almost entirely in per-op overhead.
Side by side in one process (torch on 1 thread), in rounds whose order rotates, each variant trains
``--epochs`` epochs of the demo's data (MNIST-1D, 5,000 samples: 3,200 training, 25 steps per
epoch) through ``fxexpand.training.protocols.run`` — the runner's code path:

* ``separate``: one model (what ``benchmarks/study.py`` runs without ``--stack``);
* ``separate, foreach SGD``: the same with ``torch.optim.SGD(foreach=True)`` (fewer optimizer ops);
* ``stacked K``: K seeds as one ``fxexpand.demo.stacked.StackedTinyConv1d`` (``--stack K``).

Reported: the median CPU seconds per seed and epoch, and the speed-up = separate / variant with
its min-max over rounds (each round's ratio). Exactness is checked alongside: the stacked seeds'
weights against separately trained ones after the same epochs, in float64 (and float32 vs float64 as
the scale of rounding's own effect). Writes benchmarks/results/study_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine_info, machine_line  # noqa: E402

from fxexpand.demo import common  # noqa: E402
from fxexpand.demo.models import TinyConv1d  # noqa: E402
from fxexpand.demo.stacked import StackedLoader, stack, stacked_cross_entropy  # noqa: E402
from fxexpand.training import protocols  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def _foreach_cosine(lr: float):
    def make(params, total_steps):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return make


def _models(seeds, width, dtype=torch.float32):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(TinyConv1d(width=width).to(dtype))
    return out


def train_separate(d, width, seed, epochs, make=None, dtype=torch.float32):
    (m,) = _models([seed], width, dtype)
    loader = common.Loader(d.x_train.to(dtype), d.y_train, 128, seed)
    protocols.run(m, protocols.vanilla(), loader, epochs=epochs, make_optimizer=(make or common.sgd_cosine)(0.1))
    return m


def train_stacked(d, width, seeds, epochs, dtype=torch.float32):
    m = stack(_models(seeds, width, dtype))
    loader = StackedLoader(d.x_train.to(dtype), d.y_train, 128, seeds)
    protocols.run(m, protocols.vanilla(), loader, epochs=epochs, make_optimizer=common.sgd_cosine(0.1),
                  loss_fn=stacked_cross_entropy)
    return m.unstack()


def _max_rel(a, b) -> float:
    return max(float((x - y.to(x.dtype)).abs().max() / y.abs().max().clamp_min(1e-30))
               for x, y in zip(a.state_dict().values(), b.state_dict().values()) if x.is_floating_point())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info()
    t_start = time.perf_counter()
    d = common.cached_splits("mnist1d", 5000)
    variants = ["separate", "separate, foreach SGD"] + [f"stacked {k}" for k in args.ks]
    results: dict = {}
    for w in args.widths:
        train_separate(d, w, 0, 1)  # warm-up (lazy imports, allocator)
        train_stacked(d, w, list(range(max(args.ks))), 1)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                t = time.perf_counter()
                if v == "separate":
                    train_separate(d, w, 0, args.epochs)
                    k = 1
                elif v == "separate, foreach SGD":
                    train_separate(d, w, 0, args.epochs, make=_foreach_cosine)
                    k = 1
                else:
                    k = int(v.split()[1])
                    train_stacked(d, w, list(range(k)), args.epochs)
                times[v].append((time.perf_counter() - t) / (k * args.epochs))
        base = times["separate"]
        rows = {}
        for v in variants:
            ratios = [b / t for b, t in zip(base, times[v])]
            rows[v] = {"seconds_per_seed_epoch": statistics.median(times[v]), "speedup": statistics.median(ratios),
                       "speedup_min": min(ratios), "speedup_max": max(ratios), "times": times[v]}
        # exactness: 2 seeds stacked vs separate, float64; float32 vs float64 separate as rounding's own scale
        st64 = train_stacked(d, w, [0, 1], args.epochs, torch.float64)
        sep64 = [train_separate(d, w, s, args.epochs, dtype=torch.float64) for s in (0, 1)]
        sep32 = [train_separate(d, w, s, args.epochs) for s in (0, 1)]
        st32 = train_stacked(d, w, [0, 1], args.epochs)
        exact = {"stacked64_vs_separate64": max(_max_rel(a, b) for a, b in zip(st64, sep64)),
                 "stacked32_vs_separate32": max(_max_rel(a, b) for a, b in zip(st32, sep32)),
                 "separate32_vs_separate64": max(_max_rel(a, b) for a, b in zip(sep32, sep64))}
        results[str(w)] = {"params": sum(p.numel() for p in TinyConv1d(width=w).parameters()), "variants": rows,
                           "exactness": exact}
        print(f"width {w}: " + ", ".join(f"{v} {rows[v]['seconds_per_seed_epoch'] * 1e3:.0f} ms/seed-epoch "
                                         f"(x{rows[v]['speedup']:.2f})" for v in variants)
              + f"; max rel. weight difference stacked-separate f64 {exact['stacked64_vs_separate64']:.1e}", flush=True)
    info["loadavg_end"] = loadavg()
    wall = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "args": vars(args), "wall_seconds": wall, "results": results}
    (out / "study_speed.json").write_text(json.dumps(report, indent=1))
    lines = ["# Tiny-model training speed: separate vs K seeds stacked (issue 28)", "",
             f"`python benchmarks/study_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
             "", f"Machine: {machine_line(info)}. Wall time {wall:.0f} s.", "",
             f"MNIST-1D (5,000 samples: 3,200 training, 25 steps of batch 128 per epoch), {args.epochs} epochs per "
             f"timing through `protocols.run`, SGD + cosine; {args.rounds} rounds, order rotating; median CPU "
             "time per seed and epoch, speed-up = separate / variant per round (median, min-max).", "",
             "| width | params | variant | ms per seed-epoch | speed-up (min-max) |", "|---:|---:|---|---:|---|"]
    for w, res in results.items():
        for v, r in res["variants"].items():
            lines.append(f"| {w} | {res['params']} | {v} | {1e3 * r['seconds_per_seed_epoch']:.0f} | "
                         f"{r['speedup']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |")
    lines += ["", "Exactness after the same epochs (max relative weight difference over the two seeds and all "
              "tensors):", "", "| width | stacked vs separate, float64 | stacked vs separate, float32 | "
              "float32 vs float64, separate |", "|---:|---:|---:|---:|"]
    for w, res in results.items():
        e = res["exactness"]
        lines.append(f"| {w} | {e['stacked64_vs_separate64']:.1e} | {e['stacked32_vs_separate32']:.1e} | "
                     f"{e['separate32_vs_separate64']:.1e} |")
    (out / "study_speed.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'study_speed.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
