"""The regime study's runner (issue 28): train every run of a declared design, one JSON line each.

    python benchmarks/study.py docs/study/design_vanilla_map.json                 # both cores
    python benchmarks/study.py DESIGN --workers 1 --stack 2                       # one core, 2 vanilla seeds at once
    python benchmarks/study.py DESIGN --results docs/study/results.jsonl --dry-run  # what is left, and its estimate

Each group of runs trains in a worker process (spawned, one torch thread) through
``fxexpand.demo.study.execute`` — the demo's ``train_run`` for one run, a stacked K-seed model for
``--stack K`` vanilla seeds — which appends one row per finished run to the results file (one write
+ fsync under a file lock: a killed run leaves nothing half-written). Runs already in the results
file are skipped, so the command resumes where it stopped. Progress and the ETA (calibrated on the
measured rate of estimated CPU seconds) are shown with rich; at the end it prints the throughput
(runs per hour). A malformed design exits with status 2 and says what is wrong. docs/study.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fxexpand.core import InputError
from fxexpand.demo import study

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "docs" / "study" / "results.jsonl"


def _describe(row: dict) -> str:
    return (f"{row['regime']} {row['method']} E={row['epochs']} lr={row['lr']:g} seed {row['seed']}: "
            f"test {100 * row['test_acc']:.2f} % val {100 * row['val_acc']:.2f} % train {100 * row['train_acc']:.2f} % "
            f"({row['seconds']:.0f} s{', stacked ' + str(row['stacked']) if row['stacked'] > 1 else ''})")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("design", help="the design file (JSON; see fxexpand.demo.study)")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="results file, one JSON line per run "
                    "(default docs/study/results.jsonl)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    ap.add_argument("--stack", type=int, default=1, help="train up to K vanilla seeds of one regime/epochs/lr at "
                    "once as one grouped model (fxexpand.demo.stacked; default 1: every run alone)")
    ap.add_argument("--limit", type=int, default=None, help="run at most this many pending groups")
    ap.add_argument("--dry-run", action="store_true", help="list what is pending and the estimate; train nothing")
    args = ap.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # whole lines in logs (nohup)
    try:
        if args.workers < 1:
            raise InputError(f"--workers must be >= 1, got {args.workers}")
        design = study.load_design(args.design)
        todo = study.pending(design, args.results)
        grouped = study.groups(todo, stack=args.stack)
    except InputError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    if args.limit is not None:
        grouped = grouped[:max(0, args.limit)]
    n_runs = sum(len(g) for g in grouped)
    estimate = sum(study.estimate_seconds(g) for g in grouped)
    console.print(f"design {design.name}: {len(design.runs)} runs, {len(design.runs) - len(todo)} done in "
                  f"{args.results}, {n_runs} to run in {len(grouped)} groups; estimate {_hours(estimate)} of CPU time "
                  f"(~{_hours(estimate / min(args.workers, max(1, len(grouped))))} on {args.workers} worker(s))")
    if args.dry_run or not grouped:
        for g in grouped:
            r = g[0]
            console.print(f"  {r.regime.name} {r.method} E={r.epochs} lr={r.lr:g} seeds {[x.seed for x in g]} "
                          f"~{study.estimate_seconds(g):.0f} s")
        return 0
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    done_runs, units = 0, 0.0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("est. CPU s"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress, \
            ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        bar = progress.add_task(f"{design.name}: 0/{n_runs} runs", total=round(estimate))
        futures = {pool.submit(study.execute, study.task_of(g, design, args.results)): g for g in grouped}
        try:
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for f in finished:
                    rows = f.result()
                    done_runs += len(rows)
                    for row in rows:
                        progress.console.print(_describe(row))
                    units += study.estimate_seconds(futures[f])
                    progress.update(bar, advance=round(study.estimate_seconds(futures[f])),
                                    description=f"{design.name}: {done_runs}/{n_runs} runs")
                    if not console.is_terminal:  # a log file gets no live bar: say where it stands
                        elapsed = time.perf_counter() - t0
                        eta = (estimate - units) * elapsed / max(units, 1e-9)
                        console.print(f"  [{done_runs}/{n_runs} runs, {_hours(elapsed)} elapsed, ETA {_hours(eta)} "
                                      f"at the measured rate; finish ~{time.strftime('%H:%M', time.localtime(time.time() + eta))}]")
        except BrokenProcessPool:
            console.print("[red]a worker process died[/red] (killed?); the finished rows are in the results file, "
                          "re-run the command to continue")
            return 1
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            console.print("interrupted; re-run the command to continue")
            return 130
    wall = time.perf_counter() - t0
    console.print(f"{done_runs} runs in {wall:.0f} s with {args.workers} worker(s), --stack {args.stack}: "
                  f"{3600 * done_runs / wall:.0f} runs per hour")
    return 0


if __name__ == "__main__":
    sys.exit(main())
