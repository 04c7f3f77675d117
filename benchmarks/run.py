#!/usr/bin/env python
"""fxexpand's benchmark suite: one command, one process, one results file.

Sections (``--only``, comma separated; default all):

* ``inference``: onnxruntime latency (1 and 2 threads) of each model in its original, expanded
  (alpha = 1, exported as it is), onnxslim-ed, onnxsim-ed, contracted (target "original") and deploy
  forms, measured alternately; ratios against the original; parameters and FLOPs (bench_inference.py).
* ``peers``: RepVGG- and DBB-style blocks contracted by fxexpand vs the papers' formulas: output
  agreement in float64 and float32, and the time to contract (bench_peers.py).
* ``scaling``: wall time and peak RSS of trace, each expansion and contraction pass, contract
  (with/without verification), deploy and export, first on every model of the inference section
  (each recipe) and then on synthetic chains of 100 / 1,000 / 10,000 blocks; the fx
  symbolic_trace + fuse baseline on the same models and chains, and the log-log slope of cost vs
  graph size (bench_scaling.py).
* ``training``: forward+backward+SGD step time (batch 32) and peak memory of expanded vs original
  models, next to the NetBooster paper's +32.5% (bench_training.py).

Writes ``<out>/<name>.json`` (machine, versions, thread counts, load average at start and end,
configuration and every measurement), ``<out>/<name>_*.png`` plots and ``<out>/<name>.md`` tables.
``--report`` regenerates the markdown (and the generated part of docs/benchmarks.md) from a JSON
file without measuring anything.

Usage::

    python benchmarks/run.py                      # the full suite (63 min in the recorded run on 2 quiet cores)
    python benchmarks/run.py --quick --out /tmp/b # seconds: tiny models, few runs (the test uses this)
    python benchmarks/run.py --only peers,scaling --runs 500
    python benchmarks/run.py --report             # tables + docs from benchmarks/results/suite.json
    fxexpand bench [same options]                 # the same, from the CLI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SECTIONS = ("inference", "peers", "scaling", "training")
DOCS = HERE.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- BEGIN GENERATED: python benchmarks/run.py --report -->", "<!-- END GENERATED -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fxexpand bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny models and few runs (seconds); for smoke tests")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run: {','.join(SECTIONS)} (default all)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="onnxruntime intra-op thread counts (default 1 2; 1 with --quick)")
    p.add_argument("--runs", type=int, default=None,
                   help="maximum timed onnxruntime runs per file and thread count (default 300; the run count is "
                        "fitted to a time budget of --latency-budget seconds, never below --min-runs)")
    p.add_argument("--min-runs", type=int, default=None, help="minimum timed onnxruntime runs (default 15)")
    p.add_argument("--latency-budget", type=float, default=None,
                   help="seconds of alternated onnxruntime runs per case and thread count (default 3)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for everything torch does (default 1; 0 keeps torch's default)")
    p.add_argument("--models", default=None, help="comma-separated model names (default: all seven)")
    p.add_argument("--sizes", default=None, help="scaling chain lengths (default 100,1000,10000; 'none' for no chains)")
    p.add_argument("--no-model-costs", action="store_true",
                   help="scaling section: only the synthetic chains, not the compiler stages on each model")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default benchmarks/results)")
    p.add_argument("--name", default=None, help="results file stem (default suite; quick with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel-scaling", action="store_true",
                   help="run the scaling section in a second process at the same time as the other sections and "
                        "merge it into the same results file (shorter wall time on a loaded machine; both processes "
                        "then contend for the CPUs, which the JSON records)")
    p.add_argument("--report", action="store_true",
                   help="only regenerate <out>/<name>.md, the plots and docs/benchmarks.md's tables from <out>/<name>.json")
    p.add_argument("--no-docs", action="store_true", help="with --report: do not touch docs/benchmarks.md")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="combine the sections of several results files (e.g. sections run as separate processes) "
                        "into <out>/<name>.json; each part's machine description and load averages are kept")
    p.add_argument("--inference-log", type=Path, default=None,
                   help="with --merge: rebuild inference latency rows from the suite's console log (run cut short)")
    p.add_argument("--scaling-log", type=Path, default=None,
                   help="with --merge: rebuild the scaling section from a scaling process's console log "
                        "(for a run cut short before it wrote its JSON); marked as such in the results")


def _bad(msg: str) -> None:
    print(f"fxexpand bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def config(a: argparse.Namespace) -> dict[str, Any]:
    from bench_inference import MODELS

    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        _bad(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    q = a.quick
    models = [m.strip() for m in a.models.split(",")] if a.models else (["smallnet"] if q else list(MODELS))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        _bad(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if a.sizes is not None and a.sizes.strip().lower() == "none":
        sizes: list[int] = []
    else:
        try:
            sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else ([10, 30] if q else [100, 1000, 10000])
        except ValueError:
            _bad(f"--sizes must be comma-separated integers or 'none', got {a.sizes!r}")
        if any(n < 1 for n in sizes):
            _bad(f"--sizes must be positive, got {a.sizes!r}")
    return {
        "quick": q, "sections": only, "seed": a.seed, "torch_threads": a.torch_threads,
        "inference": {"models": models, "recipes": ["expandnets_ck"] if q else ["netbooster", "expandnets_cl", "expandnets_ck"],
                      "threads": a.threads or ([1] if q else [1, 2]),
                      "budget_s": a.latency_budget if a.latency_budget is not None else (0.3 if q else 3.0),
                      "min_runs": a.min_runs if a.min_runs is not None else (5 if q else 15),
                      "max_runs": a.runs if a.runs is not None else (20 if q else 300),
                      "warmup": 1 if q else 5},
        "peers": {"repeats": 1 if q else 10, "warmup": 0 if q else 2, "width": 8 if q else 16},
        "scaling": {"sizes": sizes, "repeats": {n: (1 if q else (3 if n <= 100 else 2 if n <= 1000 else 1)) for n in sizes},
                    "export_limit": max(sizes, default=0),
                    # the same stages on the inference models (--no-model-costs leaves them out)
                    "models": [] if a.no_model_costs else models,
                    "recipes": ["expandnets_ck"] if q else ["netbooster", "expandnets_cl", "expandnets_ck"],
                    "max_repeats": 2 if q else 5, "budget_s": 1.0 if q else 10.0},
        "training": {"models": models, "recipes": ["expandnets_ck"] if q else ["netbooster", "expandnets_cl", "expandnets_ck"],
                     "side": {m: (32 if m == "smallnet" else 64) for m in models},
                     "budget_s": 0.2 if q else 8.0, "min_rounds": 2 if q else 3, "max_rounds": 3 if q else 20,
                     "memory": True},
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run(a)


def run(a: argparse.Namespace) -> int:
    name = a.name or ("quick" if a.quick else "suite")
    out_dir: Path = a.out
    if a.merge:
        return merge(a.merge, out_dir, name, a.scaling_log, a.inference_log)
    if a.report:
        path = out_dir / f"{name}.json"
        if not path.exists():
            print(f"no results file {path}; run the suite first", file=sys.stderr)
            return 2
        doc = json.loads(path.read_text())
        write_outputs(doc, out_dir, name, docs=not a.no_docs and out_dir.resolve() == (HERE / "results").resolve())
        return 0

    import report
    import torch
    from _common import console, loadavg, machine_info
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = config(a)
    if a.torch_threads > 0:
        torch.set_num_threads(a.torch_threads)
    torch.set_flush_denormal(True)
    from bench_inference import optional_tools

    machine = machine_info(optional_tools=optional_tools(), os_cpu_count=os.cpu_count(),
                           ort_threads=cfg["inference"]["threads"])
    console.print(f"[bold]fxexpand benchmark suite[/] ({name}); sections {', '.join(cfg['sections'])}; "
                  f"torch threads {torch.get_num_threads()}, load average {machine['loadavg_start']}")
    t0 = time.perf_counter()
    sections: dict[str, Any] = {}
    side_proc = None
    if a.parallel_scaling and "scaling" in cfg["sections"]:
        import subprocess

        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", "scaling", "--name", f"{name}_scaling",
               "--out", str(out_dir), "--torch-threads", str(a.torch_threads), "--seed", str(a.seed)]
        cmd += ["--quick"] if a.quick else []
        cmd += ["--sizes", a.sizes] if a.sizes else []
        cmd += ["--models", a.models] if a.models else []
        cmd += ["--no-model-costs"] if a.no_model_costs else []
        side_log = open(out_dir / f"{name}_scaling.log", "w") if out_dir.exists() else subprocess.DEVNULL
        side_proc = subprocess.Popen(cmd, stdout=side_log, stderr=subprocess.STDOUT)
        cfg["sections"] = [x for x in cfg["sections"] if x != "scaling"]
        console.print(f"scaling section runs in a second process (pid {side_proc.pid}), merged at the end")
    n_inf = len(cfg["inference"]["models"]) * len(cfg["inference"]["recipes"])
    total = ((n_inf if "inference" in cfg["sections"] else 0) + ("peers" in cfg["sections"])
             + (len(cfg["scaling"]["sizes"]) + len(cfg["scaling"]["models"]) if "scaling" in cfg["sections"] else 0)
             + (len(cfg["training"]["models"]) if "training" in cfg["sections"] else 0))
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as prog:
        task = prog.add_task("benchmarks", total=total)
        adv = lambda: prog.advance(task)  # noqa: E731
        if "inference" in cfg["sections"]:
            import bench_inference

            prog.update(task, description="inference")
            c = cfg["inference"]
            sections["inference"] = bench_inference.run(c["models"], c["recipes"], threads=c["threads"],
                                                        budget_s=c["budget_s"], min_runs=c["min_runs"],
                                                        max_runs=c["max_runs"], warmup=c["warmup"], seed=a.seed,
                                                        progress=adv)
        _partial(out_dir, name, machine, cfg, sections)
        if "peers" in cfg["sections"]:
            import bench_peers

            prog.update(task, description="peers")
            c = cfg["peers"]
            sections["peers"] = bench_peers.run(c["repeats"], c["warmup"], width=c["width"], seed=a.seed)
            adv()
        if "scaling" in cfg["sections"]:
            import bench_scaling

            prog.update(task, description="scaling")
            c = cfg["scaling"]
            sc: dict[str, Any] = {"sizes": c["sizes"], "repeats": {str(k): v for k, v in c["repeats"].items()},
                                  "export_limit": c["export_limit"], "channels": bench_scaling.C,
                                  "input": [1, bench_scaling.C, bench_scaling.SIDE, bench_scaling.SIDE],
                                  "rows": [], "slopes": {}}
            sections["scaling"] = sc
            if c["models"]:  # the models first: they are quicker than the 10,000-block chains
                sc["model_costs"] = {"recipes": c["recipes"], "max_repeats": c["max_repeats"],
                                     "budget_s_per_stage": c["budget_s"], "models": []}
                for m in c["models"]:
                    sc["model_costs"]["models"] += bench_scaling.run_models(
                        [m], c["recipes"], seed=a.seed, max_repeats=c["max_repeats"], budget_s=c["budget_s"])
                    adv()
                    _partial(out_dir, name, machine, cfg, sections)
            import tempfile

            with tempfile.TemporaryDirectory(prefix="fxexpand_scaling_") as tmp:
                for n in c["sizes"]:
                    sc["rows"].append(bench_scaling.bench_size(n, c["repeats"][n], c["export_limit"], Path(tmp)))
                    sc["slopes"] = bench_scaling.fit_slopes(sc["rows"])
                    adv()
                    _partial(out_dir, name, machine, cfg, sections)
        _partial(out_dir, name, machine, cfg, sections)
        if "training" in cfg["sections"]:
            import bench_training

            prog.update(task, description="training")
            c = cfg["training"]
            sections["training"] = bench_training.run(c["models"], c["recipes"], side=c["side"], budget_s=c["budget_s"],
                                                      min_rounds=c["min_rounds"], max_rounds=c["max_rounds"],
                                                      seed=a.seed, memory=c["memory"], progress=adv)
    if side_proc is not None:
        rc = side_proc.wait()
        side = out_dir / f"{name}_scaling.json"
        if rc in (0, 1) and side.exists():
            sd = json.loads(side.read_text())
            sections["scaling"] = sd["sections"]["scaling"]
            sections["scaling"]["process"] = {"parallel": True, "loadavg_start": sd["machine"]["loadavg_start"],
                                              "loadavg_end": sd["machine"]["loadavg_end"], "wall_s": sd["wall_s"]}
            cfg["sections"].append("scaling")
            side.unlink()
        else:
            sections["scaling"] = {"error": f"the scaling process exited with {rc}"}
    machine["loadavg_end"] = loadavg()
    machine["torch_num_threads"] = torch.get_num_threads()
    cfg["scaling"]["repeats"] = {str(k): v for k, v in cfg["scaling"]["repeats"].items()}
    doc = {"name": name, "machine": machine, "config": cfg, "sections": sections,
           "wall_s": time.perf_counter() - t0}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    (out_dir / f"{name}.partial.json").unlink(missing_ok=True)
    write_outputs(doc, out_dir, name, docs=False)
    console.print(report.markdown(doc, out_dir, name), markup=False)
    console.print(f"wrote {out_dir / (name + '.json')} and plots (total {doc['wall_s']:.0f} s, load average "
                  f"{machine['loadavg_start']} -> {machine['loadavg_end']})")
    errors = [c for s in sections.values() for c in s.get("cases", []) if isinstance(c, dict) and "error" in c]
    return 1 if errors else 0


def merge(files: list[Path], out_dir: Path, name: str, scaling_log: Path | None = None,
          inference_log: Path | None = None) -> int:
    """One results document from several (a later file's section replaces an earlier one's)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    sections: dict[str, Any] = {}
    provenance = []
    for f, d in zip(files, parts):
        for k, v in d["sections"].items():
            sections[k] = v
        provenance.append({"file": Path(f).name, "sections": list(d["sections"]), "machine": d["machine"],
                           "wall_s": d.get("wall_s"), "complete": d.get("complete", True)})
    if inference_log is not None:
        import bench_inference

        done = {(c["model"], c["recipe"]) for c in sections.get("inference", {}).get("cases", [])}
        extra = [c for c in bench_inference.cases_from_log(Path(inference_log).read_text())
                 if (c["model"], c["recipe"]) not in done]
        if "inference" not in sections:
            from bench_inference import MODELS

            ic = parts[0]["config"]["inference"]
            sections["inference"] = {
                "cases": [], "from_log": f"rebuilt from {Path(inference_log).name}: latency medians and ratios only",
                "models": ic["models"], "recipes": ic["recipes"], "threads": ic["threads"],
                "budget_s_per_thread_count": ic["budget_s"], "min_runs": ic["min_runs"], "max_runs": ic["max_runs"],
                "warmup": ic["warmup"], "optional_tools": parts[0]["machine"].get("optional_tools", {}),
                "input_side": {m: MODELS[m][1] for m in ic["models"]}}
        sections["inference"]["cases"] += extra
    if scaling_log is not None:
        import bench_scaling

        rows = bench_scaling.rows_from_log(Path(scaling_log).read_text())
        sections["scaling"] = {"sizes": [r["n"] for r in rows], "repeats": {str(r["n"]): max(
            (v.get("repeats") or 1) for v in r["stages"].values()) for r in rows},
            "export_limit": max(r["n"] for r in rows), "channels": bench_scaling.C,
            "input": [1, bench_scaling.C, bench_scaling.SIDE, bench_scaling.SIDE], "rows": rows,
            "slopes": bench_scaling.fit_slopes(rows),
            "from_log": f"rebuilt from {Path(scaling_log).name}: the scaling process was stopped before it "
                        "wrote its JSON; stages not in the log were not measured"}
    machine = dict(parts[0]["machine"])
    starts = [p["machine"].get("loadavg_start") for p in parts if p["machine"].get("loadavg_start")]
    ends = [p["machine"].get("loadavg_end") for p in parts if p["machine"].get("loadavg_end")]
    machine["loadavg_start"] = max(starts, key=lambda x: x[0]) if starts else None
    machine["loadavg_end"] = max(ends, key=lambda x: x[0]) if ends else None
    cfg = dict(parts[0]["config"])
    cfg["sections"] = list(sections)
    for p in parts[1:]:
        for k in p["config"].get("sections", []):
            cfg[k] = p["config"].get(k)
    doc = {"name": name, "machine": machine, "config": cfg, "sections": sections,
           "wall_s": max(p.get("wall_s") or 0 for p in parts), "merged_from": provenance}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"wrote {out_dir / (name + '.json')} from {', '.join(str(f) for f in files)}")
    return 0


def _partial(out_dir: Path, name: str, machine: dict, cfg: dict, sections: dict) -> None:
    """Sections finished so far, so a run cut short leaves its measurements behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.partial.json").write_text(json.dumps({"machine": machine, "config": cfg, "sections": sections},
                                                             indent=1, default=float))


def write_outputs(doc: dict, out_dir: Path, name: str, docs: bool) -> None:
    import report

    report.plots(doc, out_dir, name)
    md = report.markdown(doc, out_dir, name)
    (out_dir / f"{name}.md").write_text(md + "\n")
    if docs and DOCS.exists():
        text = DOCS.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            DOCS.write_text(head + BEGIN + "\n\n" + report.markdown(doc, DOCS.parent, name, for_docs=True) + "\n\n" + END + tail)


if __name__ == "__main__":
    sys.exit(main())
