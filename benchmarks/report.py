"""Markdown tables and matplotlib plots from a suite results file (no measuring here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEFORE_FIX = HERE / "results" / "scaling_before_fix.json"
VAR_LABEL = {"original": "(a) original", "expanded": "(b) expanded a=1", "onnxslim": "(c) onnxslim",
             "onnxsim": "(c) onnxsim", "contracted": "(d) contracted", "deploy": "(e) deploy"}


def _table(head: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _m(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def _g(x: float) -> str:
    return f"{x / 1e9:.3f} G" if x >= 1e8 else f"{x / 1e6:.1f} M"


def machine_line(m: dict) -> str:
    return (f"{m['cpu_model']} ({m['cpu_count']} logical CPUs), {m['platform']}, Python {m['python']}, torch {m['torch']}, "
            f"torchvision {m['torchvision']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, "
            + ", ".join(f"{k} {v}" for k, v in m.get("optional_tools", {}).items())
            + f"; torch threads {m['torch_num_threads']}, onnxruntime threads {m.get('ort_threads')}; fxexpand {m['fxexpand']}"
            + (f" @ {m['git_commit']}" if m.get("git_commit") else "") + f"; {m['date']}; load average (1/5/15 min) "
            f"at start {'/'.join(map(str, m.get('loadavg_start') or []))}, at end {'/'.join(map(str, m.get('loadavg_end') or []))}")


def markdown(doc: dict, out_dir: Path, name: str, for_docs: bool = False) -> str:
    s, cfg = doc["sections"], doc["config"]
    img_dir = os.path.relpath(HERE / "results", out_dir) if for_docs else "."
    L: list[str] = [f"Run `{name}`: {machine_line(doc['machine'])}. Total wall time {doc['wall_s'] / 60:.1f} min.", ""]
    if doc.get("merged_from"):
        L += ["Merged from processes that ran concurrently on the same machine: " + "; ".join(
            f"`{p['file']}` ({', '.join(p['sections'])}; load average {'/'.join(map(str, p['machine'].get('loadavg_start') or []))}"
            f" at start, {'/'.join(map(str, p['machine'].get('loadavg_end') or []))} at end"
            + (f"; {p['wall_s'] / 60:.1f} min" if p.get("wall_s") else "") + ")" for p in doc["merged_from"]) + ".", ""]
    sc_proc = doc["sections"].get("scaling", {}).get("process")
    if sc_proc:
        L += [f"The scaling section ran in a parallel process (load average {'/'.join(map(str, sc_proc['loadavg_start'] or []))}"
              f" at start, {'/'.join(map(str, sc_proc['loadavg_end'] or []))} at end, {sc_proc['wall_s'] / 60:.1f} min).", ""]
    if "inference" in s:
        inf = s["inference"]
        L += [f"### Inference: onnxruntime latency, batch 1 (ratio to (a), measured alternately; median of "
              f"{inf['min_runs']}-{inf['max_runs']} runs after {inf['warmup']} warm-up, fitted to {inf['budget_s_per_thread_count']:g} s per case and thread count)", ""]
        L += [f"Input 1x3x{inf['input_side'].get('resnet18', 112)}x{inf['input_side'].get('resnet18', 112)} for the torchvision models, "
              f"1x3x32x32 for SmallNet. Optional tools: " + ", ".join(f"{k}: {v}" for k, v in inf["optional_tools"].items()) + ".", ""]
        head = ["Model", "Recipe", "Thr", "(a) ms", "(b) expanded", "(c) onnxslim", "(c) onnxsim", "(d) contracted",
                "(e) deploy", "(d) p90 ratio", "runs"]
        rows, skipped = [], []
        for c in inf["cases"]:
            if "error" in c:
                rows.append([c["model"], c["recipe"], "", "error: " + c["error"][:80]] + [""] * 7)
                continue
            if c.get("nothing_to_expand"):
                skipped.append(f"{c['model']} / {c['recipe']}")
                continue
            for r in c["latency"]:
                rm = r["ratio_median"]
                cell = lambda k: f"{rm[k]:.2f}" if k in rm else "skipped"  # noqa: E731
                rows.append([c["model"], c["recipe"], str(r["threads"]), f"{r['stats']['original']['median_ms']:.2f}",
                             cell("expanded"), cell("onnxslim"), cell("onnxsim"), cell("contracted"), cell("deploy"),
                             f"{r['ratio_p90']['contracted']:.2f}" if "ratio_p90" in r else "-", str(r["runs"])])
        L += _table(head, rows, 3)
        if skipped:
            L += ["Nothing to expand (the recipe found no eligible layer, so there is nothing to measure): "
                  + ", ".join(skipped) + ".", ""]
        head = ["Model", "Recipe", "Params (a) / (b) / (d) / (e)", "FLOPs (a) / (b) / (d) / (e)",
                "Conv+Gemm nodes (a) / (b) / slim / sim / (d) / (e)", "(d) state_dict = (a)"]
        rows = []
        for c in inf["cases"]:
            if "error" in c or c.get("nothing_to_expand") or "params" not in c:
                continue
            p, f, o = c["params"], c["flops"], c["onnx"]
            nodes = " / ".join(str(o[k]["Conv"] + o[k]["Gemm"]) if k in o else "-" for k in
                               ("original", "expanded", "onnxslim", "onnxsim", "contracted", "deploy"))
            rows.append([c["model"], c["recipe"], " / ".join(_m(p[k]) for k in ("original", "expanded", "contracted", "deploy")),
                         " / ".join(_g(f[k]) for k in ("original", "expanded", "contracted", "deploy")), nodes,
                         "yes" if c["state_dict_matches_original"] else "NO"])
        L += ["**Size and cost** (FLOPs: torch FlopCounterMode, conv/matmul, 1 MAC = 2 FLOPs, batch 1)", ""]
        L += _table(head, rows)
        L += [f"![inference ratios]({img_dir}/{name}_inference.png)", ""]
    if "peers" in s:
        pe = s["peers"]
        L += [f"### Contraction peers: RepVGG / DBB blocks, fxexpand vs the papers' formulas (input 1x3x32x32, "
              f"width {pe['width']}; times: median of {pe['repeats']} alternated rounds after {pe['warmup']} warm-up)", ""]
        head = ["Block stack", "Blocks", "max abs fx vs ref (fp64)", "max abs fx vs model (fp64)",
                "max abs ref vs model (fp64)", "fx vs model (fp32)", "ref vs model (fp32)", "same kernels",
                "ref formulas (ms)", "fx deploy, no verify (ms)", "fx deploy, verify (ms)"]
        rows = []
        for k, c in pe["cases"].items():
            f64, f32, t = c["float64"], c["float32"], c["contract_time_s"]
            rows.append([k, str(c["blocks"]), f"{f64['max_abs_fx_vs_ref']:.1e}", f"{f64['max_abs_fx_vs_model']:.1e}",
                         f"{f64['max_abs_ref_vs_model']:.1e}", f"{f32['max_abs_fx_vs_model']:.1e}",
                         f"{f32['max_abs_ref_vs_model']:.1e}", "yes" if f64["fx_kernel_equal_ref"] else "no",
                         f"{t['reference_formulas']['median_s'] * 1e3:.1f}",
                         f"{t['fxexpand_deploy_noverify']['median_s'] * 1e3:.1f}",
                         f"{t['fxexpand_deploy_verify']['median_s'] * 1e3:.1f}"])
        L += _table(head, rows, 1)
    if s.get("scaling", {}).get("model_costs"):
        L += _model_cost_tables(s["scaling"]["model_costs"])
    if s.get("scaling", {}).get("rows"):
        sc = s["scaling"]
        L += [f"### Compiler cost vs graph size (chains of n blocks, 1x{sc['channels']}x8x8 input; median of "
              + ", ".join(f"{v} at n={k}" for k, v in sc["repeats"].items()) + " runs)", ""]
        stages = list(dict.fromkeys(k for r in sc["rows"] for k in r["stages"]))
        head = ["Stage"] + [f"n={r['n']} (s)" for r in sc["rows"]] + [f"peak RSS +MiB n={sc['rows'][-1]['n']}", "slope"]
        rows = []
        for st in stages:
            cells = []
            for r in sc["rows"]:
                v = r["stages"].get(st, {})
                cells.append(f"{v['median_s']:.3f}" if "median_s" in v else ("skipped" if "skipped" in v else
                                                                              "error" if "error" in v else "-"))
            last = sc["rows"][-1]["stages"].get(st, {})
            pk = last.get("peak_rss_growth_mib")
            sl = sc["slopes"].get(st, {}).get("slope")
            rows.append([st] + cells + [f"{pk:.0f}" if isinstance(pk, (int, float)) and pk == pk else "-",
                                        f"{sl:.2f}" if sl is not None else "-"])
        L += _table(head, rows, 1)
        L += ["Graph nodes: " + "; ".join(f"n={r['n']}: " + ", ".join(f"{k} {v}" for k, v in r["graph_nodes"].items())
                                          for r in sc["rows"]) + ".", ""]
        before = _load(BEFORE_FIX)
        if before:
            L += ["**Before and after the engine fix** (log-log slope of time vs n; the before run used the engine "
                  f"at {before.get('commit', '?')}, sizes {', '.join(map(str, before['sizes']))})", ""]
            head = ["Stage", "slope before", "slope after"] + [f"before n={r['n']} (s)" for r in before["rows"]]
            rows = []
            for st in stages:
                b = before["slopes"].get(st, {}).get("slope")
                a = sc["slopes"].get(st, {}).get("slope")
                if b is None:
                    continue
                rows.append([st, f"{b:.2f}", f"{a:.2f}" if a is not None else "-"]
                            + [f"{r['stages'][st]['median_s']:.3f}" if "median_s" in r["stages"].get(st, {}) else "-"
                               for r in before["rows"]])
            L += _table(head, rows, 1)
        L += [f"![scaling]({img_dir}/{name}_scaling.png)", ""]
    if "training" in s:
        tr = s["training"]
        L += [f"### Training step (forward+backward+SGD, batch {tr['batch']}, torch threads {tr['torch_num_threads']}; "
              f"ratio = expanded / original, alternated rounds; NetBooster paper: +{tr['netbooster_paper_overhead']:.1%})", ""]
        head = ["Model", "Input", "Variant", "Median step (ms)", "p10-p90 (ms)", "Ratio (medians)",
                "Per-round ratio p10-p90", "FLOPs ratio", "Peak mem growth (MiB)", "Rounds"]
        rows = []
        for c in tr["cases"]:
            if "error" in c:
                rows.append([c["model"], "", "error: " + c["error"][:80]] + [""] * 7)
                continue
            for k, v in c["step"].items():
                pr = c["ratio_per_round"][k]
                mem = c.get("peak_memory_growth_mib", {}).get(k)
                rows.append([c["model"], "x".join(map(str, c["input_shape"][2:])), k, f"{v['median_ms']:.0f}",
                             f"{v['p10_ms']:.0f}-{v['p90_ms']:.0f}", f"{c['ratio_median'][k]:.2f}",
                             f"{pr['p10']:.2f}-{pr['p90']:.2f}",
                             f"{c['flops_per_image'][k] / c['flops_per_image']['original']:.2f}",
                             f"{mem:.0f}" if mem is not None else "-", str(c["rounds"])])
        L += _table(head, rows, 3)
        L += [f"![training]({img_dir}/{name}_training.png)", ""]
    return "\n".join(L)


def _s(v: dict | None) -> str:
    """Median seconds of a stage entry, or why there is none."""
    if not v:
        return "-"
    if "median_s" in v:
        t = v["median_s"]
        return f"{t:.3f}" if t < 10 else f"{t:.1f}"
    return "error" if "error" in v else "skipped"


def _model_cost_tables(mc: dict) -> list[str]:
    L = [f"### Compiler cost on the inference models (wall time in s, median of up to {mc['max_repeats']} runs, "
         f"fewer where one stage passes {mc['budget_s_per_stage']:g} s; torch threads as above)", ""]
    L += ["Per model: fxexpand's tracer, the torch.fx baseline (`symbolic_trace` + "
          "`torch.fx.experimental.optimization.fuse`, which folds BatchNorm into convs), and fxexpand doing that "
          "same job (`contract(model, target=\"deploy\", verify=False)` on the original model).", ""]
    head = ["Model", "Nodes (fxexpand / fx)", "Params", "trace", "fx symbolic_trace + fuse",
            "fxexpand deploy of the original", "fxexpand / fx", "peak RSS +MiB (fx / fxexpand)"]
    rows = []
    for m in mc["models"]:
        if "error" in m:
            rows.append([m["model"], "error: " + m["error"][:80]] + [""] * 6)
            continue
        st = m["stages"]
        fx, dep = st.get("fx_trace_fuse", {}), st.get("deploy_original_noverify", {})
        ratio = f"{dep['median_s'] / fx['median_s']:.2f}" if "median_s" in fx and "median_s" in dep else "-"
        rows.append([m["model"], f"{m['graph_nodes']} / {m.get('fx_graph_nodes') or '-'}", _m(m["params"]),
                     _s(st.get("trace")), _s(fx), _s(dep), ratio,
                     f"{fx.get('peak_rss_growth_mib', float('nan')):.0f} / {dep.get('peak_rss_growth_mib', float('nan')):.0f}"])
    L += _table(head, rows, 1)
    L += ["Per model and recipe: `expand` is `fxexpand.compile` (trace + the recipe's passes); the passes are "
          "also timed one by one on a traced copy (expansion passes on the original, contraction passes on the "
          "expanded model at alpha = 1, one round in `contract`'s order); `contract` is target \"original\" "
          "without and with verification (float32 + float64, 3 random inputs); `deploy` is target \"deploy\" "
          "without verification; `export` is `fxexpand.export_onnx` of the contracted model, including its "
          "onnx checker and onnxruntime comparison.", ""]
    head = ["Model", "Recipe", "Nodes expanded", "expand", "expansion passes", "contraction passes", "contract",
            "contract + verify", "deploy", "export", "contract ms / node", "max peak RSS +MiB (stage)"]
    rows = []
    for m in mc["models"]:
        for recipe, r in m.get("recipes", {}).items():
            if "error" in r:
                rows.append([m["model"], recipe, "error: " + r["error"][:80]] + [""] * 9)
                continue
            st = r["stages"]
            ex = ", ".join(f"{k.split(':', 1)[1].replace('Pass', '')} {_s(v)}" for k, v in st.items()
                           if k.startswith("expand_pass:"))
            co = ", ".join(f"{k.split(':', 1)[1].replace('Pass', '')} {_s(v)}" for k, v in st.items()
                           if k.startswith("pass:"))
            c = st.get("contract_noverify", {})
            per_node = f"{c['median_s'] * 1e3 / r['expanded_nodes_inlined']:.2f}" if "median_s" in c else "-"
            peaks = [(v["peak_rss_growth_mib"], k) for k, v in st.items()
                     if isinstance(v.get("peak_rss_growth_mib"), (int, float)) and v["peak_rss_growth_mib"] == v["peak_rss_growth_mib"]]
            pk = max(peaks) if peaks else None
            rows.append([m["model"], recipe, str(r["expanded_nodes_inlined"]), _s(st.get("expand")), ex, co,
                         _s(c), _s(st.get("contract_verify")), _s(st.get("deploy_noverify")), _s(st.get("export")),
                         per_node, f"{pk[0]:.0f} ({pk[1]})" if pk else "-"])
    L += _table(head, rows, 2)
    return L


def _load(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except Exception:
        return None


def plots(doc: dict, out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["sections"]
    written = []
    if "inference" in s:
        cases = [c for c in s["inference"]["cases"] if "latency" in c]
        th = min((r["threads"] for c in cases for r in c["latency"]), default=1)
        variants = [v for v in ("expanded", "onnxslim", "onnxsim", "contracted", "deploy")
                    if any(v in r["ratio_median"] for c in cases for r in c["latency"])]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 2), 4.2))
        w = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            ys = [next((r["ratio_median"].get(v, float("nan")) for r in c["latency"] if r["threads"] == th), float("nan"))
                  for c in cases]
            ax.bar([j + i * w for j in range(len(cases))], ys, w, label=VAR_LABEL[v])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{c['model']}\n{c['recipe']}" for c in cases], rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"latency / original (onnxruntime, {th} thread)")
        ax.legend(fontsize=7, ncol=3)
        ax.set_title("Inference latency relative to the original model (log scale)")
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{name}_inference.png"))
    if s.get("scaling", {}).get("rows") or s.get("scaling", {}).get("model_costs"):
        sc = s["scaling"]
        mc = sc.get("model_costs")
        if mc:
            fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
            _model_cost_plot(ax2, mc, sc)
        else:
            fig, ax = plt.subplots(figsize=(7, 4.5))
        stages = list(dict.fromkeys(k for r in sc["rows"] for k in r["stages"]))
        for st in stages:
            pts = [(r["n"], r["stages"][st]["median_s"]) for r in sc["rows"] if "median_s" in r["stages"].get(st, {})]
            if len(pts) >= 1:
                sl = sc["slopes"].get(st, {}).get("slope")
                ax.plot(*zip(*pts), marker="o", label=f"{st} ({sl:.2f})" if sl is not None else st)
        before = _load(BEFORE_FIX)
        if before:
            for st in ("contract_noverify", "pass:FuseLinear"):
                pts = [(r["n"], r["stages"][st]["median_s"]) for r in before["rows"] if "median_s" in r["stages"].get(st, {})]
                if pts:
                    ax.plot(*zip(*pts), ls="--", marker="x", color="gray",
                            label=f"{st}, before fix ({before['slopes'][st]['slope']:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("chain length n (blocks)")
        ax.set_ylabel("wall time (s)")
        ax.set_title("Compiler cost vs graph size (legend: log-log slope)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{name}_scaling.png"))
    if "training" in s:
        cases = [c for c in s["training"]["cases"] if "step" in c]
        labels, ys = [], []
        for c in cases:
            for k, v in c["ratio_median"].items():
                if k != "original":
                    labels.append(f"{c['model']}\n{k}")
                    ys.append(v)
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels) + 2), 4.2))
        ax.bar(range(len(ys)), ys, color="tab:orange")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1 + s["training"]["netbooster_paper_overhead"], color="tab:blue", ls="--", lw=1,
                   label="NetBooster paper +32.5%")
        ax.set_xticks(range(len(ys)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("training step time / original")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"Training step time, batch {s['training']['batch']} (log scale)")
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{name}_training.png"))
    return written


def _model_cost_plot(ax, mc: dict, sc: dict) -> None:
    """Contract (no verification) time against the expanded graph's node count: each model and recipe,
    and the conv_bn_relu chains on the same axes (a straight line of slope 1 is linear cost)."""
    markers = {"netbooster": "o", "expandnets_cl": "s", "expandnets_ck": "^"}
    for recipe in mc["recipes"]:
        pts = [(r["expanded_nodes_inlined"], r["stages"]["contract_noverify"]["median_s"], m["model"])
               for m in mc["models"] for k, r in m.get("recipes", {}).items()
               if k == recipe and "median_s" in r.get("stages", {}).get("contract_noverify", {})]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(recipe, "o"), label=recipe)
    chain = [(r["graph_nodes"].get("conv_bn_relu_expanded_inlined"), r["stages"]["contract_noverify"]["median_s"])
             for r in sc.get("rows", []) if "median_s" in r["stages"].get("contract_noverify", {})
             and r["graph_nodes"].get("conv_bn_relu_expanded_inlined")]
    if chain:
        ax.plot(*zip(*chain), color="gray", marker="x", ls="--", label="conv_bn_relu chains (CL)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes of the expanded graph (regions inlined)")
    ax.set_ylabel("contract, no verification (s)")
    ax.set_title("contract cost: models and chains")
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
