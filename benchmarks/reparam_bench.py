"""fxexpand's generic contraction against timm's hand-written re-parameterisation (issue 16).

For each timm model (``pretrained=False``, every BatchNorm's running statistics and affine
parameters randomised, eval mode, input 1x3xSxS, S = 128 by default):

* **fxexpand**: ``fxexpand.contract(model, x, target="deploy", verify=False)``;
* **timm**: ``timm.utils.model.reparameterize_model(model)`` (each block's own ``reparameterize()``
  / ``fuse()`` / ``switch_to_deploy()``, on a copy, as fxexpand's ``contract`` works on a copy);

and compared on

* onnxruntime latency (1 intra-op thread, both ONNX files timed *alternately*, ``--blocks`` blocks
  of ``--runs`` runs after warm-up, which file goes first alternating between blocks; the ratio
  fxexpand / timm of each block's medians, and the median of those ratios);
* parameters, ``nn.Conv2d`` modules and ONNX ``Conv`` nodes left;
* error against the train-time model: float64 (the same contraction of a float64 copy; relative to
  the output's largest magnitude) and float32;
* contraction time: ``contract(..., verify=False)`` against ``reparameterize_model`` (alternately,
  ``--rounds`` rounds, which goes first alternating; medians and their ratio), and the verification's
  own time: ``contract(verify=True)`` minus ``contract(verify=False)``, alternated in rounds of their
  own afterwards (a verified contraction, with its float64 twin, leaves a large heap that slows
  whatever is timed next, so it is kept out of the fxexpand / timm pairs). A full ``gc.collect()``
  precedes every timed call (untimed), so neither side pays for the other's garbage.

    python benchmarks/reparam_bench.py                   # the five parity models, ~10 min on 2 busy cores
    python benchmarks/reparam_bench.py --family          # + other members of those families
    python benchmarks/reparam_bench.py --quick           # one small model, a smoke run

Writes ``benchmarks/results/reparam_bench.json`` and ``.md`` (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, loadavg, machine_info, machine_line, onnx_summary  # noqa: E402

import fxexpand  # noqa: E402
from fxexpand.testing import randomize_bn, rel_error  # noqa: E402

PARITY = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m0_9"]
FAMILY = ["repvgg_a1", "mobileone_s1", "fastvit_t12", "repghostnet_100", "repvit_m1_0", "ghostnetv3_050",
          "shvit_s1"]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _convs(m: nn.Module) -> int:
    return sum(isinstance(q, nn.Conv2d) for q in m.modules())


def _timed(fn):
    gc.collect()  # neither side pays for garbage the other left (contract pauses the collector inside)
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _model(timm, name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False)).eval()


def bench_model(timm, name: str, side: int, rounds: int, runs: int, blocks: int, tmp: Path) -> dict:
    model = _model(timm, name)
    x = torch.randn(1, 3, side, side)
    contract = lambda verify: fxexpand.contract(model, (x,), target="deploy", verify=verify)  # noqa: E731
    reparam = lambda: timm.utils.model.reparameterize_model(model)  # noqa: E731 - a copy (inplace=False)
    contract(False)  # warm-up: oneDNN primitives, lazy imports
    reparam()
    t_fx, t_timm, t_verify, t_fx2 = [], [], [], []
    small = deployed = None
    for r in range(rounds):  # fxexpand and timm alternately, the first of the pair alternating
        order = [("fx", lambda: contract(False)), ("timm", reparam)]
        for kind, fn in (order if r % 2 == 0 else order[::-1]):
            out, t = _timed(fn)
            if kind == "fx":
                t_fx.append(t)
                small = out
            else:
                t_timm.append(t)
                deployed = out
    # the verification's own time: contract(verify=True) and contract(verify=False) alternately, in
    # their own rounds (a verified contraction leaves a large heap behind that would slow whatever
    # is timed after it, so it is kept out of the fxexpand / timm pairs above)
    for r in range(max(3, rounds // 2)):
        order = [("verify", lambda: contract(True)), ("fx", lambda: contract(False))]
        for kind, fn in (order if r % 2 == 0 else order[::-1]):
            out, t = _timed(fn)
            (t_verify if kind == "verify" else t_fx2).append(t)
            if kind == "verify":
                report = out.fxexpand_report
    t_fx_med, t_timm_med, t_ver_med = (statistics.median(t) for t in (t_fx, t_timm, t_verify))
    t_fx2_med = statistics.median(t_fx2)

    # exactness: float64 (the same contraction of a float64 copy) and float32, against the train-time model
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    small64 = fxexpand.contract(m64, (x64,), target="deploy", verify=False)
    with torch.no_grad():
        y64, y = m64(x64), model(x)
        err = {"fx_float64": rel_error(y64, small64(x64)), "timm_float64": None,
               "fx_float32": rel_error(y, small(x)), "timm_float32": rel_error(y, deployed(x))}
        try:
            err["timm_float64"] = rel_error(y64, timm.utils.model.reparameterize_model(m64)(x64))
        except RuntimeError as e:  # e.g. RepViT's fuse() builds float32 tensors for a float64 model
            err["timm_float64_failed"] = f"{type(e).__name__}: {e}"

    # onnxruntime, alternately
    p_fx, p_timm = tmp / f"{name}_fxexpand.onnx", tmp / f"{name}_timm.onnx"
    fxexpand.export_onnx(small, (x,), p_fx)
    fxexpand.export_onnx(deployed, (x,), p_timm)
    ratios, lat_fx, lat_timm = [], [], []
    for i in range(blocks):  # the order inside a block alternates too (the first session may be favoured)
        pair = [p_fx, p_timm] if i % 2 == 0 else [p_timm, p_fx]
        a, b = fxexpand.compare_onnx(pair, threads=1, warmup=5, runs=runs)
        if i % 2:
            a, b = b, a
        lat_fx.append(a.median_ms)
        lat_timm.append(b.median_ms)
        ratios.append(a.median_ms / b.median_ms)
    ox_fx, ox_timm = onnx_summary(p_fx), onnx_summary(p_timm)
    skipped = [str(n) for n in report.skipped]
    return {
        "latency_ratio": statistics.median(ratios), "latency_ratios": ratios,
        "latency_ms_fxexpand": statistics.median(lat_fx), "latency_ms_timm": statistics.median(lat_timm),
        "params": {"train": _params(model), "fxexpand": _params(small), "timm": _params(deployed)},
        "conv_modules": {"train": _convs(model), "fxexpand": _convs(small), "timm": _convs(deployed)},
        "onnx_conv": {"fxexpand": ox_fx["ops"].get("Conv", 0), "timm": ox_timm["ops"].get("Conv", 0)},
        "onnx_nodes": {"fxexpand": ox_fx["nodes"], "timm": ox_timm["nodes"]},
        "onnx_ops": {"fxexpand": ox_fx["ops"], "timm": ox_timm["ops"]},
        "rel_error": err,
        "time_s": {"contract_verify_false": t_fx_med, "timm_reparameterize": t_timm_med,
                   "contract_verify_true": t_ver_med, "verification": max(t_ver_med - t_fx2_med, 0.0),
                   "ratio": t_fx_med / t_timm_med,
                   "round_ratios": [a / b for a, b in zip(t_fx, t_timm)],
                   "all": {"fxexpand": t_fx, "timm": t_timm, "verify": t_verify, "fxexpand_beside_verify": t_fx2}},
        "verification_passed": report.verification.passed if report.verification is not None else None,
        "skipped_sites": len(skipped), "skipped_examples": skipped[:5],
    }


def _e(v) -> str:
    return "fails" if v is None else f"{v:.1e}"


def table(res: dict) -> str:
    head = ("| model | latency fxexpand / timm (median of blocks) | fxexpand ms | timm ms | params fxexpand / timm "
            "| Conv fxexpand / timm (ONNX) | float64 error fxexpand (timm) | float32 error fxexpand (timm) "
            "| contract(verify=False) s | timm reparam s | time ratio | verification s |")
    rows = [head, "|" + "---|" * 12]
    for name, r in res["models"].items():
        e, t = r["rel_error"], r["time_s"]
        rows.append(
            f"| {name} | {r['latency_ratio']:.2f} ({', '.join(f'{v:.2f}' for v in r['latency_ratios'])}) "
            f"| {r['latency_ms_fxexpand']:.2f} | {r['latency_ms_timm']:.2f} "
            f"| {r['params']['fxexpand'] / 1e6:.3f} M / {r['params']['timm'] / 1e6:.3f} M "
            f"| {r['onnx_conv']['fxexpand']} / {r['onnx_conv']['timm']} "
            f"| {e['fx_float64']:.1e} ({_e(e['timm_float64'])}) | {e['fx_float32']:.1e} ({e['timm_float32']:.1e}) "
            f"| {t['contract_verify_false']:.2f} | {t['timm_reparameterize']:.2f} | {t['ratio']:.2f} "
            f"| {t['verification']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--family", action="store_true", help="also other members of the families")
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=150)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import timm  # the benchmark's subject; imported here so --help works without it

    models = args.models or (PARITY + (FAMILY if args.family else []))
    if args.quick:
        models, args.side, args.rounds, args.runs, args.blocks = ["repvgg_a0"], 64, 1, 5, 1
    torch.set_num_threads(1)
    res = {"machine": machine_info(timm=timm.__version__, side=args.side, rounds=args.rounds, runs=args.runs,
                                   blocks=args.blocks),
           "command": "python benchmarks/reparam_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "models": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in models:
            t0 = time.perf_counter()
            res["models"][name] = bench_model(timm, name, args.side, args.rounds, args.runs, args.blocks, Path(d))
            r = res["models"][name]
            print(f"{name}: latency ratio {r['latency_ratio']:.2f}, params {r['params']['fxexpand']} / "
                  f"{r['params']['timm']}, time ratio {r['time_s']['ratio']:.1f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    res["machine"]["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "reparam_bench_quick" if args.quick else "reparam_bench"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = f"{machine_line(res['machine'])}, timm {timm.__version__}\n\n`{res['command']}`\n\n{table(res)}\n"
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
