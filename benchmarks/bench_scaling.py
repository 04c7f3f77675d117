"""Compiler cost and how it grows with graph size (suite section ``scaling``).

Two synthetic chains of ``n`` blocks on a 1x4x8x8 input (tiny tensors, so the graph work dominates):

* ``conv_bn_relu``: ``n`` x [Conv2d(4, 4, 3, padding=1, bias=False) -> BatchNorm2d -> ReLU];
  expanded with ExpandNets CL (every conv becomes 1x1 -> 3x3 -> 1x1 inside an ExpandedRegion) and
  contracted back (target "original"); target "deploy" folds every BatchNorm of the original chain.
* ``conv_conv``: ``n`` x [Conv2d(4, 4, 3, padding=1) -> Conv2d(4, 4, 1) -> ReLU]; target "deploy"
  fuses every conv∘conv pair (it saves MACs), FuseLinear's sequential rule ``n`` times.

Stages (each timed on its own, wall time and peak-RSS growth): ``trace`` (fxexpand.trace),
``fx_trace_fuse`` (torch.fx.symbolic_trace + torch.fx.experimental.optimization.fuse, the baseline),
``expand`` (fxexpand.compile with LinearExpand CL), the contraction passes one by one on a traced and
shape-propagated expanded graph (``pass:RemoveIdentity``, ``pass:FoldBatchNorm``,
``pass:FuseLinear``, ``pass:RestoreOriginal``), ``contract`` with and without verification
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
from _common import log, peak_rss_growth
from torch import nn

import fxexpand
from fxexpand.passes import LinearExpand
from fxexpand.testing import randomize_bn

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
PASS_NAMES = ["RemoveIdentity", "FoldBatchNorm", "FuseLinear", "RestoreOriginal"]


def time_passes(expanded: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each contraction pass, run in sequence (one round, as contract's first fixed-point
    round) on a traced, shape-propagated copy of the expanded chain (tracing is not timed here)."""
    from fxexpand.core import propagate_shapes
    from fxexpand.passes import (
        FoldBatchNorm,
        FuseLinear,
        RemoveIdentity,
        RestoreOriginal,
    )

    gm = fxexpand.trace(copy.deepcopy(expanded).eval(), inline_regions=True)
    propagate_shapes(gm, (x,))
    out = {}
    for p in (RemoveIdentity(scope="expanded"), FoldBatchNorm(scope="expanded"),
              FuseLinear(scope="expanded"), RestoreOriginal()):
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
    return run_adaptive(fn, repeats, math.inf)


def bench_size(n: int, repeats: int, export_limit: int, workdir: Path, stages: set[str] | None = None) -> dict:
    torch.manual_seed(n)
    x = torch.randn(1, C, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    chain = randomize_bn(_scale_init(ConvBNReLUChain(n)), n).eval()
    cc = _scale_init(ConvConvChain(n)).eval()
    torch.manual_seed(n + 1)
    expanded = fxexpand.compile(chain, passes=[LinearExpand(mode="CL")]).eval()
    randomize_bn(expanded, n + 2).eval()
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
                per = _repeated_passes(lambda: time_passes(expanded, x), repeats, math.inf)
                res["stages"].update(per)
                log(f"  scaling n={n:>6} passes: " + ", ".join(f"{k[5:]} {v['median_s']:.3f} s" for k, v in per.items()))
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


# --------------------------------------------------------------------------------------------------
# the same stages on the inference section's models (torchvision + SmallNet, each recipe)

def run_adaptive(fn: Callable[[], Any], max_repeats: int, budget_s: float) -> dict[str, Any]:
    """Repeat ``fn`` (peak RSS measured each time) until ``max_repeats`` runs or ``budget_s`` seconds
    have been spent; at least once. Median, p10-p90 and the largest peak-RSS growth."""
    times, peaks = [], []
    while True:
        gc.collect()
        dt, peak = peak_rss_growth(fn)
        times.append(dt)
        peaks.append(peak)
        if len(times) >= max_repeats or sum(times) + float(np.median(times)) > budget_s:
            break
    return _summary(times, peaks)


def _pass_label(p: Any, seen: dict[str, int]) -> str:
    label = p.name + (f"({p.mode})" if isinstance(getattr(p, "mode", None), str) else "")
    seen[label] = seen.get(label, 0) + 1
    return label if seen[label] == 1 else f"{label}#{seen[label]}"


def time_expansion_passes(model: nn.Module, passes: list) -> dict[str, float]:
    """Seconds of each expansion pass of a recipe, run in order on a traced copy of ``model`` as
    fxexpand.compile runs them (pass, lint, recompile; tracing is not timed here)."""
    gm = fxexpand.trace(copy.deepcopy(model))
    out, seen = {}, {}
    for p in passes:
        t0 = time.perf_counter()
        r = p(gm)
        gm = r.graph_module
        if r.modified:
            gm.graph.lint()
            gm.recompile()
        out[f"expand_pass:{_pass_label(p, seen)}"] = time.perf_counter() - t0
    return out


# set by _model_cost_main: the result dict and the JSON path it is written to after every stage
_CHECKPOINT: dict[str, Any] = {}


def _checkpoint(running: tuple[dict, str] | None) -> None:
    """Write the model's results so far when running as a child process; with ``running`` = (stage
    dict, key), that stage is written as failed, so the file says which stage a killed process was in."""
    if not _CHECKPOINT:
        return
    import json

    root = _CHECKPOINT["result"]
    if running is not None:
        running[0][running[1]] = {"error": "the process ended during this stage (out of memory?)"}
    _CHECKPOINT["path"].write_text(json.dumps(root, default=float))
    if running is not None:
        del running[0][running[1]]


def _record(res: dict, key: str, fn: Callable[[], Any], label: str, max_repeats: int, budget_s: float) -> None:
    _checkpoint((res, key))
    try:
        r = run_adaptive(fn, max_repeats, budget_s)
        res[key] = r
        log(f"  compile cost {label:<34} {key:<28} median {r['median_s']:8.3f} s  (p10-p90 {r['p10_s']:.3f}-"
            f"{r['p90_s']:.3f}, {r['repeats']}x), peak RSS +{r['peak_rss_growth_mib']:.0f} MiB")
    except Exception as e:  # one stage failing must not hide the others
        res[key] = {"error": f"{type(e).__name__}: {e}"}
        log(f"  [red]compile cost {label} {key} failed: {type(e).__name__}: {e}[/]")
    _checkpoint(None)


def _repeated_passes(fn: Callable[[], dict[str, float]], max_repeats: int, budget_s: float) -> dict[str, Any]:
    """Call ``fn`` (seconds per pass) up to ``max_repeats`` times, stopping when one more round would
    pass ``budget_s``; the summary of each pass's times (peak memory is not measured per pass)."""
    per: dict[str, list[float]] = {}
    spent = 0.0
    for done in range(1, max_repeats + 1):
        t0 = time.perf_counter()
        for k, v in fn().items():
            per.setdefault(k, []).append(v)
        spent += time.perf_counter() - t0
        if spent + spent / done > budget_s:
            break
    return {k: _summary(v, []) for k, v in per.items()}


def bench_model(name: str, recipes: list[str], workdir: Path, *, seed: int = 0, max_repeats: int = 5,
                budget_s: float = 10.0) -> dict[str, Any]:
    """Wall time and peak RSS growth of every compiler stage on one model of the inference section:
    tracing, the fx baseline (symbolic_trace + fuse) and fxexpand's own BatchNorm folding of the
    original (contract target "deploy": the same job as fuse), then per recipe: expand (compile),
    each expansion pass, each contraction pass, contract with and without verification, deploy, and
    ONNX export (with its onnxruntime check) of the contracted model."""
    from bench_inference import MODELS, RECIPES, at_alpha1
    from torch.fx.experimental.optimization import fuse

    build, side = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_bn(build(), seed).eval()
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed + 1))
    res: dict[str, Any] = {"model": name, "input_shape": list(x.shape), "params": fxexpand.count_parameters(model),
                           "graph_nodes": len(fxexpand.trace(model).graph.nodes), "stages": {}, "recipes": {}}
    try:
        res["fx_graph_nodes"] = len(torch.fx.symbolic_trace(model).graph.nodes)
    except Exception as e:
        res["fx_graph_nodes"] = None
        res["fx_trace_error"] = f"{type(e).__name__}: {e}"
    if _CHECKPOINT:
        _CHECKPOINT["result"] = res
    st = res["stages"]
    _record(st, "trace", lambda: fxexpand.trace(model), name, max_repeats, budget_s)
    _record(st, "fx_trace_fuse", lambda: fuse(torch.fx.symbolic_trace(model)), name, max_repeats, budget_s)
    _record(st, "deploy_original_noverify", lambda: fxexpand.contract(model, (x,), target="deploy", verify=False),
            name, max_repeats, budget_s)
    for recipe in recipes:
        label = f"{name}/{recipe}"
        rr: dict[str, Any] = {"stages": {}}
        res["recipes"][recipe] = rr
        try:
            torch.manual_seed(seed + 7)
            expanded = at_alpha1(fxexpand.compile(model, passes=RECIPES[recipe]()), seed)
            rr["expanded_nodes_inlined"] = len(fxexpand.trace(expanded, inline_regions=True).graph.nodes)
            rr["expanded_params"] = fxexpand.count_parameters(expanded)
            contracted = fxexpand.contract(expanded, (x,), verify=False)
        except Exception as e:
            rr["error"] = f"{type(e).__name__}: {e}"
            log(f"  [red]compile cost {label} failed: {rr['error']}[/]")
            continue
        s = rr["stages"]
        _record(s, "expand", lambda: fxexpand.compile(model, passes=RECIPES[recipe]()), label, max_repeats, budget_s)
        _checkpoint((s, "passes"))
        try:
            s.update(_repeated_passes(lambda: time_expansion_passes(model, RECIPES[recipe]()), max_repeats, budget_s))
            s.update(_repeated_passes(lambda: time_passes(expanded, x), max_repeats, budget_s))
            log(f"  compile cost {label:<34} passes: " + ", ".join(
                f"{k.split(':', 1)[1]} {v['median_s']:.3f} s" for k, v in s.items() if ":" in k))
        except Exception as e:
            s["passes"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  [red]compile cost {label} passes failed: {s['passes']['error']}[/]")
        _record(s, "contract_noverify", lambda: fxexpand.contract(expanded, (x,), verify=False), label, max_repeats, budget_s)
        _record(s, "contract_verify", lambda: fxexpand.contract(expanded, (x,), verify=True), label, max_repeats, budget_s)
        _record(s, "deploy_noverify", lambda: fxexpand.contract(expanded, (x,), target="deploy", verify=False), label,
                max_repeats, budget_s)
        path = workdir / f"cost_{name}_{recipe}.onnx"
        _record(s, "export", lambda: fxexpand.export_onnx(contracted, (x,), path), label, max_repeats, budget_s)
        path.unlink(missing_ok=True)
        del expanded, contracted
        gc.collect()
    return res


def run_models(models: list[str], recipes: list[str], *, seed: int = 0, max_repeats: int = 5, budget_s: float = 10.0,
               progress: Callable[[], None] | None = None) -> list[dict]:
    """:func:`bench_model` for each model, each in a fresh child process (its own peak RSS, no heap
    left over from the previous model, and a model that exhausts memory, e.g. contract(verify=True)
    of resnet50-CL's 621 M parameters in float32 + float64, is recorded as failed instead of ending
    the suite)."""
    import json
    import subprocess
    import sys

    out = []
    with tempfile.TemporaryDirectory(prefix="fxexpand_cost_") as tmp:
        for name in models:
            dst = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--model-cost", name, "--recipes", ",".join(recipes), "--seed", str(seed),
                   "--max-repeats", str(max_repeats), "--budget", str(budget_s),
                   "--torch-threads", str(torch.get_num_threads()), "--json", str(dst)]
            rc = subprocess.run(cmd).returncode
            if dst.exists():  # complete, or what was measured before the process ended
                out.append(json.loads(dst.read_text()))
                if rc != 0:
                    out[-1]["process_exit"] = rc
                    log(f"  [red]compile cost {name}: the measuring process ended with {rc}; stages measured "
                        "before that are kept[/]")
            else:
                why = ("killed by signal %d (out of memory?)" % -rc) if rc < 0 else f"exit code {rc}"
                out.append({"model": name, "error": f"the measuring process for {name} failed: {why}"})
                log(f"  [red]compile cost {name} failed: {why}[/]")
            if progress is not None:
                progress()
    return out


def _model_cost_main(argv: list[str] | None = None) -> int:
    """``python bench_scaling.py --model-cost NAME ...``: one model's compiler costs into a JSON file
    (what run_models runs in a child process). Each stage's result is written as soon as it is known,
    so a stage that runs the process out of memory leaves the others behind."""
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-cost", required=True)
    ap.add_argument("--recipes", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    torch.set_flush_denormal(True)
    _CHECKPOINT["path"] = a.json
    with tempfile.TemporaryDirectory(prefix="fxexpand_cost_") as tmp:
        res = bench_model(a.model_cost, a.recipes.split(","), Path(tmp), seed=a.seed, max_repeats=a.max_repeats,
                          budget_s=a.budget)
    a.json.write_text(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_model_cost_main())
