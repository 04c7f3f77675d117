#!/usr/bin/env python
"""Benchmark what expansion costs in training and what contraction gives back at inference.

Two cases, each an original model and its expanded twin made by an fxexpand recipe:

* ``mobilenet_v2``: torchvision ``mobilenet_v2(width_mult=0.35, weights=None)``, 144x144 input, 1000
  classes, ``fxexpand.recipes.netbooster()`` (inverted residual blocks x6 with decaying activations);
* ``smallnet``: :class:`fxexpand.models.SmallNet` (ExpandNets' CIFAR net), 32x32 input, 10 classes,
  ``fxexpand.recipes.expandnets("CK")`` (7x7 convs as chains of 3x3 convs, plus FC expansion).

For each case it measures, in one run:

1. **Training step time**: forward + cross-entropy + backward + SGD step (momentum 0.9) on a batch of
   32 random images and labels, train mode, for the original and the expanded model (NetBooster's at
   alpha = 0, the start of training; the step costs the same at any alpha). For NetBooster it also
   times a diagnostic third variant, the expanded architecture with each ``DecayActivation`` replaced
   by the plain activation it wraps, which separates the cost of the bigger architecture from the
   cost of the decaying activation's implementation. The variants are stepped alternately (one step
   of each, order rotated every round) after untimed warm-up rounds; medians and expanded/original
   ratios are reported. torch runs with ``--torch-threads`` intra-op threads (default 1).
   Peak memory: each variant runs 3 training steps in a fresh subprocess, which reports its peak RSS
   (the kernel's high-water mark VmHWM, reset just before the first step) and the growth of that
   peak over the RSS just before the first step (activations saved for backward, gradients,
   momentum buffers, allocator slack).
2. **onnxruntime latency** at batch 1 (``fxexpand.compare_onnx``: the files are run alternately) of
   the original model, the expanded model at alpha = 1 exported as it is, the expanded model
   contracted to the original architecture (``contract(target="original")``) and contracted for
   deployment (``contract(target="deploy")``), at each ``--threads`` count, with ratios to the
   original. Before exporting, the expanded model has been trained by the timing steps (random data),
   so its BatchNorm statistics and weights are not at their initial values.
3. **Size and cost**: parameters and FLOPs (``fxexpand.count_parameters`` / ``count_flops``, batch 1)
   of the four models, ONNX node counts, the contraction reports and fxexpand's own wall times.

Results: rich tables on the console, ``<out-dir>/expansion_bench.json`` (machine description,
versions, thread counts, date, git commit, every timed step) and ``<out-dir>/expansion_bench.md``.

Usage::

    python benchmarks/expansion_bench.py                  # full default run (~4-5 minutes on 2 cores)
    python benchmarks/expansion_bench.py --quick          # smoke test (~1 minute)
    python benchmarks/expansion_bench.py --cases smallnet --steps 500 --runs 2000 --threads 1 2 4
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from rich.console import Console
from rich.table import Table

import fxexpand
from _common import loadavg, machine_info, machine_line, onnx_summary  # noqa: E402 (benchmarks/ is on sys.path)
from fxexpand.models import SmallNet

BATCH = 32
NETBOOSTER_PAPER_OVERHEAD = 0.325  # +32.5% training time per iteration, as the NetBooster paper reports it

console = Console(highlight=False)
if not console.is_terminal:  # logs and pipes: wide enough for the tables
    console = Console(highlight=False, width=200)


# --------------------------------------------------------------------------------------------------
# cases


def _mobilenet() -> torch.nn.Module:
    return torchvision.models.mobilenet_v2(width_mult=0.35, weights=None)


CASES: dict[str, dict[str, Any]] = {
    "mobilenet_v2": {
        "label": "mobilenet_v2 x0.35 / NetBooster",
        "model": "torchvision mobilenet_v2(width_mult=0.35, weights=None)",
        "build": _mobilenet,
        "input": (3, 144, 144),
        "classes": 1000,
        "recipe": "fxexpand.recipes.netbooster()",
        "passes": lambda: fxexpand.recipes.netbooster(),
        "decay": True,
        "steps": 30, "warmup_steps": 2,        # ~4 s per round of the three variants on one thread
        "quick_steps": 2, "quick_warmup_steps": 1,
    },
    "smallnet": {
        "label": "SmallNet / ExpandNets CK",
        "model": "fxexpand.models.SmallNet()",
        "build": lambda: SmallNet(),
        "input": (3, 32, 32),
        "classes": 10,
        "recipe": 'fxexpand.recipes.expandnets("CK")',
        "passes": lambda: fxexpand.recipes.expandnets("CK"),
        "decay": False,
        "steps": 300, "warmup_steps": 10,      # ~0.07 s per round
        "quick_steps": 10, "quick_warmup_steps": 2,
    },
}

VARIANT_LABELS = {
    "original": "original",
    "expanded": "expanded",
    "expanded_plain_act": "expanded, plain activations (diagnostic)",
}


def build_variants(case: dict[str, Any], seed: int, wall: dict[str, float] | None = None) -> dict[str, torch.nn.Module]:
    """The original model, its expanded twin and (for recipes with decaying activations) the
    expanded twin with every DecayActivation replaced by the activation it wraps. Deterministic in
    ``seed`` (the memory subprocesses rebuild the same models)."""
    torch.manual_seed(seed)
    original = case["build"]()
    torch.manual_seed(seed + 1)  # the expansion's new layers draw from the global generator
    t0 = time.perf_counter()
    expanded = fxexpand.compile(original, passes=case["passes"]())
    if wall is not None:
        wall["compile"] = time.perf_counter() - t0
    out = {"original": original, "expanded": expanded}
    if case["decay"]:
        out["expanded_plain_act"] = plain_activations(expanded)
    return out


def plain_activations(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every DecayActivation replaced by the activation it wraps."""
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, fxexpand.DecayActivation):
            parent_name, _, child = name.rpartition(".")
            parent = m.get_submodule(parent_name) if parent_name else m
            setattr(parent, child, copy.deepcopy(mod.activation))
    return m


# --------------------------------------------------------------------------------------------------
# machine description


# --------------------------------------------------------------------------------------------------
# measurement


def make_trainer(model: torch.nn.Module, case: dict[str, Any], seed: int) -> Callable[[], float]:
    """A closure doing one training step (batch 32, fixed random data); returns the loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *case["input"], generator=g)
    y = torch.randint(0, case["classes"], (BATCH,), generator=g)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def time_steps_alternately(steps: dict[str, Callable[[], float]], n: int, warmup: int,
                           label: str) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each variant: ``warmup`` untimed rounds, then ``n`` timed rounds of one
    step of each variant, the order rotated every round."""
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    last_loss: dict[str, float] = {}
    gc.collect()
    t_log = time.perf_counter()
    for r in range(warmup + n):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            last_loss[k] = steps[k]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
        if r >= warmup and (time.perf_counter() - t_log > 10 or r == warmup + n - 1):
            t_log = time.perf_counter()
            console.log(f"  {label} training round {r - warmup + 1}/{n}: "
                        + ", ".join(f"{k} median {statistics.median(times[k]) * 1e3:.1f} ms" for k in names))
    return times, last_loss


def step_stats(t: list[float]) -> dict[str, Any]:
    a = np.asarray(t) * 1e3
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()), "mean_ms": float(a.mean()),
            "steps": len(a), "all_ms": [round(float(v), 3) for v in a]}


def measure_memory(case_name: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of 3 training steps of one variant, in a fresh subprocess (see ``_memory_child``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", case_name, variant,
           "--seed", str(args.seed), "--torch-threads", str(args.torch_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {case_name}/{variant} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_mib(*keys: str) -> dict[str, float]:
    """VmRSS / VmHWM (the kernel's resident-set high-water mark) of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) / 1024  # kB
    return out


def _memory_child(case_name: str, variant: str, seed: int, torch_threads: int) -> int:
    """Print the peak RSS of 3 training steps of one variant as JSON (the last line of stdout).

    The peak is the kernel's per-process high-water mark VmHWM, reset to the current RSS just before
    the first step (``echo 5 > /proc/self/clear_refs``). ``getrusage().ru_maxrss`` is useless here:
    after fork+exec it keeps the parent's peak (several GB once the parent has trained the models)."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    torch.set_flush_denormal(True)
    case = CASES[case_name]
    model = build_variants(case, seed)[variant]
    step = make_trainer(model, case, seed + 10)
    gc.collect()
    before = _proc_status_mib("VmRSS", "VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(3):
        step()
    after = _proc_status_mib("VmRSS", "VmHWM")
    print(json.dumps({"rss_before_mib": before["VmRSS"], "peak_mib": after["VmHWM"],
                      "training_peak_growth_mib": after["VmHWM"] - before["VmRSS"],
                      "hwm_reset": reset, "hwm_before_mib": before["VmHWM"], "steps": 3,
                      "method": "VmHWM after 3 steps (reset via /proc/self/clear_refs) minus VmRSS before"}))
    return 0


def report_dict(gm: torch.nn.Module, wall: float) -> dict[str, Any]:
    rep = gm.fxexpand_report
    d = {"summary": rep.summary(), "wall_s": wall,
         **{k: rep._count(k) for k in ("folded", "fused", "removed", "skipped")},
         "skipped_reasons": [str(n) for n in rep.skipped]}
    if rep.verification is not None:
        d["verification"] = [dict(vars(o)) for o in rep.verification.outputs]
        d["max_rel_error"] = {o.precision: o.max_rel for o in rep.verification.outputs}
    return d


def bench_case(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    case = CASES[name]
    t_case = time.perf_counter()
    console.rule(f"[bold]{case['label']}")
    res: dict[str, Any] = {"case": name, "label": case["label"], "model": case["model"], "recipe": case["recipe"],
                           "input_shape": [1, *case["input"]], "train_batch": BATCH, "classes": case["classes"]}
    res["fxexpand_wall_s"] = {}
    models = build_variants(case, args.seed, res["fxexpand_wall_s"])
    original, expanded = models["original"], models["expanded"]
    notes = getattr(expanded, "fxexpand_notes", [])
    res["expanded_layers"] = [n.where for n in notes if n.action == "expanded"]
    console.log(f"[cyan]{name}[/]: {case['recipe']} expanded {len(res['expanded_layers'])} layers: "
                + ", ".join(res["expanded_layers"]))

    # -- 1. training step time ---------------------------------------------------------------------
    n_steps = args.steps if args.steps is not None else case["quick_steps" if args.quick else "steps"]
    n_warm = (args.warmup_steps if args.warmup_steps is not None
              else case["quick_warmup_steps" if args.quick else "warmup_steps"])
    console.log(f"[cyan]{name}[/]: training steps, batch {BATCH}, {n_warm} warm-up + {n_steps} timed rounds, "
                f"variants alternating ({', '.join(models)}), torch threads {torch.get_num_threads()}")
    trainers = {k: make_trainer(m, case, args.seed + 10) for k, m in models.items()}
    times, losses = time_steps_alternately(trainers, n_steps, n_warm, name)
    tr = {k: step_stats(v) for k, v in times.items()}
    base = tr["original"]["median_ms"]
    res["training"] = {
        "batch": BATCH, "steps": n_steps, "warmup_steps": n_warm, "torch_num_threads": torch.get_num_threads(),
        "optimizer": "SGD(lr=0.01, momentum=0.9)", "loss": "cross_entropy, random labels",
        "alpha": 0.0 if case["decay"] else None,
        "variants": tr,
        "ratio_median": {k: v["median_ms"] / base for k, v in tr.items()},
        "ratio_p90": {k: v["p90_ms"] / tr["original"]["p90_ms"] for k, v in tr.items()},
        "last_loss": losses,
    }
    console.log("  median step: " + ", ".join(f"{k} {v['median_ms']:.1f} ms (x{v['median_ms'] / base:.2f})"
                                                for k, v in tr.items()))

    if not args.no_memory:
        console.log(f"[cyan]{name}[/]: peak memory of 3 training steps, one subprocess per variant")
        mem = {}
        for k in models:
            try:
                mem[k] = measure_memory(name, k, args)
                console.log(f"  {k}: peak RSS {mem[k]['peak_mib']:.0f} MiB, "
                            f"training growth {mem[k]['training_peak_growth_mib']:.0f} MiB")
            except Exception as e:  # memory is a side measurement; record the failure and go on
                mem[k] = {"error": f"{type(e).__name__}: {e}"}
                console.print(f"[red]{name}/{k}: {mem[k]['error']}[/]")
        res["memory"] = mem

    # -- contraction -------------------------------------------------------------------------------
    del trainers
    models.pop("expanded_plain_act", None)
    gc.collect()
    x = torch.randn(1, *case["input"], generator=torch.Generator().manual_seed(args.seed + 2))
    inputs = (x,)
    original.eval()
    expanded.eval()
    if case["decay"]:
        fxexpand.set_decay(expanded, 1.0)  # the end of NetBooster's progressive linearisation
    console.log(f"[cyan]{name}[/]: contracting (target original, then deploy; verify=True)")
    t0 = time.perf_counter()
    contracted = fxexpand.contract(expanded, inputs)
    t1 = time.perf_counter()
    deploy = fxexpand.contract(expanded, inputs, target="deploy")
    t2 = time.perf_counter()
    res["contract"] = {"original": report_dict(contracted, t1 - t0), "deploy": report_dict(deploy, t2 - t1)}
    res["fxexpand_wall_s"].update({"contract_original": t1 - t0, "contract_deploy": t2 - t1})
    sd_o = {k: tuple(v.shape) for k, v in original.state_dict().items()}
    sd_c = {k: tuple(v.shape) for k, v in contracted.state_dict().items()}
    res["contracted_state_dict_matches_original"] = sd_o == sd_c
    console.log(f"  original: {contracted.fxexpand_report.summary()}")
    console.log(f"  deploy:   {deploy.fxexpand_report.summary()}")
    console.log(f"  contracted state_dict keys and shapes equal the original's: {sd_o == sd_c}")

    four = {"original": original, "expanded": expanded, "contracted": contracted, "deploy": deploy}

    # -- 3. size and cost --------------------------------------------------------------------------
    res["params"] = {k: fxexpand.count_parameters(m) for k, m in four.items()}
    res["flops"] = {k: fxexpand.count_flops(m, inputs) for k, m in four.items()}

    # -- 2. onnxruntime latency --------------------------------------------------------------------
    console.log(f"[cyan]{name}[/]: exporting ONNX (4 models, each checked against torch)")
    paths = {k: workdir / f"{name}_{k}.onnx" for k in four}
    t0 = time.perf_counter()
    for k, m in four.items():
        fxexpand.export_onnx(m, inputs, paths[k])
    res["fxexpand_wall_s"]["export_onnx_4_models"] = time.perf_counter() - t0
    res["onnx"] = {k: onnx_summary(p) for k, p in paths.items()}
    res["latency"] = []
    for th in args.threads:
        console.log(f"[cyan]{name}[/]: onnxruntime latency, batch 1, {th} thread(s), {args.warmup} warm-up + "
                    f"{args.runs} runs each, 4 files alternating")
        stats = fxexpand.compare_onnx([paths[k] for k in four], threads=th, runs=args.runs, warmup=args.warmup)
        st = dict(zip(four, (s.as_dict() for s in stats)))
        o = st["original"]
        row = {"threads": th, **st,
               "ratio_median": {k: v["median_ms"] / o["median_ms"] for k, v in st.items()},
               "ratio_p90": {k: v["p90_ms"] / o["p90_ms"] for k, v in st.items()},
               "ratio_min": {k: v["min_ms"] / o["min_ms"] for k, v in st.items()}}
        res["latency"].append(row)
        console.log("  median " + ", ".join(f"{k} {v['median_ms']:.3f} ms (x{row['ratio_median'][k]:.3f})"
                                            for k, v in st.items()))
    res["case_wall_s"] = time.perf_counter() - t_case
    res["loadavg_end"] = loadavg()
    return res


# --------------------------------------------------------------------------------------------------
# reporting


def _m(x: float) -> str:
    return f"{x / 1e6:.3f} M" if x < 1e7 else f"{x / 1e6:.2f} M"


def _g(x: float) -> str:
    return f"{x / 1e6:.1f} M"


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def table_rows(doc: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    ok = [r for r in doc["results"] if "error" not in r]
    tr_head = ["Case", "Variant", "Median step (ms)", "p10-p90 (ms)", "Ratio median", "Ratio p90",
               "FLOPs ratio", "Paper (NetBooster)"]
    tr = []
    for r in ok:
        t = r["training"]
        for k, v in t["variants"].items():
            flops = r["flops"]["expanded"] / r["flops"]["original"] if k != "original" else 1.0
            paper = ""
            if k == "expanded" and r["case"] == "mobilenet_v2":
                paper = f"x{1 + NETBOOSTER_PAPER_OVERHEAD:.3f} (+{NETBOOSTER_PAPER_OVERHEAD:.1%}, GPU, its own setting)"
            tr.append([r["label"], VARIANT_LABELS[k], _ms(v["median_ms"]), f"{_ms(v['p10_ms'])}-{_ms(v['p90_ms'])}",
                       f"{t['ratio_median'][k]:.2f}", f"{t['ratio_p90'][k]:.2f}", f"{flops:.2f}", paper])
    mem_head = ["Case", "Variant", "Peak RSS (MiB)", "Training peak growth (MiB)", "Growth ratio"]
    mem = []
    for r in ok:
        m = r.get("memory") or {}
        base = m.get("original", {}).get("training_peak_growth_mib")
        for k, v in m.items():
            if "error" in v:
                mem.append([r["label"], VARIANT_LABELS[k], "error", v["error"][:60], ""])
                continue
            g = v["training_peak_growth_mib"]
            mem.append([r["label"], VARIANT_LABELS[k], f"{v['peak_mib']:.0f}", f"{g:.0f}",
                        f"{g / base:.2f}" if base else ""])
    lat_head = ["Case", "Threads", "Original (ms)", "Expanded a=1 (ms)", "Contracted (ms)", "Deploy (ms)",
                "Ratio expanded", "Ratio contracted", "Ratio deploy", "Ratio p90 exp/contr/deploy",
                "Ratio min exp/contr/deploy"]
    lat = []
    for r in ok:
        for l in r["latency"]:
            rm, rp, rn = l["ratio_median"], l["ratio_p90"], l["ratio_min"]
            lat.append([r["label"], str(l["threads"])] + [_ms(l[k]["median_ms"]) for k in
                                                          ("original", "expanded", "contracted", "deploy")]
                       + [f"{rm[k]:.3f}" for k in ("expanded", "contracted", "deploy")]
                       + [" / ".join(f"{rp[k]:.2f}" for k in ("expanded", "contracted", "deploy"))]
                       + [" / ".join(f"{rn[k]:.2f}" for k in ("expanded", "contracted", "deploy"))])
    sz_head = ["Case", "Params orig / exp / contr / deploy", "FLOPs orig / exp / contr / deploy",
               "ONNX nodes orig / exp / contr / deploy", "Contracted = original state_dict",
               "Contract original: fused / folded / removed", "Max rel err fp32 / fp64"]
    sz = []
    for r in ok:
        c = r["contract"]["original"]
        rel = c.get("max_rel_error", {})
        sz.append([r["label"],
                   " / ".join(_m(r["params"][k]) for k in ("original", "expanded", "contracted", "deploy")),
                   " / ".join(_g(r["flops"][k]) for k in ("original", "expanded", "contracted", "deploy")),
                   " / ".join(str(r["onnx"][k]["nodes"]) for k in ("original", "expanded", "contracted", "deploy")),
                   "yes" if r["contracted_state_dict_matches_original"] else "NO",
                   f"{c['fused']} / {c['folded']} / {c['removed']}",
                   " / ".join(f"{rel[p]:.1e}" for p in sorted(rel))])
    fx_head = ["Case", "compile (s)", "contract original, verify (s)", "contract deploy, verify (s)",
               "export_onnx x4 (s)"]
    fx = [[r["label"]] + [f"{r['fxexpand_wall_s'][k]:.2f}" for k in
                          ("compile", "contract_original", "contract_deploy", "export_onnx_4_models")] for r in ok]
    return {"training": (tr_head, tr), "memory": (mem_head, mem), "latency": (lat_head, lat),
            "size": (sz_head, sz), "fxexpand": (fx_head, fx)}


def titles(doc: dict[str, Any]) -> dict[str, str]:
    cfg = doc["config"]
    return {
        "training": (f"Training step (forward+backward+SGD, batch {BATCH}, train mode, torch threads "
                     f"{cfg['torch_threads']}; ratio = variant / original, measured alternately; FLOPs ratio = "
                     "forward FLOPs expanded / original)"),
        "memory": ("Peak memory of 3 training steps in a fresh process (VmHWM, reset before the first step; "
                   "growth = peak minus the RSS just before the first step; the peak includes the ~0.7 GiB the process "
                   "holds before training: torch, torchvision, fxexpand and the model)"),
        "latency": ("onnxruntime latency, batch 1, median (ratio = model / original; < 1 is faster; 4 files "
                    "measured alternately)"),
        "size": "Size and cost (batch 1; FLOPs from torch FlopCounterMode: conv/matmul only, 1 MAC = 2 FLOPs)",
        "fxexpand": "fxexpand's own wall time (one call each)",
    }


def print_tables(doc: dict[str, Any]) -> None:
    tt = titles(doc)
    for key, (head, rows) in table_rows(doc).items():
        if not rows:
            continue
        t = Table(title=tt[key], title_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i < 2 else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    for r in doc["results"]:
        if "error" in r:
            console.print(f"[red]{r['case']}: {r['error']}[/]")


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        "# fxexpand expansion benchmark",
        "",
        f"Machine: {machine_line(doc['machine'])}",
        "",
        f"Config: cases {', '.join(cfg['cases'])}; training batch {BATCH}, "
        + ", ".join(f"{c} {s['warmup']} warm-up + {s['steps']} timed rounds" for c, s in cfg["training_steps"].items())
        + f", variants alternating; onnxruntime batch 1, {cfg['warmup']} warm-up + {cfg['runs']} runs per file, "
        f"threads {' '.join(map(str, cfg['threads']))}"
        + ("; --quick" if cfg["quick"] else "") + f". Total wall time {doc['wall_s']:.0f} s.",
        "",
    ]
    tt = titles(doc)
    for key, (head, rows) in table_rows(doc).items():
        if not rows:
            continue
        lines += [f"**{tt[key]}**", "",
                  "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    lines += [f"The NetBooster paper's +{NETBOOSTER_PAPER_OVERHEAD:.1%} training time per iteration was measured on "
              "GPU in the paper's own setting; the rows here are CPU, batch 32, width 0.35 at 144x144.", ""]
    for r in doc["results"]:
        if "error" in r:
            lines += [f"**{r['case']} failed:** `{r['error']}`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--runs", type=int, default=None,
                   help="timed onnxruntime runs per file (default 500; 20 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed onnxruntime runs per file (default 30; 3 with --quick)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op thread counts")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training rounds per case (default: mobilenet_v2 30, smallnet 300; 2 / 10 with --quick)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed training rounds first (default: mobilenet_v2 2, smallnet 10)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for the training timing and everything else torch does here "
                        "(default 1: 2-thread timings on a small shared machine are very noisy; 0 keeps torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true", help="few steps and runs, for smoke testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--_memory-child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.runs = a.runs if a.runs is not None else (20 if a.quick else 500)
    a.warmup = a.warmup if a.warmup is not None else (3 if a.quick else 30)
    if min(a.runs, *a.threads) < 1 or a.warmup < 0 or a.torch_threads < 0:
        p.error("--runs and --threads must be >= 1; --warmup and --torch-threads >= 0")
    if (a.steps is not None and a.steps < 1) or (a.warmup_steps is not None and a.warmup_steps < 0):
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memory_child:
        return _memory_child(*args._memory_child, seed=args.seed, torch_threads=args.torch_threads)
    t_start = time.perf_counter()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    flush = bool(torch.set_flush_denormal(True))
    machine = machine_info(numpy=np.__version__, torch_flush_denormal=flush)
    console.print(f"[bold]fxexpand expansion benchmark[/]  {machine_line(machine)}")
    load = machine["loadavg_start"]
    if load is not None and load[0] > 0.5 * (os.cpu_count() or 1):
        console.print(f"[yellow]warning: 1-minute load average is {load[0]:.2f} on {os.cpu_count()} CPUs; "
                      "other processes will skew the timings[/]")
    results = []
    with tempfile.TemporaryDirectory(prefix="fxexpand_expansion_bench_") as tmp:
        for name in args.cases:
            try:
                results.append(bench_case(name, args, Path(tmp)))
            except Exception as e:  # keep going with the other case; the error is recorded
                console.print_exception()
                results.append({"case": name, "label": CASES[name]["label"], "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()})
    machine["loadavg_end"] = loadavg()
    doc = {
        "machine": machine,
        "config": {
            "cases": args.cases, "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
            "training_steps": {
                c: {"steps": args.steps if args.steps is not None else CASES[c]["quick_steps" if args.quick else "steps"],
                    "warmup": (args.warmup_steps if args.warmup_steps is not None
                               else CASES[c]["quick_warmup_steps" if args.quick else "warmup_steps"])}
                for c in args.cases},
            "train_batch": BATCH, "torch_threads": torch.get_num_threads(), "flush_denormal": flush,
            "memory": not args.no_memory, "quick": args.quick, "seed": args.seed,
            "netbooster_paper_overhead": NETBOOSTER_PAPER_OVERHEAD,
        },
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    console.rule("results")
    print_tables(doc)
    console.print(f"NetBooster paper: +{NETBOOSTER_PAPER_OVERHEAD:.1%} training time per iteration, measured on GPU "
                  "in the paper's own setting; these rows are CPU, batch 32, torch threads "
                  f"{torch.get_num_threads()}.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "expansion_bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / "expansion_bench.md").write_text(markdown(doc))
    console.print(f"wrote {args.out_dir / 'expansion_bench.json'} and {args.out_dir / 'expansion_bench.md'} "
                  f"(total {doc['wall_s']:.0f} s)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
