"""Inference (suite section ``inference``): what contraction gives back, next to ONNX optimisers.

For each model and recipe, the files timed alternately in one onnxruntime process
(``fxexpand.compare_onnx``, graph optimisation level "all") are:

(a) ``original``: the model as built (BatchNorm statistics randomised);
(b) ``expanded``: the expanded model at alpha = 1 (every decaying activation linear), exported as it is;
(c) ``onnxslim`` / ``onnxsim``: (b) after onnxslim / onnxsim (optional tools; "skipped: not installed"
    when missing);
(d) ``contracted``: ``fxexpand.contract(expanded, target="original")``;
(e) ``deploy``: ``fxexpand.contract(expanded, target="deploy")``.

Ratios are against (a), per thread count, from the alternated runs. Parameters and FLOPs come from
``fxexpand.count_parameters`` / ``count_flops`` (torch FlopCounterMode: conv/matmul, 1 MAC = 2 FLOPs)
for the torch models; for the optimiser outputs the initializer element count and the Conv/Gemm
node count of the ONNX file are reported.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from _common import log, onnx_summary
from torch import nn

import fxexpand
from fxexpand.demo.models import SmallNet
from fxexpand.testing import randomize_bn, rel_error

VARIANTS = ["original", "expanded", "onnxslim", "onnxsim", "contracted", "deploy"]


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


# name -> (builder, input side, channels)
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "mobilenet_v2": (_tv("mobilenet_v2"), 112),
    "mobilenet_v2_x0.35": (_tv("mobilenet_v2", width_mult=0.35), 112),
    "mnasnet0_5": (_tv("mnasnet0_5"), 112),
    "efficientnet_b0": (_tv("efficientnet_b0"), 112),
    "resnet18": (_tv("resnet18"), 112),
    "resnet50": (_tv("resnet50"), 112),
    "smallnet": (lambda: SmallNet(), 32),
}

RECIPES: dict[str, Callable[[], list]] = {
    "netbooster": lambda: fxexpand.recipes.netbooster(),
    "expandnets_cl": lambda: fxexpand.recipes.expandnets("CL"),
    "expandnets_ck": lambda: fxexpand.recipes.expandnets("CK"),
}


def optional_tools() -> dict[str, str]:
    """Version of each optional ONNX optimiser, or "skipped: not installed"."""
    out = {}
    for mod in ("onnxslim", "onnxsim"):
        if importlib.util.find_spec(mod) is None:
            out[mod] = "skipped: not installed (pip install -e '.[bench]')"
        else:
            try:
                out[mod] = getattr(__import__(mod), "__version__", "installed")
            except Exception as e:  # installed but broken
                out[mod] = f"skipped: import failed ({type(e).__name__}: {e})"
    return out


def at_alpha1(expanded: nn.Module, seed: int) -> nn.Module:
    """The expanded model as benchmarked: its BatchNorm statistics randomised, every decaying
    activation at alpha = 1 (linear, so it contracts), eval mode. In place; returns it."""
    randomize_bn(expanded, seed + 3)
    if fxexpand.training.decay_modules(expanded):
        fxexpand.set_decay(expanded, 1.0)
    return expanded.eval()


def _memory_limit_bytes() -> int:
    """Half of the machine's RAM: a third-party optimiser that needs more is stopped there (and
    reported as failed) instead of taking the whole suite down with the kernel's OOM killer."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _optimise_isolated(tool: str, src: Path, dst: Path, timeout_s: float = 1800) -> None:
    """Run ``_onnx_tools.py`` (the optimiser) in a child process with its data segment limited (RLIMIT_DATA) to
    :func:`_memory_limit_bytes`; raise RuntimeError with the child's last error line on failure."""
    import resource
    import subprocess
    import sys

    limit = _memory_limit_bytes()

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    script = Path(__file__).with_name("_onnx_tools.py")
    proc = subprocess.run([sys.executable, str(script), tool, str(src), str(dst)], capture_output=True,
                          text=True, timeout=timeout_s, preexec_fn=cap)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        if proc.returncode < 0 or "MemoryError" in why or "bad_alloc" in why:
            why = f"ran out of its {limit / 2**30:.0f} GiB memory limit ({why[:200]})"
        raise RuntimeError(why)


def _onnx_params(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).size for t in m.graph.initializer))


def _ops(summary: dict) -> dict[str, int]:
    ops = summary["ops"]
    return {"Conv": ops.get("Conv", 0), "Gemm": ops.get("Gemm", 0) + ops.get("MatMul", 0),
            "BatchNormalization": ops.get("BatchNormalization", 0)}


def prepare_model(name: str, workdir: Path, seed: int) -> tuple[nn.Module, tuple, Path, dict]:
    build, side = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_bn(build(), seed).eval()
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed + 1))
    path = workdir / f"{name}_original.onnx"
    fxexpand.export_onnx(model, (x,), path)
    info = {"params": fxexpand.count_parameters(model), "flops": fxexpand.count_flops(model, (x,)),
            "onnx": onnx_summary(path)}
    return model, (x,), path, info


def bench_case(name: str, recipe: str, model: nn.Module, inputs: tuple, orig_path: Path, orig_info: dict,
               workdir: Path, *, threads: list[int], budget_s: float, min_runs: int, max_runs: int,
               warmup: int, seed: int, tools: dict[str, str]) -> dict[str, Any]:
    res: dict[str, Any] = {"model": name, "recipe": recipe, "input_shape": list(inputs[0].shape), "skipped": {},
                           "wall_s": {}}
    torch.manual_seed(seed + 7)
    t0 = time.perf_counter()
    expanded = fxexpand.compile(model, passes=RECIPES[recipe]())
    res["wall_s"]["compile"] = time.perf_counter() - t0
    notes = getattr(expanded, "fxexpand_notes", [])
    res["expanded_layers"] = len([n for n in notes if n.action == "expanded"])
    if res["expanded_layers"] == 0:
        res["nothing_to_expand"] = True
        reasons = sorted({n.reason for n in notes if n.action == "skipped"})[:4]
        res["note"] = "the recipe found no eligible layer: " + "; ".join(reasons)
        log(f"  {name}/{recipe}: nothing to expand ({res['note'][:120]})")
        return res
    at_alpha1(expanded, seed)
    # verify=False here: export_onnx below checks every file against the expanded torch model's outputs
    # (contract's float32+float64 verification is measured in the scaling and peers sections)
    t0 = time.perf_counter()
    contracted = fxexpand.contract(expanded, inputs, verify=False)
    res["wall_s"]["contract_original"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    deploy = fxexpand.contract(expanded, inputs, target="deploy", verify=False)
    res["wall_s"]["contract_deploy"] = time.perf_counter() - t0
    res["contract"] = {"original": contracted.fxexpand_report.summary(), "deploy": deploy.fxexpand_report.summary()}
    res["state_dict_matches_original"] = (
        {k: tuple(v.shape) for k, v in contracted.state_dict().items()}
        == {k: tuple(v.shape) for k, v in model.state_dict().items()})
    torch_models = {"expanded": expanded, "contracted": contracted, "deploy": deploy}
    paths = {"original": orig_path}
    t0 = time.perf_counter()
    for k, m in torch_models.items():
        paths[k] = fxexpand.export_onnx(m, inputs, workdir / f"{name}_{recipe}_{k}.onnx")
    # the contracted files compute the expanded model's function (onnxruntime vs torch, relative to the scale)
    with torch.no_grad():
        want = expanded(*inputs)
        res["max_rel_err_vs_expanded"] = {k: rel_error(want, torch_models[k](*inputs)) for k in ("contracted", "deploy")}
    res["wall_s"]["export_3"] = time.perf_counter() - t0
    res["params"] = {"original": orig_info["params"], **{k: fxexpand.count_parameters(m) for k, m in torch_models.items()}}
    res["flops"] = {"original": orig_info["flops"], **{k: fxexpand.count_flops(m, inputs) for k, m in torch_models.items()}}
    del torch_models, expanded, contracted, deploy, want  # the large expanded model is not needed below
    gc.collect()
    for tool in ("onnxslim", "onnxsim"):
        if tools[tool].startswith("skipped"):
            res["skipped"][tool] = tools[tool]
            continue
        dst = workdir / f"{name}_{recipe}_{tool}.onnx"
        try:
            t0 = time.perf_counter()
            _optimise_isolated(tool, paths["expanded"], dst)
            res["wall_s"][tool] = time.perf_counter() - t0
            paths[tool] = dst
        except Exception as e:
            res["skipped"][tool] = f"skipped: {tool} failed ({type(e).__name__}: {str(e)[:300]})"
    order = [v for v in VARIANTS if v in paths]
    res["onnx"] = {k: {**_ops(onnx_summary(p)), "nodes": onnx_summary(p)["nodes"], "initializer_elements": _onnx_params(p)}
                   for k, p in paths.items()}
    res["latency"] = []
    for th in threads:
        probe = fxexpand.compare_onnx([paths[k] for k in order], threads=th, runs=2, warmup=1)
        per_round_s = sum(s.median_ms for s in probe) / 1e3
        runs = int(max(min_runs, min(max_runs, budget_s / max(per_round_s, 1e-6))))
        stats = fxexpand.compare_onnx([paths[k] for k in order], threads=th, runs=runs, warmup=warmup)
        st = {k: s.as_dict() for k, s in zip(order, stats)}
        # p10 from the same runs is not kept by LatencyStats; min, median, p90 and std are
        o = st["original"]
        row = {"threads": th, "runs": runs, "warmup": warmup, "stats": st,
               "ratio_median": {k: v["median_ms"] / o["median_ms"] for k, v in st.items()},
               "ratio_p90": {k: v["p90_ms"] / o["p90_ms"] for k, v in st.items()},
               "ratio_min": {k: v["min_ms"] / o["min_ms"] for k, v in st.items()}}
        res["latency"].append(row)
        log(f"  {name}/{recipe} ORT {th} thr, {runs} runs alternating: "
            + ", ".join(f"{k} {v['median_ms']:.2f} ms (x{row['ratio_median'][k]:.2f})" for k, v in st.items()))
    return res


def run(models: list[str], recipes: list[str], *, threads: list[int], budget_s: float, min_runs: int,
        max_runs: int, warmup: int, seed: int = 0, progress=None) -> dict[str, Any]:
    tools = optional_tools()
    out: dict[str, Any] = {"models": models, "recipes": recipes, "threads": threads, "budget_s_per_thread_count": budget_s,
                           "min_runs": min_runs, "max_runs": max_runs, "warmup": warmup, "optional_tools": tools,
                           "input_side": {m: MODELS[m][1] for m in models}, "originals": {}, "cases": []}
    with tempfile.TemporaryDirectory(prefix="fxexpand_inference_") as tmp:
        work = Path(tmp)
        for name in models:
            try:
                model, inputs, path, info = prepare_model(name, work, seed)
                out["originals"][name] = info
            except Exception as e:
                out["cases"].append({"model": name, "recipe": "-", "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()})
                continue
            for recipe in recipes:
                try:
                    out["cases"].append(bench_case(name, recipe, model, inputs, path, info, work, threads=threads,
                                                   budget_s=budget_s, min_runs=min_runs, max_runs=max_runs,
                                                   warmup=warmup, seed=seed, tools=tools))
                except Exception as e:  # record and go on with the other cases
                    log(f"  [red]{name}/{recipe} failed: {type(e).__name__}: {e}[/]")
                    out["cases"].append({"model": name, "recipe": recipe, "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc()})
                if progress is not None:
                    progress()
    return out


def cases_from_log(text: str) -> list[dict]:
    """Latency rows rebuilt from the suite's console log (one line per case and thread count: runs,
    median ms and ratio of every file), for a run stopped before it wrote its JSON. Sizes, FLOPs and
    p90s are not in the log and stay absent."""
    import re

    text = re.sub(r"\s+_common\.py:\d+\s*\n\s+", " ", text)
    cases: dict[tuple[str, str], dict] = {}
    for line in text.splitlines():
        m = re.search(r"\]\s+(\S+)/(\S+) ORT (\d+) thr, (\d+) runs alternating: (.*)", line)
        if not m:
            continue
        model, recipe, th, runs, rest = m[1], m[2], int(m[3]), int(m[4]), m[5]
        vals = re.findall(r"(\w+) ([\d.]+) ms \(x([\d.]+)\)", rest)
        c = cases.setdefault((model, recipe), {"model": model, "recipe": recipe, "skipped": {}, "latency": [],
                                               "from_log": True})
        c["latency"].append({"threads": th, "runs": runs, "stats": {k: {"median_ms": float(v)} for k, v, _ in vals},
                             "ratio_median": {k: float(r) for k, _, r in vals}})
    return list(cases.values())

