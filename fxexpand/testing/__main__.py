"""``python -m fxexpand.testing sweep|fuzz``: the long property sweep and the model-file fuzzer."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
import warnings
from collections import Counter

import torch

from . import (
    CONTRACTION_PASSES,
    EXPANSIONS,
    check_deploy,
    check_expansion,
    check_pass,
    check_verify_each,
    random_model,
)
from ._fuzz import fuzz


def _setup_torch() -> None:
    torch.set_flush_denormal(True)  # float64 convs on subnormals are ~100x slower
    torch.set_num_threads(1)       # tiny models: thread-pool overhead dominates on a shared machine
    warnings.filterwarnings("ignore", message=".*padding='same'.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    warnings.filterwarnings("ignore", message=".*pickle protocol.*")


def sweep_seed(seed: int, *, onnx: bool = True, expansions: list[str] | None = None) -> list:
    """Every property on the model of ``seed``: a list of (check name, CheckResult or the exception)."""

    model, inputs = random_model(seed)
    checks = [(f"pass[{n}]", lambda n=n: check_pass(n, model, inputs, seed=seed)) for n in CONTRACTION_PASSES]
    checks.append(("deploy", lambda: check_deploy(model, inputs, onnx=onnx)))
    checks.append(("verify_each", lambda: check_verify_each(model, inputs, position=seed)))
    for name in expansions if expansions is not None else EXPANSIONS:
        checks.append((f"expand[{name}]", lambda name=name: check_expansion(model, inputs, name, seed=seed)))
    out = []
    for name, fn in checks:
        try:
            out.append((name, fn()))
        except Exception as e:  # a failed property
            out.append((name, e))
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_sweep(args) -> int:
    _setup_torch()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` also stops the sweep with a summary
    signal.signal(signal.SIGINT, _interrupt)   # (background jobs start with SIGINT ignored)
    counts: Counter = Counter()
    failures: list[tuple[int, str, str]] = []
    worst: dict[str, float] = {}
    start = time.time()
    done = 0
    interrupted = False
    for i, seed in enumerate(range(args.start, args.start + args.seeds)):
        try:
            results = sweep_seed(seed, onnx=not args.no_onnx)
        except KeyboardInterrupt:  # Ctrl-C / SIGINT: summarise the seeds done so far
            interrupted = True
            break
        except Exception as e:  # the generator itself failed
            results = [("random_model", e)]
        done += 1
        for name, r in results:
            if isinstance(r, Exception):
                counts[(name, "FAILED")] += 1
                msg = f"{type(r).__name__}: {r}"
                failures.append((seed, name, msg))
                print(f"FAIL seed={seed} {name}: {msg}", flush=True)
                if args.verbose:
                    traceback.print_exception(r)
                continue
            counts[(name, r.status)] += 1
            for k, v in r.errors.items():
                key = f"{name.split('[')[0]}:{k}"
                worst[key] = max(worst.get(key, 0.0), v)
        if args.fail_fast and failures:
            break
        if args.progress and (i + 1) % args.progress == 0:
            print(f"... {i + 1} seeds, {len(failures)} failures, {time.time() - start:.0f}s", flush=True)
    elapsed = time.time() - start
    n = done
    print(f"sweep: seeds {args.start}..{args.start + n - 1} ({n} models), {elapsed:.0f}s"
          + (" (interrupted)" if interrupted else ""))
    by_check: dict[str, Counter] = {}
    for (check, status), k in sorted(counts.items()):
        by_check.setdefault(check, Counter())[status] = k
    for check, c in by_check.items():
        print(f"  {check:<42} " + ", ".join(f"{s} {k}" for s, k in sorted(c.items())))
    print("  worst relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    seeds_failing = sorted({s for s, _, _ in failures})
    print(f"failures: {len(failures)} on {len(seeds_failing)} seeds"
          + (": " + ", ".join(map(str, seeds_failing[:50])) if failures else ""))
    return 1 if failures else 0


def cmd_fuzz(args) -> int:
    _setup_torch()
    report = fuzz(args.iterations, seed=args.seed, cli_every=args.cli_every, workdir=args.workdir,
                  progress=args.progress)
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fxexpand.testing", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="run every property check on many generated models")
    s.add_argument("--seeds", type=int, default=2000,
                   help="number of models (default 2000; Ctrl-C or SIGTERM stops early and prints the summary)")
    s.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    s.add_argument("--no-onnx", action="store_true", help="skip the ONNX export check (faster)")
    s.add_argument("--fail-fast", action="store_true", help="stop at the first failing seed")
    s.add_argument("--progress", type=int, default=100, help="print progress every N seeds (0: never)")
    s.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    f = sub.add_parser("fuzz", help="feed random mutations of valid model files to fxexpand.load and the CLI")
    f.add_argument("--iterations", type=int, default=10000, help="mutated files to load (default 10000)")
    f.add_argument("--seed", type=int, default=0, help="random seed of the mutations (default 0)")
    f.add_argument("--cli-every", type=int, default=100,
                   help="also run `fxexpand contract` on every N-th mutated file (default 100; 0: never)")
    f.add_argument("--workdir", default=None, help="directory for the files (default: a temporary one)")
    f.add_argument("--progress", type=int, default=1000, help="print progress every N iterations (0: never)")
    args = p.parse_args(argv)
    return cmd_sweep(args) if args.command == "sweep" else cmd_fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
