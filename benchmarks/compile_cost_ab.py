"""Compile cost of a baseline revision vs the current checkout, side by side (A/B) in one run.

    python benchmarks/compile_cost_ab.py            # = --baseline 66eb766 --sizes 100 1000 --rounds 5, ~7 min
    python benchmarks/compile_cost_ab.py --sizes 5 --rounds 2 --out /tmp/ab_smoke   # smoke test, ~40 s

The baseline revision (``--baseline``, default ``66eb766``, the commit before the engine restructuring)
is checked out into a temporary ``git worktree``; the candidate is this checkout's working tree as it
is (uncommitted changes included; its commit is recorded with ``+dirty`` when fxexpand/ has any). The
worktree is removed at the end, also on an error, Ctrl-C or SIGTERM.

For each size and round, one fresh child process per side runs that checkout's own
``benchmarks/bench_scaling.bench_size(n, repeats=1, export_limit=0, ...)`` on the Conv-BN-ReLU (and
conv-conv) chain of ``n`` blocks, with torch on one thread, cwd and PYTHONPATH set to its checkout
(the child checks that it imported its own fxexpand and bench_scaling, and stops the run otherwise).
The order alternates (rounds 1, 3, ...: baseline first; rounds 2, 4, ...: candidate first), so that
load drifting on the machine hits both sides alike. Pass timings are paired by name with a trailing
"Pass" stripped (``pass:FoldBatchNormPass`` at the baseline is ``pass:FoldBatchNorm`` now).

Reported per size and stage: the median over rounds of each side, the candidate/baseline ratio (the
median of the per-round ratios, with their min-max), and the noise: each side's own round-to-round
spread, max/min - 1, the larger of the two (the same machine noise hits both). A stage is "worse"
when even the smallest per-round ratio exceeds 1 + noise ("better" when the largest is below
1 / (1 + noise)), otherwise "within noise"; with one round there is no noise estimate and no verdict
(and with two, the noise estimate is rough: use the default five rounds for a claim). Also recorded:
load average before and after (and around each child), CPU count, torch version, both commits, the
chain's graph sizes on each side (a warning if they differ: then the sides do not time the same work).
Two rows besides bench_scaling's stages: ``import_fxexpand`` (``import fxexpand`` after torch is
imported) and ``bench_size_wall`` (the whole bench_size call: the untimed chain set-up plus the stages).

Writes ``benchmarks/results/compile_cost_ab.json`` and ``.md`` (``--out STEM`` or ``--out DIR/``),
both at the end and atomically: an interrupted run leaves nothing behind.

Run time: 2 x rounds child processes per size. Each pays ~5-10 s of fixed cost (imports, first calls)
and builds, expands and contracts the chain once untimed before timing each stage once; from the
suite's scaling numbers (benchmarks/results/suite.json, a quiet 2-CPU machine) that is ~8 s per child
at n=100 and ~30-40 s at n=1000 (contract_verify alone ~13 s), so the default run takes ~7 min on a
quiet machine, proportionally longer under load. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, loadavg, log, machine_info, machine_line
from rich.markup import escape

DEFAULT_STAGES = ["trace", "expand", "passes", "contract_noverify", "contract_verify",
                  "deploy_bn_fold_noverify", "deploy_conv_conv_noverify"]
SIDES = ("baseline", "candidate")

# Run by each child with ``python -c``: sys.path[0] is then the cwd (its checkout), before PYTHONPATH
# (the checkout and its benchmarks/) and before the editable install's finder (which maps fxexpand to
# the main checkout). argv: checkout, n, comma-separated stages, work directory (inside the parent's
# temporary directory, so that it goes with it even when a child is killed).
CHILD = r"""
import json, sys, time
from pathlib import Path
checkout, n, stages = Path(sys.argv[1]).resolve(), int(sys.argv[2]), set(sys.argv[3].split(","))
workdir = Path(sys.argv[4])
import torch
torch.set_num_threads(1)
torch.set_flush_denormal(True)
def own(mod):
    f = Path(mod.__file__).resolve()
    if checkout not in f.parents:
        print(f"WRONG-CHECKOUT: {mod.__name__} imported from {f}, not from {checkout}", file=sys.stderr)
        sys.exit(3)
t0 = time.perf_counter()
import fxexpand
t_import = time.perf_counter() - t0
own(fxexpand)
import bench_scaling
own(bench_scaling)
t0 = time.perf_counter()
res = bench_scaling.bench_size(n, repeats=1, export_limit=0, workdir=workdir, stages=stages)
wall = time.perf_counter() - t0
out = {"import_fxexpand": t_import, "bench_size_wall": wall}
for k, v in res["stages"].items():
    if "median_s" in v:
        out[k] = v["median_s"]
    elif "error" in v:
        out[k] = {"error": v["error"]}
print(json.dumps({"fxexpand_file": fxexpand.__file__, "bench_scaling_file": bench_scaling.__file__,
                  "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "graph_nodes": res["graph_nodes"], "child_wall_s": wall, "stages": out}))
"""


class WrongCheckout(RuntimeError):
    pass


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def norm_stage(name: str) -> str:
    """``pass:FoldBatchNormPass`` -> ``pass:FoldBatchNorm`` (old and new pass names pair up)."""
    if name.startswith("pass:") and name.endswith("Pass"):
        return name[: -len("Pass")]
    return name


def run_child(checkout: Path, n: int, stages: list[str], workdir: Path, timeout: float | None) -> dict[str, Any]:
    """One measurement in a fresh process of ``checkout``: {"stages": {name: seconds | {"error"}}, ...}
    or {"error": ...} when the process failed. Raises WrongCheckout when it imported the wrong code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(checkout / "benchmarks")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"
    load0, t0 = loadavg(), time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, str(checkout), str(n), ",".join(stages), str(workdir)],
                           cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "process_wall_s": time.perf_counter() - t0}
    meta = {"process_wall_s": time.perf_counter() - t0, "loadavg_before": load0, "loadavg_after": loadavg()}
    if p.returncode == 3 and "WRONG-CHECKOUT" in p.stderr:
        raise WrongCheckout(p.stderr.strip().splitlines()[-1])
    lines = p.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out = None
    if p.returncode != 0 or not isinstance(out, dict):
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-5:]
        return {"error": f"exit code {p.returncode}: " + " | ".join(tail), **meta}
    out["stages"] = {norm_stage(k): v for k, v in out["stages"].items()}
    return {**out, **meta}


def summarise(runs: list[dict[str, dict]]) -> dict[str, Any]:
    """Per stage: both sides' medians and spreads, the per-round ratios and the verdict."""
    names: list[str] = []
    for r in runs:
        for side in SIDES:
            for k in r[side].get("stages", {}):
                if k not in names:
                    names.append(k)
    out: dict[str, Any] = {}
    for name in names:
        times = {s: [] for s in SIDES}
        ratios, errors = [], []
        for i, r in enumerate(runs):
            t = {}
            for s in SIDES:
                v = r[s].get("stages", {}).get(name) if "error" not in r[s] else None
                if isinstance(v, (int, float)):
                    t[s] = float(v)
                    times[s].append(float(v))
                elif isinstance(v, dict):
                    errors.append(f"round {i} {s}: {v.get('error')}")
            if len(t) == 2 and t["baseline"] > 0:
                ratios.append(t["candidate"] / t["baseline"])
        st: dict[str, Any] = {"rounds_paired": len(ratios), "errors": errors,
                              **{f"{s}_s": [round(x, 6) for x in times[s]] for s in SIDES}}
        for s in SIDES:
            if times[s]:
                st[f"{s}_median_s"] = statistics.median(times[s])
                st[f"{s}_spread"] = max(times[s]) / min(times[s]) - 1 if min(times[s]) > 0 else float("nan")
        if ratios:
            st.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                      ratios=[round(x, 4) for x in ratios])
        if len(ratios) >= 2 and "baseline_spread" in st and "candidate_spread" in st:
            noise = st["noise"] = max(st["baseline_spread"], st["candidate_spread"])
            st["verdict"] = ("worse" if st["ratio_min"] > 1 + noise else
                             "better" if st["ratio_max"] < 1 / (1 + noise) else "within noise")
        else:
            st["verdict"] = "n/a" if not ratios else "n/a (one round)"
        out[name] = st
    return out


def markdown(doc: dict[str, Any]) -> str:
    m, a = doc["machine"], doc["args"]
    lines = [
        "# Compile cost: baseline vs candidate, side by side",
        "",
        f"`{doc['command']}`",
        "",
        (f"Baseline `{doc['baseline']['commit']}` (`{a['baseline']}`), candidate `{doc['candidate']['commit']}` "
         f"(working tree of {doc['candidate']['path']}). {a['rounds']} rounds per size, one child process per "
         "side and round, order alternating (baseline first in rounds 1, 3, ...); each child runs "
         "bench_scaling.bench_size with repeats=1 and torch on 1 thread."),
        "",
        f"Machine: {machine_line(m)}. Wall time {doc['wall_s']:.0f} s.",
        "",
        ("Ratio = candidate / baseline per round (median, min-max over rounds); noise = each side's own "
         "round-to-round spread (max/min - 1), the larger of the two; *worse* when the smallest ratio exceeds "
         "1 + noise, *better* when the largest is below 1 / (1 + noise)."),
        "",
        "| n | stage | baseline median (s) | candidate median (s) | ratio cand/base (min-max) | noise | verdict |",
        "|---:|---|---:|---:|---|---:|---|",
    ]
    for size in doc["sizes"]:
        for name, st in size["stages"].items():
            b, c = st.get("baseline_median_s"), st.get("candidate_median_s")
            ratio = (f"{st['ratio_median']:.3f} ({st['ratio_min']:.3f}-{st['ratio_max']:.3f})"
                     if "ratio_median" in st else "-")
            noise = f"{st['noise']:.1%}" if "noise" in st else "-"
            verdict = f"**{st['verdict']}**" if st["verdict"] in ("worse", "better") else st["verdict"]
            if st["errors"]:
                verdict += f" ({len(st['errors'])} errors)"
            lines.append(f"| {size['n']} | {name} | {'-' if b is None else f'{b:.4f}'} | "
                         f"{'-' if c is None else f'{c:.4f}'} | {ratio} | {noise} | {verdict} |")
    notes = [f"n={s['n']}: {w}" for s in doc["sizes"] for w in s["warnings"]]
    if notes:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in notes]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would differ from the other results files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def out_paths(out: str) -> tuple[Path, Path]:
    p = Path(out)
    if out.endswith(os.sep) or p.is_dir():
        p = p / "compile_cost_ab"
    elif p.suffix in (".json", ".md"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".md")


def _sigterm(signum, frame):  # SIGTERM ends the run like Ctrl-C does: the worktree is removed
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="66eb766", help="baseline revision (default 66eb766)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="chain lengths (default 100 1000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per size, each one child per side (default 5)")
    ap.add_argument("--stages", nargs="+", default=DEFAULT_STAGES,
                    help=f"bench_scaling stages (default {' '.join(DEFAULT_STAGES)})")
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds per child process (default none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_cost_ab"),
                    help="output stem: writes STEM.json and STEM.md (a directory: DIR/compile_cost_ab.*)")
    a = ap.parse_args(argv)
    from bench_scaling import STAGES

    bad = sorted(set(a.stages) - set(STAGES))
    if bad or a.rounds < 1:
        ap.error(f"unknown stages {bad} (known: {' '.join(STAGES)})" if bad else "--rounds must be >= 1")
    json_path, md_path = out_paths(a.out)
    signal.signal(signal.SIGTERM, _sigterm)

    base_sha = _git("rev-parse", "--verify", f"{a.baseline}^{{commit}}")
    info = machine_info(torch_num_threads=1)
    doc: dict[str, Any] = {
        "command": "python benchmarks/compile_cost_ab.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {"baseline": a.baseline, "sizes": a.sizes, "rounds": a.rounds, "stages": a.stages},
        "baseline": {"commit": base_sha[:10], "commit_full": base_sha,
                     "subject": _git("log", "-1", "--format=%s", base_sha)},
        "candidate": {"commit": info["git_commit"], "commit_full": _git("rev-parse", "HEAD"), "path": str(ROOT)},
        "machine": info, "cpu_count": os.cpu_count(), "torch": info["torch"],
        "loadavg_before": info["loadavg_start"],
    }
    log(f"compile cost A/B: baseline {base_sha[:10]} vs candidate {info['git_commit']} ({ROOT}); sizes {a.sizes}, "
        f"{a.rounds} rounds, {os.cpu_count()} CPUs, load average {doc['loadavg_before']}")
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="fxexpand_ab_"))
    wt = tmp / f"baseline_{base_sha[:10]}"
    try:
        _git("worktree", "add", "--detach", "--quiet", str(wt), base_sha)
        checkouts = {"baseline": wt, "candidate": ROOT}
        doc["sizes"] = []
        for n in a.sizes:
            runs: list[dict[str, dict]] = []
            for r in range(a.rounds):
                order = SIDES if r % 2 == 0 else SIDES[::-1]
                rnd: dict[str, Any] = {"round": r, "order": list(order)}
                for side in order:
                    work = tmp / f"work_{side}"
                    work.mkdir(exist_ok=True)
                    res = run_child(checkouts[side], n, a.stages, work, a.child_timeout)
                    rnd[side] = res
                    head = f"n={n} round {r + 1}/{a.rounds} {side:<9}"
                    if "error" in res:
                        log(f"[red]{head} failed: {escape(res['error'])}[/]")
                    else:
                        st = res["stages"]
                        main_stages = ", ".join(f"{k} {v:.3f}" for k, v in st.items() if isinstance(v, float))
                        errs = [k for k, v in st.items() if isinstance(v, dict)]
                        err = f" [red]errors in {escape(', '.join(errs))}[/]" if errs else ""
                        log(f"{head} process {res['process_wall_s']:5.1f} s: "
                            f"{escape(main_stages)}{err}")
                if "error" not in rnd["baseline"] and "error" not in rnd["candidate"]:
                    rnd["ratios"] = {k: round(rnd["candidate"]["stages"][k] / v, 4)
                                     for k, v in rnd["baseline"]["stages"].items()
                                     if isinstance(v, float) and v > 0
                                     and isinstance(rnd["candidate"]["stages"].get(k), float)}
                runs.append(rnd)
            warnings = []
            nodes = {s: next((x[s]["graph_nodes"] for x in runs if "graph_nodes" in x[s]), None) for s in SIDES}
            if nodes["baseline"] != nodes["candidate"]:
                warnings.append(f"graph sizes differ (the two sides do not time the same work): {nodes}")
            failed = {s: sum("error" in x[s] for x in runs) for s in SIDES}
            if any(failed.values()):
                warnings.append(f"failed child processes: {failed}")
            doc["sizes"].append({"n": n, "graph_nodes": nodes, "warnings": warnings,
                                 "stages": summarise(runs), "runs": runs})
            for name, st in doc["sizes"][-1]["stages"].items():
                if "ratio_median" in st:
                    log(f"n={n} {name:<28} baseline {st.get('baseline_median_s', float('nan')):8.4f} s  "
                        f"candidate {st.get('candidate_median_s', float('nan')):8.4f} s  ratio "
                        f"{st['ratio_median']:.3f} ({st['ratio_min']:.3f}-{st['ratio_max']:.3f})  "
                        f"noise {st.get('noise', float('nan')):.1%}  {st['verdict']}")
            for w in warnings:
                log(f"[red]n={n}: {escape(w)}[/]")
    except WrongCheckout as e:
        log(f"[red]a child imported the wrong checkout, stopping (nothing written): {escape(str(e))}[/]")
        return 2
    except KeyboardInterrupt as e:
        log(f"[red]interrupted ({escape(str(e) or 'Ctrl-C')}): nothing written[/]")
        return 130
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, check=False)
        if str(wt) in _git("worktree", "list", "--porcelain"):
            log(f"[red]could not remove the worktree {wt}: see git worktree list[/]")
    doc["loadavg_after"] = loadavg()
    doc["machine"]["loadavg_end"] = doc["loadavg_after"]
    doc["wall_s"] = time.perf_counter() - t_start
    md = markdown(doc)
    _write_atomic(json_path, json.dumps(doc, indent=1, default=str) + "\n")
    _write_atomic(md_path, md)
    print(md)
    log(f"wrote {json_path} and {md_path} ({doc['wall_s']:.0f} s)")
    worse = [(s["n"], k) for s in doc["sizes"] for k, v in s["stages"].items() if v["verdict"] == "worse"]
    if worse:
        log(f"[red]worse than noise: {', '.join(f'n={n} {k}' for n, k in worse)}[/]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
