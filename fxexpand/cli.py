"""The ``fxexpand`` command.

``fxexpand bench``: run the benchmark suite (benchmarks/run.py) from a source checkout.

``fxexpand contract MODEL -o OUT.onnx``: load MODEL, contract it (target "deploy" by default),
verify, export ONNX (checked against torch in onnxruntime) and print a summary table. Bad input
gets a one-paragraph error and exit code 2; the output file is only written on success.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import api, demo, io
from .core import FxExpandError, ModelFactory, get_record
from .demo import early_exits
from .deploy import bench, cost, export, report
from .deploy.export import check_output_path
from .io import LoadedModel, build_model, load_file
from .recipes import RECIPES, get_recipe
from .training import schedule

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def _shape(text: str) -> list[int]:
    parts = re.split(r"[,x]", text.strip())
    try:
        dims = [int(d) for d in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be integers like 1,3,224,224, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers like 1,3,224,224, got {text!r}")
    return dims


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxexpand",
        description="Expansion-then-contraction for compact networks: contract, verify, export and time models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "contract",
        help="contract a model, verify it, export ONNX and print a summary",
        description=(
            "Load MODEL, fold BatchNorms and fuse linear chains (target 'deploy'), verify the result "
            "numerically, export it to ONNX (checked in onnxruntime) and print parameters, FLOPs, "
            "latency and error. MODEL is a torchvision model name such as torchvision:mobilenet_v2 "
            "(built with weights=None), a timm model name such as timm:mobilenetv3_small_100 (built with "
            "pretrained=False; needs pip install 'fxexpand[timm]'), a file written by fxexpand.save(), or, "
            "with --trust-pickle, a module saved with torch.save(module)."
        ),
    )
    c.add_argument("model", help="torchvision:<name> | timm:<name> | fxexpand:SmallNet | file from fxexpand.save() | "
                                 "pickled module (--trust-pickle)")
    c.add_argument("-o", "--output", required=True, help="where to write the contracted ONNX model")
    c.add_argument("--input-shape", type=_shape, default=None,
                   help="example input shape, e.g. 1,3,224,224 (default: recorded in the file, else 1,3,224,224)")
    c.add_argument("--target", choices=["deploy", "original"], default="deploy",
                   help="deploy: fold every BN and make every profitable fusion (default); original: "
                        "contract only fxexpand's expanded regions")
    c.add_argument("--no-verify", action="store_true", help="skip the numerical equivalence check")
    c.add_argument("--bench", action="store_true", help="time the input and contracted models in onnxruntime")
    c.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for --bench (default 1)")
    c.add_argument("--runs", type=int, default=30, help="timed runs per model for --bench (default 30)")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (unpickling runs code from the file)")
    c.add_argument("--allow-factory", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="allow a fxexpand.save() file to build its model with this factory (repeatable)")
    c.add_argument("--report", action="store_true", help="also print every fusion and skip with its reason")


    e = sub.add_parser(
        "expand",
        help="expand a model with a recipe and save it (fxexpand.save format)",
        description=("Build MODEL, expand it with a recipe (NetBooster or ExpandNets), print parameters and FLOPs "
                     "of the original, expanded and contracted models, and save the expanded model. Train it, "
                     "decay its activations to alpha=1, then `fxexpand contract` it."),
    )
    e.add_argument("--model", required=True,
                   help="torchvision:<name> | timm:<name> | fxexpand:SmallNet | file from fxexpand.save()")
    e.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="expansion recipe")
    e.add_argument("-o", "--output", required=True, help="where to write the expanded model (.pt)")
    e.add_argument("--input-shape", type=_shape, default=None,
                   help="example input shape for the report (default: from the file, else 1,3,224,224)")
    e.add_argument("--alpha", type=float, default=0.0,
                   help="initial decay coefficient of the inserted activations (default 0; 1 = already linear)")
    e.add_argument("--allow-factory", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="allow a fxexpand.save() file to build its model with this factory (repeatable)")

    d = sub.add_parser(
        "demo",
        help="do the methods make a tiny model better? a paired comparison on MNIST-1D (no downloads)",
        description=("Train a tiny Conv1d net on MNIST-1D (generated offline) with vanilla training and each "
                     "method's paper protocol (NetBooster, ExpandNets CL/CK/+Init, NetAug), contract every expanded "
                     "model back to the tiny architecture, verify it, and compare test accuracy with paired seeds "
                     "against vanilla at the same epochs and at matched training compute; time the deployed "
                     "models alternately in onnxruntime. Prints a table, writes demo.json and demo.png. The default "
                     "is a short run (3 seeds, learning rates from the documented run); --full reproduces the "
                     "documented run (10 seeds, learning rates tuned on the validation split)."),
    )
    d.add_argument("--full", action="store_true", help="the documented run: every method, 10 seeds, LR tuning")
    d.add_argument("--seeds", type=int, default=None, help="paired seeds (default 3; --full 10)")
    d.add_argument("--epochs", type=int, default=20, help="base epochs E (default 20; protocols run multiples)")
    d.add_argument("--methods", default=None,
                   help="comma-separated methods (default: vanilla ladder + one per method); choices: "
                        + ", ".join(demo.METHODS))
    d.add_argument("--tune", action="store_true", help="tune each method's learning rate on the validation split")
    d.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"], help="dataset (default mnist1d)")
    d.add_argument("--width", type=int, default=None, help="tiny model width (default 4 for mnist1d, 12 for digits)")
    d.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    d.add_argument("--workers", type=int, default=2, help="training processes (default 2, one thread each)")
    d.add_argument("--out", default="fxexpand-demo", help="directory for demo.json and demo.png (default ./fxexpand-demo)")
    d.add_argument("--exits", action="store_true",
                   help="BoostNet's demo instead: boosted vs plain multi-exit training, anytime and budgeted curves")

    sub.add_parser(
        "bench",
        add_help=False,
        help="run the benchmark suite (source checkout; needs the bench extras); `fxexpand bench --help`",
        description=("Run benchmarks/run.py from the source checkout: inference latency vs ONNX optimisers, "
                     "RepVGG/DBB peers, compiler scaling and training overhead; writes JSON and PNG plots."),
    )
    return parser


def _benchmarks_dir() -> Path | None:
    """The source checkout's benchmarks/ directory (absent in a wheel install)."""
    d = Path(__file__).resolve().parent.parent / "benchmarks"
    return d if (d / "run.py").is_file() else None


def cmd_bench(argv: list[str]) -> int:
    bench_dir = _benchmarks_dir()
    if bench_dir is None:
        return _fail("fxexpand bench runs benchmarks/run.py from a source checkout, and no benchmarks/ directory "
                     "was found next to the installed package (a wheel install has none). Clone the repository, "
                     "`pip install -e '.[bench]'` and run `fxexpand bench` (or `python benchmarks/run.py`) there.")
    missing = [m for m in ("matplotlib",) if importlib.util.find_spec(m) is None]
    wants_help = any(a in ("-h", "--help") for a in argv)
    if missing and not wants_help:  # help needs only argparse: it works without the extras
        return _fail(f"fxexpand bench needs the bench extras ({', '.join(missing)} missing): "
                     "pip install -e '.[bench]'")
    spec = importlib.util.spec_from_file_location("fxexpand_bench_run", bench_dir / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    # escape(): a message may hold square brackets (pip extras, notes) that rich would read as markup
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]fxexpand: error:[/] {escape(msg)}")
    return code


# model names the CLI builds from a factory (an existing file of that name wins)
_FACTORY_PREFIXES = ("torchvision:", "timm:", "fxexpand:")


def _is_factory_name(spec: str) -> bool:
    return spec.startswith(_FACTORY_PREFIXES) and not os.path.exists(spec)


def _load_model(args):
    spec = args.model
    if _is_factory_name(spec):
        model = build_model(spec)
        return LoadedModel(model, spec, None)
    return load_file(spec, allow=args.allow_factory, trust_pickle=args.trust_pickle)


def cmd_contract(args) -> int:


    console = Console(stderr=False, highlight=False)
    out_path = export.check_output_path(args.output)
    if args.threads < 1 or args.runs < 1:
        return _fail("--threads and --runs must be at least 1")
    with console.status("loading model") as status:
        loaded = _load_model(args)
        model = loaded.model.eval()
        shape = args.input_shape or loaded.input_shape or [1, 3, 224, 224]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        status.update("tracing and contracting")
        small = api.contract(model, (x,), target=args.target, verify=not args.no_verify)
        report = small.fxexpand_report
        status.update("counting parameters and FLOPs")
        p_before, p_after = cost.count_parameters(model), cost.count_parameters(small)
        f_before, f_after = cost.count_flops(model, (x,)), cost.count_flops(small, (x,))
        status.update(f"exporting ONNX to {out_path}")
        export.export_onnx(small, (x,), out_path)
        lat = None
        if args.bench:
            with tempfile.TemporaryDirectory() as tmp:
                status.update("exporting the input model for comparison")
                ref_path = export.export_onnx(model, (x,), Path(tmp) / "input.onnx")
                status.update(f"timing both models in onnxruntime ({args.runs} runs each, alternating)")
                lat = bench.compare_onnx([ref_path, out_path], threads=args.threads, runs=args.runs)

    table = Table(title=f"fxexpand contract {loaded.source} (target={args.target}, input {tuple(shape)})")
    table.add_column("")
    table.add_column("input model", justify="right")
    table.add_column("contracted", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("parameters", f"{p_before:,}", f"{p_after:,}", f"{p_after / max(p_before, 1):.3f}")
    table.add_row("FLOPs", f"{f_before:,}", f"{f_after:,}", f"{f_after / max(f_before, 1):.3f}")
    if lat is not None:
        a, b = lat
        table.add_row(f"ORT latency median ms ({args.threads} thr)", f"{a.median_ms:.3f}", f"{b.median_ms:.3f}",
                      f"{b.median_ms / a.median_ms:.3f}")
        table.add_row("ORT latency p90 ms", f"{a.p90_ms:.3f}", f"{b.p90_ms:.3f}", f"{b.p90_ms / a.p90_ms:.3f}")
    else:
        table.add_row("ORT latency", "not measured (--bench)", "", "")
    if report.verification is not None:
        v = report.verification
        table.add_row("max abs error (float32 / float64)", "",
                      f"{v.max_abs_error('float32'):.2e} / {v.max_abs_error('float64'):.2e}", "")
        table.add_row("max rel error (float32 / float64)", "",
                      f"{v.max_rel_error('float32'):.2e} / {v.max_rel_error('float64'):.2e}", "")
    else:
        table.add_row("max abs error", "", "not verified (--no-verify)", "")
    table.add_row("folded / fused / removed / skipped", "",
                  f"{report._count('folded')} / {report._count('fused')} / {report._count('removed')} / "
                  f"{report._count('skipped')}", "")
    console.print(table)
    if args.report:
        for n in report.notes:
            console.print(f"  {n}", markup=False)
    console.print(f"wrote {out_path}", markup=False)
    return 0


def cmd_expand(args) -> int:


    console = Console(highlight=False)
    out = Path(args.output)

    check_output_path(out)
    if not 0.0 <= args.alpha <= 1.0:
        return _fail("--alpha must lie in [0, 1]")
    with console.status("building the model") as status:
        spec = args.model
        if _is_factory_name(spec):
            loaded = io.LoadedModel(io.build_model(spec), spec, None)
        else:
            loaded = io.load_file(spec, allow=args.allow_factory)
        model = loaded.model
        if get_record(model, ModelFactory) is None:
            return _fail(f"{spec} does not record how to rebuild its architecture; expand a "
                         "torchvision:/timm:/fxexpand: "
                         "model or a file written by fxexpand.save()")
        shape = args.input_shape or loaded.input_shape or [1, 3, 224, 224]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        status.update(f"expanding with recipe {args.recipe}")
        expanded = api.compile(model, passes=get_recipe(args.recipe), example_inputs=(x,))
        if schedule.decay_modules(expanded):
            schedule.set_decay(expanded, args.alpha)
        status.update("measuring original, expanded and contracted models")
        rep = report.expansion_report(model.eval(), expanded.eval(), (x,))
        status.update(f"saving {out}")
        io.save(expanded, out, input_shape=shape)
    console.print(report.report_table(rep, title=escape(f"fxexpand expand {loaded.source} --recipe {args.recipe}")))
    console.print(f"expanded {len(rep['expanded_layers'])} layers: {', '.join(rep['expanded_layers'][:12])}"
                  + (" ..." if len(rep["expanded_layers"]) > 12 else ""), markup=False)
    console.print(f"{len(rep['not_expanded'])} layers not expanded (see fxexpand.expansion_report for reasons)",
                  markup=False)
    console.print(f"wrote {out}", markup=False)
    return 0


def cmd_demo(args) -> int:
    """``fxexpand demo``: see :mod:`fxexpand.demo`."""

    for name in ("seeds", "epochs", "batch_size", "workers", "width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    console = Console(highlight=False, width=max(Console().width, 160))
    if args.exits:
        rep = early_exits.run(seeds=args.seeds or (demo.FULL_SEEDS if args.full else 3), epochs=args.epochs,
                              workers=args.workers, width=args.width or 4, tune=args.tune or args.full,
                              progress=lambda m: console.print(m, markup=False))
        console.print(early_exits.table(rep))
        paths = early_exits.write_outputs(rep, args.out)
        console.print(f"wrote {', '.join(map(str, paths))}", markup=False)
        return 0
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "workers": args.workers,
                 "dataset": args.dataset, "width": args.width or (4 if args.dataset == "mnist1d" else 12)}
    if methods:
        overrides["methods"] = methods
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.tune:
        overrides["tune"] = True
    cfg = demo.full_config(**overrides) if args.full else demo.DemoConfig(**overrides)
    cfg.check()
    if not args.full:
        console.print(f"short run: {cfg.seeds} seeds, learning rates from the documented run "
                      f"({'tuned now' if cfg.tune else 'not tuned now'}); `fxexpand demo --full` reproduces "
                      f"docs/demo.md (10 seeds, tuning)", markup=False)
    rep = demo.run_demo(cfg, progress=lambda m: console.print(m, markup=False))
    console.print(demo.results_table(rep))
    for line in demo.reading(rep):
        console.print(line, markup=False)
    paths = demo.write_outputs(rep, args.out)
    console.print(f"wrote {', '.join(map(str, paths))} in {rep.seconds / 60:.1f} min", markup=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "bench" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)

    try:
        if args.command == "contract":
            return cmd_contract(args)
        if args.command == "expand":
            return cmd_expand(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "bench":
            return cmd_bench(extra)
    except FxExpandError as e:
        if args.debug:
            traceback.print_exc()
        return _fail(f"{e}")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # a bug in fxexpand, not bad input
        if args.debug:
            traceback.print_exc()
        return _fail(f"internal error ({type(e).__name__}: {e}). This is a bug in fxexpand; rerun with --debug "
                     "for a traceback and report it.", EXIT_INTERNAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
