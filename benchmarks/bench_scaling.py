"""Compiler cost and how it grows with graph size (suite section ``scaling``).

Two synthetic chains of ``n`` blocks on a 1x4x8x8 input (tiny tensors, so the graph work dominates):

* ``conv_bn_relu``: ``n`` x [Conv2d(4, 4, 3, padding=1, bias=False) -> BatchNorm2d -> ReLU];
  expanded with ExpandNets CL (every conv becomes 1x1 -> 3x3 -> 1x1 inside an ExpandedRegion) and
  contracted back (target "original"); target "deploy" folds every BatchNorm of the original chain.
* ``conv_conv``: ``n`` x [Conv2d(4, 4, 3, padding=1) -> Conv2d(4, 4, 1) -> ReLU]; target "deploy"
  fuses every conv∘conv pair (it saves MACs), FuseLinearPass's sequential rule ``n`` times.

Stages (each timed on its own, wall time and peak-RSS growth): ``trace`` (fxexpand.trace),
``fx_trace_fuse`` (torch.fx.symbolic_trace + torch.fx.experimental.optimization.fuse, the baseline),
``expand`` (fxexpand.compile with LinearExpand CL), the contraction passes one by one on a traced and
shape-propagated expanded graph (``pass:RemoveIdentityPass``, ``pass:FoldBatchNormPass``,
``pass:FuseLinearPass``, ``pass:RestoreOriginalPass``), ``contract`` with and without verification
(target original on the expanded chain; deploy on conv_conv), ``export`` (fxexpand.export_onnx with its
onnxruntime check) of the contracted chain.

The cost growth per stage is the least-squares slope of log(time) against log(n): 1 is linear,
2 quadratic.
"""

from __future__ import annotations

import copy
import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import fxexpand
from fxexpand.passes import LinearExpand
from _common import log, peak_rss_growth

C, SIDE = 4, 8


class ConvBNReLUChain(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n):
            layers += [nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class ConvConvChain(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n):
            layers += [nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.eval()


def _scale_init(model: nn.Module) -> nn.Module:
    """Weights scaled so a deep chain neither explodes nor vanishes (verification needs finite outputs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, math.sqrt(2.0 / fan_in) * 0.9)
    return model


STAGES = ["trace", "fx_trace_fuse", "expand", "passes", "contract_noverify", "contract_verify",
          "deploy_bn_fold_noverify", "deploy_conv_conv_noverify", "deploy_conv_conv_verify", "export"]
PASS_NAMES = ["RemoveIdentityPass", "FoldBatchNormPass", "FuseLinearPass", "RestoreOriginalPass"]


def time_passes(expanded: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each contraction pass, run in sequence (one round, as contract's first fixed-point
    round) on a traced, shape-propagated copy of the expanded chain (tracing is not timed here)."""
    from fxexpand.api import propagate_shapes
    from fxexpand.passes import FoldBatchNormPass, FuseLinearPass, RemoveIdentityPass, RestoreOriginalPass

    gm = fxexpand.trace(copy.deepcopy(expanded).eval(), inline_regions=True)
    propagate_shapes(gm, (x,))
    out = {}
    for p in (RemoveIdentityPass(scope="expanded"), FoldBatchNormPass(scope="expanded"),
              FuseLinearPass(scope="expanded"), RestoreOriginalPass()):
        t0 = time.perf_counter()
        gm = p(gm).graph_module
        gm.recompile()
        out[f"pass:{p.name}"] = time.perf_counter() - t0
    return out


def _summary(times: list[float], peaks: list[float]) -> dict[str, Any]:
    a = np.asarray(times)
    return {"median_s": float(np.median(a)), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)), "min_s": float(a.min()), "repeats": len(times),
            "all_s": [round(t, 5) for t in times],
            "peak_rss_growth_mib": float(max(peaks)) if peaks else float("nan")}


def run_stage(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        dt, peak = peak_rss_growth(fn)
        times.append(dt)
        peaks.append(peak)
    return _summary(times, peaks)


def bench_size(n: int, repeats: int, export_limit: int, workdir: Path, stages: set[str] | None = None) -> dict:
    torch.manual_seed(n)
    x = torch.randn(1, C, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    chain = _randomise_bn(_scale_init(ConvBNReLUChain(n)), n)
    cc = _scale_init(ConvConvChain(n)).eval()
    torch.manual_seed(n + 1)
    expanded = fxexpand.compile(chain, passes=[LinearExpand(mode="CL")]).eval()
    _randomise_bn(expanded, n + 2)
    contracted = fxexpand.contract(expanded, (x,), verify=False)
    res: dict[str, Any] = {"n": n, "graph_nodes": {
        "conv_bn_relu": len(torch.fx.symbolic_trace(chain).graph.nodes),
        "conv_bn_relu_expanded_inlined": len(fxexpand.trace(expanded, inline_regions=True).graph.nodes),
        "conv_conv": len(torch.fx.symbolic_trace(cc).graph.nodes)}, "stages": {}}

    from torch.fx.experimental.optimization import fuse

    plan: dict[str, Callable] = {
        "trace": lambda: fxexpand.trace(chain),
        "fx_trace_fuse": lambda: fuse(torch.fx.symbolic_trace(chain)),
        "expand": lambda: fxexpand.compile(chain, passes=[LinearExpand(mode="CL")]),
        "passes": None,
        "contract_noverify": lambda: fxexpand.contract(expanded, (x,), verify=False),
        "contract_verify": lambda: fxexpand.contract(expanded, (x,), verify=True),
        "deploy_bn_fold_noverify": lambda: fxexpand.contract(chain, (x,), target="deploy", verify=False),
        "deploy_conv_conv_noverify": lambda: fxexpand.contract(cc, (x,), target="deploy", verify=False),
        "deploy_conv_conv_verify": lambda: fxexpand.contract(cc, (x,), target="deploy", verify=True),
    }
    if n <= export_limit:
        plan["export"] = lambda: fxexpand.export_onnx(contracted, (x,), workdir / f"chain_{n}.onnx")
    for name, fn in plan.items():
        if stages is not None and name not in stages:
            continue
        if name == "passes":
            try:
                per: dict[str, list[float]] = {}
                for _ in range(repeats):
                    for k, v in time_passes(expanded, x).items():
                        per.setdefault(k, []).append(v)
                for k, v in per.items():
                    res["stages"][k] = _summary(v, [])
                log(f"  scaling n={n:>6} passes: " + ", ".join(f"{k[5:]} {np.median(v):.3f} s" for k, v in per.items()))
            except Exception as e:
                res["stages"]["passes"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  [red]scaling n={n} passes failed: {e}[/]")
            continue
        try:
            r = run_stage(fn, repeats)
            res["stages"][name] = r
            log(f"  scaling n={n:>6} {name:<28} median {r['median_s']:8.3f} s  "
                f"(p10-p90 {r['p10_s']:.3f}-{r['p90_s']:.3f}, {repeats}x), peak RSS +{r['peak_rss_growth_mib']:.0f} MiB")
        except Exception as e:  # record and continue: one stage failing must not hide the others
            res["stages"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  [red]scaling n={n} {name} failed: {e}[/]")
    if n > export_limit:
        res["stages"]["export"] = {"skipped": f"n={n} > export limit {export_limit} (see docs)"}
    for name in STAGES:
        if stages is not None and name not in stages and name != "passes":
            res["stages"].setdefault(name, {"skipped": "left out at this size to bound the suite's run time"})
    return res


def fit_slopes(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Least-squares slope of log(median time) vs log(n) per stage, overall and between neighbours."""
    stages = sorted({s for r in rows for s, v in r["stages"].items() if "median_s" in v})
    out = {}
    for s in stages:
        pts = [(r["n"], r["stages"][s]["median_s"]) for r in rows if "median_s" in r["stages"].get(s, {})]
        if len(pts) < 2:
            continue
        ln = np.log([p[0] for p in pts])
        lt = np.log([max(p[1], 1e-9) for p in pts])
        slope = float(np.polyfit(ln, lt, 1)[0])
        pair = {f"{a[0]}->{b[0]}": float(math.log(b[1] / a[1]) / math.log(b[0] / a[0])) for a, b in zip(pts, pts[1:])}
        out[s] = {"slope": slope, "pairwise": pair}
    return out


def run(sizes: list[int], repeats: dict[int, int], export_limit: int, stages: set[str] | None = None) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxexpand_scaling_") as tmp:
        for n in sizes:
            rows.append(bench_size(n, repeats.get(n, 1), export_limit, Path(tmp), stages))
    return {"sizes": sizes, "repeats": {str(k): v for k, v in repeats.items()}, "export_limit": export_limit,
            "channels": C, "input": [1, C, SIDE, SIDE], "rows": rows, "slopes": fit_slopes(rows)}


def rows_from_log(text: str) -> list[dict]:
    """Scaling rows rebuilt from a scaling process's console log (its per-stage lines carry the median,
    p10-p90, repeat count and peak RSS); used when a run is cut short before it writes its JSON."""
    import re

    rows: dict[int, dict] = {}
    for line in text.splitlines():
        m = re.search(r"scaling n= *(\d+) (\S+) +median +([\d.]+) s +\(p10-p90 ([\d.]+)-([\d.]+), (\d+)x\), peak RSS \+(\d+) MiB", line)
        if m:
            n = int(m[1])
            rows.setdefault(n, {"n": n, "graph_nodes": {}, "stages": {}, "from_log": True})["stages"][m[2]] = {
                "median_s": float(m[3]), "p10_s": float(m[4]), "p90_s": float(m[5]), "repeats": int(m[6]),
                "peak_rss_growth_mib": float(m[7])}
            continue
        m = re.search(r"scaling n= *(\d+) passes: (.*)", line)
        if m:
            n = int(m[1])
            row = rows.setdefault(n, {"n": n, "graph_nodes": {}, "stages": {}, "from_log": True})
            for name, t in re.findall(r"(\w+Pass) ([\d.]+) s", m[2]):
                row["stages"][f"pass:{name}"] = {"median_s": float(t), "p10_s": float(t), "p90_s": float(t),
                                                 "repeats": None, "peak_rss_growth_mib": float("nan")}
    return [rows[n] for n in sorted(rows)]
