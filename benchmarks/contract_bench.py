#!/usr/bin/env python
"""Benchmark ``fxexpand.contract(target="deploy")`` on torchvision models.

For each model (built with ``weights=None``, eval mode, BatchNorm running statistics and affine
parameters randomised so that folding is not an identity), with a 1x3x224x224 input, it measures:

1. onnxruntime latency of the exported *input* model vs the *contracted* one (both exported with
   :func:`fxexpand.export_onnx`), measured alternately in one run with :func:`fxexpand.compare_onnx`,
   at each requested intra-op thread count: median and p90 in ms and contracted/input ratios.
2. Wall time of ``fxexpand.contract()`` with ``verify=True`` and ``verify=False`` next to
   ``torch.fx.symbolic_trace(model)`` + ``torch.fx.experimental.optimization.fuse(traced)``:
   one warm-up round, then ``--repeats`` rounds, the three measured alternately (order rotated each
   round); medians and ratios to the fx baseline. torch runs with ``--torch-threads`` intra-op
   threads (default 1).
3. Parameter count and FLOPs (:func:`fxexpand.count_parameters`, :func:`fxexpand.count_flops`) of the
   input and contracted models, plus the node count of both ONNX files.

Results: a rich table on the console, ``<out-dir>/contract_bench.json`` (with a machine description)
and ``<out-dir>/contract_bench.md``.

Usage::

    python benchmarks/contract_bench.py                 # full default run (~2-3 minutes on 2 cores)
    python benchmarks/contract_bench.py --quick         # smoke test
    python benchmarks/contract_bench.py --models resnet18 --runs 300 --threads 1 2 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torchvision
from rich.console import Console
from rich.table import Table
from torch.fx.experimental.optimization import fuse as fx_fuse

import fxexpand
from _common import loadavg, machine_info, machine_line, onnx_summary  # noqa: E402 (benchmarks/ is on sys.path)

DEFAULT_MODELS = ("mobilenet_v2", "resnet18")
INPUT_SHAPE = (1, 3, 224, 224)

console = Console(highlight=False)
if not console.is_terminal:  # logs and pipes: wide enough for the tables
    console = Console(highlight=False, width=200)


# --------------------------------------------------------------------------------------------------
# machine description


# --------------------------------------------------------------------------------------------------
# models


def build_model(name: str, seed: int) -> torch.nn.Module:
    """A torchvision model with random weights and randomised BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    ctor = getattr(torchvision.models, name, None)
    if ctor is None:
        raise ValueError(f"torchvision.models has no model named {name!r}")
    model = ctor(weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)        # U(0.5, 1.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)         # U(0.5, 1.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# measurement


def time_alternately(fns: dict[str, Callable[[], Any]], repeats: int, warmup_rounds: int,
                     label: str) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall seconds of each fn over ``repeats`` rounds (after ``warmup_rounds`` untimed ones), the
    fns run alternately with their order rotated each round. Returns the times and the results of
    the last call of each fn."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    last: dict[str, Any] = {}
    total = warmup_rounds + repeats
    for r in range(total):
        timed = r >= warmup_rounds
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            last.pop(k, None)
            gc.collect()
            t0 = time.perf_counter()
            last[k] = fns[k]()
            dt = time.perf_counter() - t0
            if timed:
                times[k].append(dt)
        if timed:
            console.log(f"  {label} round {r - warmup_rounds + 1}/{repeats}: "
                        + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names))
        else:
            console.log(f"  {label} warm-up round {r + 1}/{warmup_rounds} done")
    return times, last


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"model": name, "input_shape": list(INPUT_SHAPE)}
    t_model = time.perf_counter()
    console.rule(f"[bold]{name}")
    model = build_model(name, args.seed)
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(args.seed + 2))
    inputs = (x,)

    # -- 2. compile-time: contract(verify=True / False) vs symbolic_trace + fuse ------------------
    console.log(f"[cyan]{name}[/]: timing contract() vs fx symbolic_trace+fuse "
                f"({args.compile_warmup} warm-up + {args.repeats} rounds, alternating)")
    fns = {
        "contract_verify": lambda: fxexpand.contract(model, inputs, target="deploy", verify=True),
        "contract_noverify": lambda: fxexpand.contract(model, inputs, target="deploy", verify=False),
        "fx_trace_fuse": lambda: fx_fuse(torch.fx.symbolic_trace(model)),
    }
    times, last = time_alternately(fns, args.repeats, args.compile_warmup, name)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["fx_trace_fuse"]
    res["compile_time_s"] = {
        "repeats": args.repeats,
        "warmup_rounds": args.compile_warmup,
        "torch_num_threads": torch.get_num_threads(),
        "median": med,
        "all": times,
        "ratio_to_fx_fuse": {k: (v / base if base > 0 else None) for k, v in med.items()},
    }
    contracted = last["contract_verify"]
    report = contracted.fxexpand_report
    res["contract_report"] = {
        "summary": report.summary(),
        "folded": report._count("folded"),
        "fused": report._count("fused"),
        "removed": report._count("removed"),
        "skipped": report._count("skipped"),
        "max_abs_error": report.verification.max_abs_error() if report.verification is not None else None,
    }
    # sanity: the fx baseline's result agrees with the model as well (float32, one input)
    with torch.no_grad():
        ref = model(x)
        res["fx_fuse_max_abs_error"] = float((last["fx_trace_fuse"](x) - ref).abs().max())
        res["contract_max_abs_error_fp32"] = float((contracted(x) - ref).abs().max())
    del last

    # -- 3. size and cost --------------------------------------------------------------------------
    console.log(f"[cyan]{name}[/]: counting parameters and FLOPs")
    res["params"] = {"input": fxexpand.count_parameters(model), "contracted": fxexpand.count_parameters(contracted)}
    res["flops"] = {"input": fxexpand.count_flops(model, inputs), "contracted": fxexpand.count_flops(contracted, inputs)}

    # -- 1. onnxruntime latency --------------------------------------------------------------------
    console.log(f"[cyan]{name}[/]: exporting ONNX (input and contracted, checked against torch)")
    p_in = workdir / f"{name}_input.onnx"
    p_c = workdir / f"{name}_contracted.onnx"
    t0 = time.perf_counter()
    fxexpand.export_onnx(model, inputs, p_in)
    fxexpand.export_onnx(contracted, inputs, p_c)
    res["export_time_s"] = time.perf_counter() - t0
    res["onnx"] = {"input": onnx_summary(p_in), "contracted": onnx_summary(p_c)}

    res["latency"] = []
    for th in args.threads:
        console.log(f"[cyan]{name}[/]: onnxruntime latency, {th} thread(s), {args.warmup} warm-up + "
                    f"{args.runs} runs each, alternating")
        s_in, s_c = fxexpand.compare_onnx([p_in, p_c], threads=th, runs=args.runs, warmup=args.warmup)
        row = {
            "threads": th,
            "input": s_in.as_dict(),
            "contracted": s_c.as_dict(),
            "ratio_median": s_c.median_ms / s_in.median_ms,
            "ratio_p90": s_c.p90_ms / s_in.p90_ms,
        }
        res["latency"].append(row)
        console.log(f"  median {s_in.median_ms:.2f} -> {s_c.median_ms:.2f} ms (x{row['ratio_median']:.3f}), "
                    f"p90 {s_in.p90_ms:.2f} -> {s_c.p90_ms:.2f} ms (x{row['ratio_p90']:.3f})")
    res["model_wall_s"] = time.perf_counter() - t_model
    res["loadavg_end"] = loadavg()
    return res


# --------------------------------------------------------------------------------------------------
# reporting


def _m(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def _g(x: float) -> str:
    return f"{x / 1e9:.3f} G"


def table_rows(results: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    ok = [r for r in results if "error" not in r]
    lat_head = ["Model", "Threads", "Input median (ms)", "Input p90 (ms)", "Contracted median (ms)",
                "Contracted p90 (ms)", "Ratio median", "Ratio p90"]
    lat = [[r["model"], str(l["threads"]), f"{l['input']['median_ms']:.2f}", f"{l['input']['p90_ms']:.2f}",
            f"{l['contracted']['median_ms']:.2f}", f"{l['contracted']['p90_ms']:.2f}",
            f"{l['ratio_median']:.3f}", f"{l['ratio_p90']:.3f}"] for r in ok for l in r["latency"]]
    ct_head = ["Model", "contract verify=True (s)", "contract verify=False (s)", "fx trace+fuse (s)",
               "Ratio verify=True / fx", "Ratio verify=False / fx"]
    ct = []

    def cell(c: dict, k: str) -> str:  # median (min-max)
        return f"{c['median'][k]:.2f} ({min(c['all'][k]):.2f}-{max(c['all'][k]):.2f})"

    for r in ok:
        c = r["compile_time_s"]
        ct.append([r["model"], cell(c, "contract_verify"), cell(c, "contract_noverify"), cell(c, "fx_trace_fuse"),
                   f"{c['ratio_to_fx_fuse']['contract_verify']:.1f}",
                   f"{c['ratio_to_fx_fuse']['contract_noverify']:.1f}"])
    sz_head = ["Model", "Params input", "Params contracted", "FLOPs input", "FLOPs contracted",
               "BN folded", "ONNX nodes input", "ONNX nodes contracted", "ONNX BatchNormalization input",
               "Same ONNX op counts"]
    sz = [[r["model"], _m(r["params"]["input"]), _m(r["params"]["contracted"]), _g(r["flops"]["input"]),
           _g(r["flops"]["contracted"]), str(r["contract_report"]["folded"]), str(r["onnx"]["input"]["nodes"]),
           str(r["onnx"]["contracted"]["nodes"]), str(r["onnx"]["input"]["ops"].get("BatchNormalization", 0)),
           "yes" if r["onnx"]["input"]["ops"] == r["onnx"]["contracted"]["ops"] else "no"] for r in ok]
    return {"latency": (lat_head, lat), "compile": (ct_head, ct), "size": (sz_head, sz)}


TITLES = {
    "latency": "onnxruntime latency, input vs contracted (ratio = contracted / input; < 1 is faster)",
    "compile": "Compile wall time, median (min-max) over the rounds (ratio = median / fx symbolic_trace+fuse median)",
    "size": "Size and cost (FLOPs as counted by torch FlopCounterMode: conv/matmul only)",
}


def print_tables(results: list[dict[str, Any]]) -> None:
    for key, (head, rows) in table_rows(results).items():
        if not rows:
            continue
        t = Table(title=TITLES[key], title_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    for r in results:
        if "error" in r:
            console.print(f"[red]{r['model']}: {r['error']}[/]")


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        "# fxexpand contract benchmark",
        "",
        f"Machine: {machine_line(doc['machine'])}",
        "",
        f"Config: models {', '.join(cfg['models'])}; input {'x'.join(map(str, INPUT_SHAPE))}; "
        f"onnxruntime {cfg['warmup']} warm-up + {cfg['runs']} runs per model, alternating; "
        f"compile time {cfg['compile_warmup']} warm-up + {cfg['repeats']} rounds, alternating"
        + ("; --quick" if cfg["quick"] else "") + f". Total wall time {doc['wall_s']:.0f} s.",
        "",
    ]
    for key, (head, rows) in table_rows(doc["results"]).items():
        if not rows:
            continue
        lines += [f"**{TITLES[key]}**", "",
                  "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    for r in doc["results"]:
        if "error" in r:
            lines += [f"**{r['model']} failed:** `{r['error']}`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="torchvision model names")
    p.add_argument("--runs", type=int, default=None, help="timed onnxruntime runs per model (default 300; 10 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed onnxruntime runs per model (default 20; 2 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed compile rounds (default 5; 1 with --quick)")
    p.add_argument("--compile-warmup", type=int, default=1, help="untimed compile rounds first (default 1)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op thread counts")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for everything torch does here, in particular the compile-time "
                        "measurement (default 1: on a small shared machine torch's OpenMP threads suffer badly "
                        "from oversubscription; 0 keeps torch's own default)")
    p.add_argument("--quick", action="store_true", help="few runs, for smoke testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    a.runs = a.runs if a.runs is not None else (10 if a.quick else 300)
    a.warmup = a.warmup if a.warmup is not None else (2 if a.quick else 20)
    a.repeats = a.repeats if a.repeats is not None else (1 if a.quick else 5)
    if min(a.runs, a.repeats, *a.threads) < 1 or min(a.warmup, a.compile_warmup, a.torch_threads) < 0:
        p.error("--runs, --repeats and --threads must be >= 1; --warmup, --compile-warmup, --torch-threads >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    machine = machine_info()
    console.print(f"[bold]fxexpand contract benchmark[/]  {machine_line(machine)}")
    load = machine["loadavg_start"]
    if load is not None and load[0] > 0.5 * (os.cpu_count() or 1):
        console.print(f"[yellow]warning: 1-minute load average is {load[0]:.2f} on {os.cpu_count()} CPUs; "
                      "other processes will skew the timings[/]")
    results = []
    with tempfile.TemporaryDirectory(prefix="fxexpand_bench_") as tmp:
        for name in args.models:
            try:
                results.append(bench_model(name, args, Path(tmp)))
            except Exception as e:  # keep going with the other models; the error is recorded
                console.print_exception()
                results.append({"model": name, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()})
    doc = {
        "machine": machine,
        "config": {"models": args.models, "runs": args.runs, "warmup": args.warmup, "repeats": args.repeats,
                   "compile_warmup": args.compile_warmup, "threads": args.threads, "quick": args.quick,
                   "torch_threads": torch.get_num_threads(),
                   "seed": args.seed, "input_shape": list(INPUT_SHAPE), "contract_target": "deploy"},
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    machine["loadavg_end"] = loadavg()
    console.rule("results")
    print_tables(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "contract_bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / "contract_bench.md").write_text(markdown(doc))
    console.print(f"wrote {args.out_dir / 'contract_bench.json'} and {args.out_dir / 'contract_bench.md'} "
                  f"(total {doc['wall_s']:.0f} s)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
