#!/usr/bin/env python
"""Where ONNX export time goes as graphs grow, and whether it is fxexpand's.

The suite's scaling section finds ``export`` (``fxexpand.export_onnx`` of a contracted chain) growing
faster than linearly. This script splits that stage on the same chains (bench_scaling's
``conv_bn_relu``, contracted to target "deploy": n x [Conv 3x3 -> ReLU]) into its parts:

* ``torchscript_export``: ``torch.onnx.export(..., dynamo=False)`` of the contracted GraphModule
  (the exporter fxexpand.export_onnx uses);
* ``torchscript_export_plain``: the same exporter on a plain ``nn.Sequential`` of the same layers that
  fxexpand never touched (is the growth fxexpand's GraphModule, or the exporter's?);
* ``dynamo_export`` (sizes up to ``--dynamo-max``): the torch.export-based exporter, the alternative;
* ``onnx_checker_full``, ``ort_session``, ``ort_run``: the checks export_onnx runs after exporting;
* ``fxexpand_export_onnx``: the whole fxexpand.export_onnx call.

One run per stage and size (the big sizes take minutes), torch threads 1, log-log slopes between
sizes. Writes ``benchmarks/results/export_breakdown.json`` and prints a table.
Usage: ``python benchmarks/export_breakdown.py [--sizes 100,1000,3000,10000] [--dynamo-max 1000]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_scaling as bs  # noqa: E402
import torch  # noqa: E402
from _common import loadavg, machine_info  # noqa: E402
from torch import nn  # noqa: E402

import fxexpand  # noqa: E402
from fxexpand.testing import randomize_bn  # noqa: E402


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(n: int, dynamo_max: int, tmp: Path) -> dict[str, float]:
    import onnx
    import onnxruntime as ort

    x = torch.randn(1, bs.C, bs.SIDE, bs.SIDE, generator=torch.Generator().manual_seed(1))
    chain = randomize_bn(bs._scale_init(bs.ConvBNReLUChain(n)), n).eval()
    deployed = fxexpand.contract(chain, (x,), target="deploy", verify=False)
    plain = nn.Sequential(*[m for m in deployed.modules() if isinstance(m, (nn.Conv2d, nn.ReLU))]).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), deployed(x), rtol=1e-4, atol=1e-5), "plain copy differs"
    f = str(tmp / f"chain_{n}.onnx")
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torchscript_export"] = _t(lambda: torch.onnx.export(deployed, (x,), f, dynamo=False))
        out["onnx_checker_full"] = _t(lambda: onnx.checker.check_model(f, full_check=True))
        holder = {}
        out["ort_session"] = _t(lambda: holder.setdefault("s", ort.InferenceSession(f, providers=["CPUExecutionProvider"])))
        s = holder["s"]
        out["ort_run"] = _t(lambda: s.run(None, {s.get_inputs()[0].name: x.numpy()}))
        del s, holder
        out["torchscript_export_plain"] = _t(lambda: torch.onnx.export(plain, (x,), f, dynamo=False))
        if n <= dynamo_max:
            out["dynamo_export"] = _t(lambda: torch.onnx.export(deployed, (x,), f, dynamo=True, external_data=False,
                                                                verbose=False))
    out["fxexpand_export_onnx"] = _t(lambda: fxexpand.export_onnx(deployed, (x,), tmp / f"fx_{n}.onnx"))
    out["graph_nodes"] = len(deployed.graph.nodes)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,3000,10000")
    ap.add_argument("--dynamo-max", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "export_breakdown.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the dynamo exporter's progress messages
    sizes = [int(s) for s in a.sizes.split(",")]
    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            r = measure(n, a.dynamo_max, Path(tmp))
            rows.append({"n": n, **r})
            print(f"n={n}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
                  flush=True)
    machine["loadavg_end"] = loadavg()
    stages = [k for k in rows[0] if k not in ("n", "graph_nodes")]
    slopes = {}
    for st in stages:
        pts = [(r["n"], r[st]) for r in rows if st in r]
        slopes[st] = {f"{p[0]}->{q[0]}": math.log(q[1] / p[1]) / math.log(q[0] / p[0]) for p, q in zip(pts, pts[1:])}
    doc = {"machine": machine, "sizes": sizes, "rows": rows, "pairwise_slopes": slopes}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    head = ["stage"] + [f"n={n} (s)" for n in sizes] + ["slopes between sizes"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for st in stages:
        cells = [f"{r[st]:.3f}" if st in r else "-" for r in rows]
        lines.append("| " + " | ".join([st] + cells + [", ".join(f"{v:.2f}" for v in slopes[st].values())]) + " |")
    table = "\n".join(lines)
    a.out.with_suffix(".md").write_text(f"`python benchmarks/export_breakdown.py --sizes {a.sizes} --dynamo-max "
                                        f"{a.dynamo_max}`, load average {machine['loadavg_start']} -> "
                                        f"{machine['loadavg_end']}, fxexpand @ {machine['git_commit']}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
