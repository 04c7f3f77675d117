"""Training overhead (suite section ``training``): step time and peak memory, expanded vs original.

One step = forward + cross-entropy + backward + SGD(lr=0.01, momentum=0.9) on a fixed random batch of
32 images (train mode). For each model, the original and its expanded twins (NetBooster at alpha = 0,
the start of Progressive Linearization Tuning — a step costs the same at any alpha — and ExpandNets
CL / CK) take one step each in turn, the order rotated every round, after one untimed warm-up round;
rounds continue until the time budget is spent (at least ``min_rounds``, at most ``max_rounds``).
Ratios are medians of variant / original from those alternated rounds.

Peak memory: for each variant, a fresh copy and optimizer run 2 steps; the peak is the kernel's
resident-set high-water mark (VmHWM, reset just before the steps) minus the RSS before them, i.e. what
training adds on top of the loaded model (activations kept for backward, gradients, momentum buffers,
allocator slack). In-process, after ``malloc_trim``; see docs/benchmarks.md for the caveats.
"""

from __future__ import annotations

import copy
import gc
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch
from _common import log, peak_rss_growth
from bench_inference import MODELS, RECIPES
from torch import nn

import fxexpand

BATCH = 32
NETBOOSTER_PAPER_OVERHEAD = 0.325  # +32.5% training time per iteration (NetBooster paper, GPU, its setting)


def make_step(model: nn.Module, side: int, classes: int, seed: int) -> Callable[[], float]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, side, side, generator=g)
    y = torch.randint(0, classes, (BATCH,), generator=g)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _classes(model: nn.Module, side: int) -> int:
    with torch.no_grad():
        return int(copy.deepcopy(model).eval()(torch.zeros(1, 3, side, side)).shape[-1])


def bench_model(name: str, recipes: list[str], side: int, *, budget_s: float, min_rounds: int, max_rounds: int,
                seed: int, memory: bool) -> dict[str, Any]:
    build, _ = MODELS[name]
    torch.manual_seed(seed)
    original = build()
    classes = _classes(original, side)
    variants: dict[str, nn.Module] = {"original": original}
    skipped = {}
    for r in recipes:
        torch.manual_seed(seed + 1)
        exp = fxexpand.compile(original, passes=RECIPES[r]())
        if not any(n.action == "expanded" for n in getattr(exp, "fxexpand_notes", [])):
            skipped[r] = "nothing to expand"
            continue
        if fxexpand.training.decay_modules(exp):
            fxexpand.set_decay(exp, 0.0)
        variants[r] = exp
    res: dict[str, Any] = {"model": name, "input_shape": [BATCH, 3, side, side], "classes": classes,
                           "skipped": skipped, "torch_num_threads": torch.get_num_threads()}
    res["flops_per_image"] = {k: fxexpand.count_flops(m, (torch.zeros(1, 3, side, side),)) for k, m in variants.items()}
    res["params"] = {k: fxexpand.count_parameters(m) for k, m in variants.items()}
    if memory:
        mem = {}
        for k, m in variants.items():
            mc = copy.deepcopy(m)
            step = make_step(mc, side, classes, seed + 5)
            gc.collect()
            _, peak = peak_rss_growth(lambda: (step(), step()))
            mem[k] = peak
            del mc, step
        res["peak_memory_growth_mib"] = mem
    steps = {k: make_step(m, side, classes, seed + 10) for k, m in variants.items()}
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    t_start = time.perf_counter()
    r = 0
    while True:
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            steps[k]()
            dt = time.perf_counter() - t0
            if r >= 1:  # round 0 is the warm-up
                times[k].append(dt)
        r += 1
        timed = r - 1
        spent = time.perf_counter() - t_start
        if timed >= max_rounds or (timed >= min_rounds and spent >= budget_s):
            break
    st = {}
    for k, v in times.items():
        a = np.asarray(v) * 1e3
        st[k] = {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
                 "p90_ms": float(np.percentile(a, 90)), "n": int(a.size)}
    base = st["original"]["median_ms"]
    res["rounds"] = r - 1
    res["step"] = st
    res["ratio_median"] = {k: v["median_ms"] / base for k, v in st.items()}
    # the per-round ratio (same round, adjacent steps) and its spread
    res["ratio_per_round"] = {k: {"median": float(np.median(np.asarray(times[k]) / np.asarray(times["original"]))),
                                  "p10": float(np.percentile(np.asarray(times[k]) / np.asarray(times["original"]), 10)),
                                  "p90": float(np.percentile(np.asarray(times[k]) / np.asarray(times["original"]), 90))}
                              for k in names}
    log(f"  training {name} ({res['rounds']} rounds, batch {BATCH}, {side}x{side}): "
        + ", ".join(f"{k} {v['median_ms']:.0f} ms (x{res['ratio_median'][k]:.2f})" for k, v in st.items())
        + ("; peak mem +" + ", ".join(f"{k} {v:.0f}" for k, v in res.get("peak_memory_growth_mib", {}).items()) + " MiB"
           if memory else ""))
    return res


def run(models: list[str], recipes: list[str], *, side: dict[str, int], budget_s: float, min_rounds: int,
        max_rounds: int, seed: int = 0, memory: bool = True, progress=None) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": BATCH, "optimizer": "SGD(lr=0.01, momentum=0.9)", "recipes": recipes,
                           "input_side": side, "budget_s_per_model": budget_s, "min_rounds": min_rounds,
                           "max_rounds": max_rounds, "netbooster_paper_overhead": NETBOOSTER_PAPER_OVERHEAD,
                           "torch_num_threads": torch.get_num_threads(), "cases": []}
    for name in models:
        try:
            out["cases"].append(bench_model(name, recipes, side[name], budget_s=budget_s, min_rounds=min_rounds,
                                            max_rounds=max_rounds, seed=seed, memory=memory))
        except Exception as e:
            log(f"  [red]training {name} failed: {type(e).__name__}: {e}[/]")
            out["cases"].append({"model": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        if progress is not None:
            progress()
    return out
