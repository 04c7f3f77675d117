"""Shared by the benchmark scripts: machine description and ONNX graph summaries."""

from __future__ import annotations

import collections
import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxexpand

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def git_commit() -> str | None:
    """Short HEAD commit, with "+dirty" when fxexpand/ has uncommitted changes."""
    head = _git("rev-parse", "--short", "HEAD")
    if head and _git("status", "--porcelain", "--untracked-files=no", "--", "fxexpand"):
        head += "+dirty"
    return head or None


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (other processes competing for the CPUs skew every timing)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(**extra: Any) -> dict[str, Any]:
    """Platform, CPU, library versions, commit, torch threads, date and load average (+ ``extra``)."""
    import onnx
    import onnxruntime

    info = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "fxexpand": fxexpand.__version__,
        "git_commit": git_commit(),
        "torch_num_threads": torch.get_num_threads(),
    }
    info.update(extra)
    info["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info["loadavg_start"] = loadavg()
    return info


def machine_line(m: dict[str, Any]) -> str:
    """One line describing the machine a result came from."""
    flush = f", flush denormal {m['torch_flush_denormal']}" if "torch_flush_denormal" in m else ""
    return (f"{m['cpu_model']} ({m['cpu_count']} logical CPUs), {m['platform']}, Python {m['python']}, "
            f"torch {m['torch']}, torchvision {m['torchvision']}, onnxruntime {m['onnxruntime']}, "
            f"torch threads {m['torch_num_threads']}{flush}, fxexpand {m['fxexpand']}"
            + (f" @ {m['git_commit']}" if m.get("git_commit") else "") + f", {m['date']}"
            + (f", load average at start {'/'.join(map(str, m['loadavg_start']))}" if m.get("loadavg_start") else "")
            + (f", at end {'/'.join(map(str, m['loadavg_end']))}" if m.get("loadavg_end") else ""))


def onnx_summary(path: Path) -> dict[str, Any]:
    """Node count, op histogram and file size of an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items())), "bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------------------
# console, timing and memory helpers shared by the suite's sections

from rich.console import Console  # noqa: E402

console = Console(highlight=False)
if not console.is_terminal:  # logs and pipes: wide enough for the tables
    console = Console(highlight=False, width=200)


def log(msg: str) -> None:
    console.log(msg)


def _proc_status_mib(*keys: str) -> dict[str, float]:
    """Fields of /proc/self/status (VmRSS, VmHWM: the resident-set high-water mark), in MiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) / 1024  # kB
    except OSError:
        pass
    return out


def _trim_malloc() -> None:
    """Give freed heap memory back to the OS, so the RSS before a measurement is not inflated."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def reset_peak_rss() -> float | None:
    """Reset the kernel's VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); returns that RSS
    in MiB, or None where this is not possible (then peaks are not measured)."""
    import gc

    gc.collect()
    _trim_malloc()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_mib("VmRSS").get("VmRSS")


def peak_rss_growth(fn) -> tuple[float, float]:
    """(wall seconds, peak RSS growth in MiB) of one call of ``fn``: VmHWM after the call minus the RSS
    just before it (NaN where /proc/self/clear_refs is unavailable). The result of ``fn`` is dropped."""
    import time

    before = reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _proc_status_mib("VmHWM").get("VmHWM")
    del out
    growth = (peak - before) if (before is not None and peak is not None) else float("nan")
    return dt, growth
