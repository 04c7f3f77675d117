"""Network Expansion: training time of a grown schedule vs training the full model from the start.

Both runs see the same synthetic data, batch size, optimizer (AdamW) and EMA update, for the same
number of epochs. The grown run follows :class:`fxexpand.GrowthPlan` (n_g stages, α linearly spaced
from α0 to 1, growth at each stage boundary: depth from the EMA with ``InsertEMABlocks``, width with
``GrowWidth``), and its time includes the growth itself (compile, optimizer rebuild, EMA rebuild).
Epochs of the two runs alternate (full epoch e, grown epoch e, ...) so that load changes on the
machine hit both alike. The paper reports 1.3–1.45x faster training.

    python benchmarks/growth_bench.py            # ViT (depth) and ResNet-18 (width), 3 repeats, ~10-15 min
    python benchmarks/growth_bench.py --quick    # tiny run, seconds

Writes benchmarks/results/growth_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info  # noqa: E402

import fxexpand  # noqa: E402


def make_data(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + shape, generator=g)
    # labels from a fixed random linear teacher on pooled inputs: learnable, not noise
    w = torch.randn(shape[0] * 4, classes, generator=g)
    feats = F.adaptive_avg_pool2d(x, 2).flatten(1)
    return x, (feats @ w).argmax(1)


class Run:
    """One training run: the model, its optimizer and EMA, advanced an epoch at a time."""

    def __init__(self, model, plan=None, lr=1e-3, decay=0.99):
        self.model, self.plan = model, plan
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.ema = fxexpand.EMA(model, decay=decay)
        self.seconds, self.growth_seconds, self.losses = [], [], []

    def epoch(self, e: int, x, y, batch: int) -> None:
        t0 = time.perf_counter()
        self.model.train()
        total, n = 0.0, 0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            self.ema.update(self.model)
            total, n = total + float(loss.detach()) * len(xb), n + len(xb)
        grow = 0.0
        if self.plan is not None:
            stage = self.plan.stage_at(e)
            if e == stage.end_epoch - 1 and not stage.is_last:
                g0 = time.perf_counter()
                self.model = stage.grow(self.model, self.ema)
                self.opt = stage.rebuild_optimizer(self.opt, self.model)
                grow = time.perf_counter() - g0
        self.seconds.append(time.perf_counter() - t0)
        self.growth_seconds.append(grow)
        self.losses.append(total / n)


def bench(name: str, build, plan_kwargs: dict, shape, epochs: int, n: int, batch: int) -> dict:
    x, y = make_data(n, shape, 10)
    torch.manual_seed(0)
    full = build()
    plan = fxexpand.GrowthPlan(full, epochs=epochs, example_inputs=(x[:1],), **plan_kwargs)
    full_run = Run(build())
    grown_run = Run(plan.initial_model(), plan)
    sizes = []
    for e in range(epochs):
        full_run.epoch(e, x, y, batch)
        grown_run.epoch(e, x, y, batch)
        sizes.append(sum(p.numel() for p in grown_run.model.parameters()))
        print(f"  {name} epoch {e}: full {full_run.seconds[-1]:.2f}s  grown {grown_run.seconds[-1]:.2f}s "
              f"(growth {grown_run.growth_seconds[-1]:.2f}s, {sizes[-1]:,} params)", flush=True)
    # at the end the grown model is the full architecture
    check = build()
    check.load_state_dict(grown_run.model.state_dict())
    t_full, t_grown = sum(full_run.seconds), sum(grown_run.seconds)
    return {
        "model": name, "plan": repr(plan), "epochs": epochs, "samples": n, "batch": batch,
        "stage_epochs": [[s.start_epoch, s.end_epoch] for s in plan], "alphas": plan.alphas,
        "full_params": sum(p.numel() for p in full.parameters()), "grown_params_per_epoch": sizes,
        "full_epoch_s": full_run.seconds, "grown_epoch_s": grown_run.seconds,
        "growth_s": grown_run.growth_seconds,
        "full_total_s": t_full, "grown_total_s": t_grown, "speedup": t_full / t_grown,
        "full_final_loss": full_run.losses[-1], "grown_final_loss": grown_run.losses[-1],
        "loads_into_full_model": True,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds); results not written")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3, help="independent repetitions of each comparison (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    epochs, n = (3, 64) if args.quick else (args.epochs, args.samples)
    info = machine_info()
    print(f"torch threads {torch.get_num_threads()}, load average {info.get('loadavg_start')}")

    def vit():
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=4,
                                                    hidden_dim=64, mlp_dim=128, num_classes=10)

    def resnet():
        return torchvision.models.resnet18(weights=None, num_classes=10)

    configs = [
        ("ViT (12 layers, hidden 64, mlp 128, patch 8, 32x32), depth 0.5 -> 1", vit,
         {"depth_factor": 0.5, "stages": 3}),
        ("ResNet-18 (32x32), width 0.5 -> 1", resnet, {"width_factor": 0.5, "stages": 3}),
    ]
    repeats = 1 if args.quick else args.repeats
    results = []
    for name, build, kw in configs:
        runs = [bench(name, build, kw, (3, 32, 32), epochs, n, 64) for _ in range(repeats)]
        speedups = sorted(r["speedup"] for r in runs)
        mid = runs[[r["speedup"] for r in runs].index(speedups[len(speedups) // 2])]
        results.append({**mid, "speedup": speedups[len(speedups) // 2], "speedup_min": speedups[0],
                        "speedup_max": speedups[-1], "repeats": runs})
    info["loadavg_end"] = machine_info().get("loadavg_start")
    out = {"machine": info, "results": results}
    lines = ["| model | epochs × samples | full total (s) | grown total (s) | speed-up, median (min–max) | "
             "growth overhead (s) | final loss full / grown |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['epochs']} × {r['samples']} | {r['full_total_s']:.1f} | "
                     f"{r['grown_total_s']:.1f} | **{r['speedup']:.2f}x** ({r['speedup_min']:.2f}–"
                     f"{r['speedup_max']:.2f}, {len(r['repeats'])} runs) | {sum(r['growth_s']):.2f} | "
                     f"{r['full_final_loss']:.3f} / {r['grown_final_loss']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "growth_bench.json").write_text(json.dumps(out, indent=1, default=str))
        (d / "growth_bench.md").write_text(
            f"torch threads {torch.get_num_threads()}, load average {info.get('loadavg_start')} -> "
            f"{info['loadavg_end']}, {info.get('cpu_model', '')}, torch {info.get('torch')}, "
            f"fxexpand @ {info.get('git_commit')}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
