"""Survey which torchvision classification models ``fxexpand.trace`` can trace.

For every classification model in ``torchvision.models`` (``list_models(module=torchvision.models)``)
this builds the model with random weights (``weights=None``), calls :func:`fxexpand.trace` and
records ok / failed with the first line of the :class:`fxexpand.TraceError`. For models that trace
it then runs ``fxexpand.contract(model.eval(), (x,), target="deploy")`` (which verifies the result
against the original model) and records whether that succeeded, how many BatchNorms were folded,
the verification error and the time it took. Contraction runs on weights prepared to make the check
meaningful (see :func:`prepare_weights`; ``--raw-weights`` to skip). When only the float32 check fails
(the float64 twin agrees), the model is reported as "failed: float32 tolerance" together with the
original model's own float32 error, and contraction is retried with ``rtol=1e-3``.

Usage::

    python benchmarks/trace_survey.py                       # every model (about 7 min, one CPU thread)
    python benchmarks/trace_survey.py --models resnet18 vit_b_16
    python benchmarks/trace_survey.py --no-contract         # tracing only (about 2 min)
    python benchmarks/trace_survey.py --from-json benchmarks/results/trace_survey.json --markdown -

Results are printed as a table and written to ``benchmarks/results/trace_survey.json``
(``--output`` to change). Models over ``--max-contract-params`` (150M by default) are traced but not
contracted ("skipped: too large").

Input sizes: transformer models (``vit_*``, ``swin_*``, ``maxvit_t``) need 224x224 and
``inception_v3`` is run at its native 299x299. Every other (convolutional) model is first tried at
``--small-size`` (64) to keep the run time low; if the model fails on that input in eager mode, 224
is used instead.

Rendering of the table in docs/tracing.md: ``--from-json benchmarks/results/trace_survey.json --markdown -``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxexpand
from fxexpand.core import flatten_outputs
from fxexpand.testing import rel_error

RESULTS = Path(__file__).resolve().parent / "results" / "trace_survey.json"

# Models whose input size is fixed or constrained; everything else tries the small size first.
FIXED_SIZE_PREFIXES = {"vit_": 224, "swin_": 224, "maxvit_": 224}
FIXED_SIZE = {"inception_v3": 299}
DEFAULT_SIZE = 224
RTOL = 1e-4  # fxexpand.contract's default float32 tolerance
RETRY_RTOL = 1e-3  # retried with this when only the float32 check failed


def classification_models() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


def input_sizes(name: str, small: int) -> list[int]:
    """Input sizes to try for ``name``, in order."""
    if name in FIXED_SIZE:
        return [FIXED_SIZE[name]]
    for prefix, size in FIXED_SIZE_PREFIXES.items():
        if name.startswith(prefix):
            return [size]
    return [small, DEFAULT_SIZE] if small and small != DEFAULT_SIZE else [DEFAULT_SIZE]


def first_line(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    msg = f"{type(e).__name__}: {line}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def build(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet / inception_v3 init-weights FutureWarnings
        return torchvision.models.get_model(name, weights=None)


def pick_size(model: torch.nn.Module, sizes: list[int]) -> tuple[int | None, str]:
    """The first input size in ``sizes`` that ``model`` (in eval mode) accepts."""
    model.eval()
    err = ""
    for size in sizes:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size, ""
        except Exception as e:  # noqa: BLE001 - too small for this model: try the next size
            err = first_line(e)
    return None, err


def prepare_weights(model: torch.nn.Module, size: int, seed: int) -> str:
    """Make the random-init model a meaningful test of contraction; returns what was done.

    Freshly built torchvision models are degenerate test cases: every BatchNorm has running mean 0,
    variance 1, weight 1 and bias 0 (folding it is almost the identity, so a fold that dropped the
    mean or the bias would still pass), some heads are zero-initialised (ViT: the output is
    identically 0), and several families produce outputs of 1e-9..1e-15 or 1e+12 in eval mode, where
    a tolerance alone decides (fxexpand's default atol is now 0, but callers may pass one). So: re-initialise all-zero weights with
    the layer's default init, draw BatchNorm weight from U(0.5, 1.5) and bias from N(0, 0.1), then
    calibrate the BatchNorm statistics on random data (cumulative average over three train-mode
    batches of 4), which keeps the outputs of order 1.
    """
    done = []
    gen = torch.Generator().manual_seed(seed + 1)
    zeroed = [m for m in model.modules()
              if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and hasattr(m, "reset_parameters")
              and not bool(m.weight.detach().any())]
    for m in zeroed:
        m.reset_parameters()
    if zeroed:
        done.append(f"re-initialised {len(zeroed)} all-zero layer(s)")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        with torch.no_grad():
            # affine parameters first, *then* the statistics: calibrating last keeps every layer
            # normalised (randomising gamma after calibration compounds through depth and makes the
            # squeeze-excitation families ill-conditioned in float32)
            for m in bns:
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        saved = [(m, m.momentum) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(4, 3, size, size, generator=gen))
        for m, mom in saved:
            m.momentum = mom
        done.append(f"randomised affine + calibrated statistics of {len(bns)} BatchNorm(s)")
    model.eval()
    return "; ".join(done) or "as built"


def float32_noise(model: torch.nn.Module, x: torch.Tensor, trials: int = 3) -> float:
    """The *original* model's own float32 error: max over verify()'s trial inputs of
    max|f32(model)(x) - f64(model)(x)| / max|f64 output|."""
    import copy


    gen = torch.Generator().manual_seed(0 + 1_000_003)  # the inputs fxexpand.verify(seed=0) uses
    inputs = [x] + [torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(trials - 1)]
    m64 = copy.deepcopy(model).double().eval()
    worst = 0.0
    with torch.no_grad():
        for xi in inputs:
            out32 = flatten_outputs(model.eval()(xi))
            out64 = flatten_outputs(m64(xi.double()))
            for (_, a), (_, b) in zip(out32, out64):
                worst = max(worst, rel_error(b, a))
    del m64
    return worst

def _record_report(rec: dict[str, Any], small_model: torch.nn.Module, keep_errors: bool = False) -> None:
    """Copy the contraction report of ``small_model`` into ``rec``."""
    report = small_model.fxexpand_report
    rec["folded_bn"] = report._count("folded")
    rec["fused"] = report._count("fused")
    rec["removed"] = report._count("removed")
    rec["skipped_sites"] = report._count("skipped")
    ver = report.verification
    if ver is not None and not keep_errors:
        rec["max_abs_error_f32"] = ver.max_abs_error(precision="float32")
        rec["max_rel_error_f32"] = ver.max_rel_error(precision="float32")
        rec["max_abs_error_f64"] = ver.max_abs_error(precision="float64")
        rec["max_rel_error_f64"] = ver.max_rel_error(precision="float64")
        # max|reference output|: a check on outputs far below any absolute tolerance proves little
        rec["output_scale"] = max((o.scale for o in ver.outputs if o.precision == "float32"), default=0.0)
    rec["contracted_params_M"] = round(sum(p.numel() for p in small_model.parameters()) / 1e6, 3)


def contract_record(rec: dict[str, Any], model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module | None:
    """``fxexpand.contract(model, (x,), target="deploy")`` (``model`` in eval mode), recorded in ``rec``:
    "ok" with the report's counts and errors, "failed" with the reason (and, for an
    :class:`~fxexpand.EquivalenceError`, both precisions' errors and the original model's own float32
    noise), or "failed: float32 tolerance" when only the float32 check failed (then retried at
    ``RETRY_RTOL``). Returns the contracted model, or None. Shared with ``timm_survey.py``."""
    t0 = time.perf_counter()
    small_model = None
    try:
        small_model = fxexpand.contract(model, (x,), target="deploy", rtol=RTOL)
    except Exception as e:  # noqa: BLE001 - record and carry on
        rec["contract"] = "failed"
        rec["contract_reason"] = first_line(e)
        rec["contract_traceback"] = traceback.format_exc(limit=-6)
        if isinstance(e, fxexpand.EquivalenceError) and e.report is not None:
            rep = e.report
            f64_ok = all(o.ok for o in rep.outputs if o.precision == "float64")
            rec["verify_f64_passed"] = f64_ok
            rec["max_rel_error_f32"] = rep.max_rel_error(precision="float32")
            rec["max_rel_error_f64"] = rep.max_rel_error(precision="float64")
            rec["output_scale"] = max((o.scale for o in rep.outputs if o.precision == "float32"), default=0.0)
            # how far the *original* model's float32 output is from its float64 output
            rec["reference_f32_noise_rel"] = float32_noise(model, x)
            if f64_ok:
                # the algebra is exact (float64 twin agrees): only float32 rounding exceeded rtol.
                # Does contraction pass with a looser float32 tolerance?
                rec["contract"] = "failed: float32 tolerance"
                try:
                    retry = fxexpand.contract(model, (x,), target="deploy", rtol=RETRY_RTOL)
                except Exception as e2:  # noqa: BLE001
                    rec["retry_reason"] = first_line(e2)
                else:
                    rec["passes_at_rtol"] = RETRY_RTOL
                    _record_report(rec, retry, keep_errors=True)
                    del retry
    else:
        rec["contract"] = "ok"
        _record_report(rec, small_model)
    rec["contract_s"] = round(time.perf_counter() - t0, 2)
    return small_model


def survey_one(name: str, *, contract: bool, max_params: float, small: int, seed: int,
               realistic: bool = True) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": name}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        model = build(name)
    except Exception as e:  # noqa: BLE001 - record and carry on
        rec.update(trace="error", trace_reason=f"could not build: {first_line(e)}", contract="skipped: build failed")
        return rec
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    n_params = sum(p.numel() for p in model.parameters())
    rec["params_M"] = round(n_params / 1e6, 3)
    rec["num_batchnorms"] = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    # -- trace -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    try:
        gm = fxexpand.trace(model)
        rec["trace"] = "ok"
        rec["trace_reason"] = ""
        rec["graph_nodes"] = len(gm.graph.nodes)
        del gm
    except fxexpand.TraceError as e:
        rec["trace"] = "failed"
        rec["trace_reason"] = first_line(e)
    except Exception as e:  # noqa: BLE001 - anything but TraceError would itself be worth reporting
        rec["trace"] = "error"
        rec["trace_reason"] = f"unexpected {first_line(e)}"
    rec["trace_s"] = round(time.perf_counter() - t0, 3)

    # -- contract --------------------------------------------------------------------------
    if rec["trace"] != "ok":
        rec["contract"] = "skipped: trace failed"
    elif not contract:
        rec["contract"] = "skipped: --no-contract"
    elif n_params > max_params:
        rec["contract"] = "skipped: too large"
    else:
        size, err = pick_size(model, input_sizes(name, small))
        if size is None:
            rec["contract"] = "failed"
            rec["contract_reason"] = f"model rejects every input size tried: {err}"
        else:
            rec["input_size"] = size
            if realistic:
                rec["weights"] = prepare_weights(model, size, seed)
            model.eval()
            # not torch.manual_seed(seed): verify() draws its random trials from a generator seeded
            # with 0, and the example input should not repeat one of them
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1000))
            contract_record(rec, model, x)  # the contracted model is dropped at once
    del model
    gc.collect()
    return rec


def reason_text(r: dict[str, Any]) -> str:
    """One line explaining a failure (trace or contraction)."""
    if r.get("trace_reason"):
        return r["trace_reason"]
    if r.get("contract") == "failed: float32 tolerance":
        text = (f"float32 rel. error {r['max_rel_error_f32']:.1e} > rtol {RTOL:.0e}, but the original model's own "
                f"float32 error is {r['reference_f32_noise_rel']:.1e} and the float64 check agrees to "
                f"{r['max_rel_error_f64']:.0e}")
        if "passes_at_rtol" in r:
            text += f"; passes with rtol={r['passes_at_rtol']:.0e}"
        elif "retry_reason" in r:
            text += f"; rtol={RETRY_RTOL:g} also fails: {r['retry_reason']}"
        return text
    return r.get("contract_reason", "")


def print_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fxexpand.trace survey (torch {torch.__version__}, torchvision {torchvision.__version__})")
    for col, kw in [("model", {}), ("params (M)", {"justify": "right"}), ("trace", {}), ("nodes", {"justify": "right"}),
                    ("input", {"justify": "right"}), ("contract", {}), ("BN folded", {"justify": "right"}),
                    ("max rel err", {"justify": "right"}), ("seconds", {"justify": "right"}), ("reason", {})]:
        table.add_column(col, **kw)
    for r in records:
        trace_ok = r.get("trace") == "ok"
        contract = r.get("contract", "")
        style = "green" if contract == "ok" else ("red" if (not trace_ok or contract.startswith("failed"))
                                                  else "yellow")
        err = r.get("max_rel_error_f32")
        table.add_row(
            r["model"],
            f"{r['params_M']:.1f}" if "params_M" in r else "",
            r.get("trace", ""),
            str(r.get("graph_nodes", "")),
            str(r.get("input_size", "")) if contract not in ("",) and not contract.startswith("skipped") else "",
            f"[{style}]{contract}[/{style}]",
            str(r.get("folded_bn", "")),
            f"{err:.1e}" if err is not None else "",
            f"{r['contract_s']:.1f}" if "contract_s" in r else "",
            reason_text(r),
        )
    Console(width=max(160, Console().width)).print(table)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The survey as a Markdown table (the one in docs/tracing.md)."""
    lines = ["| model | params (M) | traced | graph nodes | contract (deploy) | input | BN folded / BN | "
             "max rel err (f32) | contract s | reason |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---|"]
    for r in records:
        traced = "yes" if r.get("trace") == "ok" else "**no**"
        contract = r.get("contract", "")
        done = not contract.startswith("skipped")
        err = r.get("max_rel_error_f32")
        reason = reason_text(r).replace("|", "\\|")
        lines.append("| " + " | ".join([
            f"`{r['model']}`",
            f"{r['params_M']:.1f}" if "params_M" in r else "",
            traced,
            str(r.get("graph_nodes", "")),
            contract if contract == "ok" else (f"**{contract}**" if done else contract),
            str(r.get("input_size", "")) if done else "",
            f"{r.get('folded_bn', '')} / {r.get('num_batchnorms', '')}" if "folded_bn" in r else "",
            f"{err:.1e}" if (err is not None and done) else "",
            f"{r['contract_s']:.1f}" if "contract_s" in r else "",
            reason,
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(records: list[dict[str, Any]], path: Path | None) -> None:
    if path is None:
        return
    text = markdown_table(records)
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        path.write_text(text)


def git_state() -> dict[str, Any]:
    """The commit the survey ran on, and fxexpand files with uncommitted changes (if any)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fxexpand"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except Exception:  # noqa: BLE001 - not a git checkout
        return {}
    return {"commit": head, "uncommitted_fxexpand_changes": [line[3:] for line in dirty if line.strip()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", metavar="NAME", help="only these models (default: all classification models)")
    ap.add_argument("--no-contract", action="store_true", help="trace only; skip fxexpand.contract")
    ap.add_argument("--no-contract-for", nargs="+", default=[], metavar="NAME",
                    help="trace these models but do not contract them")
    ap.add_argument("--max-contract-params", type=float, default=150e6,
                    help="skip contraction above this many parameters (default 150e6)")
    ap.add_argument("--small-size", type=int, default=64,
                    help="input size tried first for convnets (default 64; 224 = always full size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw-weights", action="store_true",
                    help="contract the models exactly as built (default: calibrate/randomise BatchNorms and "
                         "re-initialise zero heads first, see prepare_weights)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a small shared machine more threads than free "
                         "cores make OpenMP spin and some float64 convolutions run 100x slower)")
    ap.add_argument("--output", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    ap.add_argument("--markdown", type=Path, metavar="PATH",
                    help="also write the results as a Markdown table to PATH ('-' for stdout)")
    ap.add_argument("--from-json", type=Path, metavar="PATH",
                    help="do not run anything: print (and with --markdown, render) the results stored in PATH")
    args = ap.parse_args(argv)

    if args.from_json is not None:
        records = json.loads(args.from_json.read_text())["results"]
        if args.models:
            records = [r for r in records if r["model"] in args.models]
        print_table(records)
        write_markdown(records, args.markdown)
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    all_models = classification_models()
    names = all_models
    if args.models:
        unknown = [m for m in args.models if m not in all_models]
        if unknown:
            ap.error(f"not torchvision classification models: {', '.join(unknown)}")
        names = list(args.models)

    records = []
    started = time.perf_counter()
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        rec = survey_one(name, contract=not args.no_contract and name not in args.no_contract_for,
                         max_params=args.max_contract_params, small=args.small_size, seed=args.seed,
                         realistic=not args.raw_weights)
        if name in args.no_contract_for and rec.get("contract") == "skipped: --no-contract":
            rec["contract"] = "skipped: --no-contract-for"
        rec["total_s"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        print(f"[{i}/{len(names)}] {name}: trace={rec.get('trace')} contract={rec.get('contract')} "
              f"folded={rec.get('folded_bn', '-')} ({rec['total_s']:.1f}s)"
              + (f"  {rec.get('trace_reason') or rec.get('contract_reason')}"
                 if rec.get('trace_reason') or rec.get('contract_reason') else ""),
              file=sys.stderr, flush=True)
        gc.collect()

    print_table(records)
    write_markdown(records, args.markdown)
    summary = {
        "models": len(records),
        "traced": sum(r.get("trace") == "ok" for r in records),
        "trace_failed": [r["model"] for r in records if r.get("trace") != "ok"],
        "contracted": sum(r.get("contract") == "ok" for r in records),
        "contract_failed": [r["model"] for r in records if r.get("contract") == "failed"],
        "contract_failed_float32_tolerance_only": [r["model"] for r in records
                                                   if r.get("contract") == "failed: float32 tolerance"],
        "contract_skipped": [r["model"] for r in records if r.get("contract", "").startswith("skipped")],
    }
    out = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fxexpand": fxexpand.__version__,
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "benchmarks/trace_survey.py", *(argv if argv is not None else sys.argv[1:])]),
        "options": {"contract": not args.no_contract, "no_contract_for": args.no_contract_for,
                    "max_contract_params": args.max_contract_params, "small_size": args.small_size,
                    "seed": args.seed, "threads": args.threads,
                    "raw_weights": args.raw_weights},
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": summary,
        "results": records,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"traced {summary['traced']}/{summary['models']}; contracted {summary['contracted']}; "
          f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
