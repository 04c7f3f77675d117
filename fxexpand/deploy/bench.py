"""onnxruntime latency measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..core import ExportError, InputError

__all__ = ["benchmark_onnx", "LatencyStats", "make_session", "random_feeds", "time_session", "time_alternately"]

_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


@dataclass
class LatencyStats:
    """Latency of one onnxruntime session, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    std_ms: float
    runs: int
    warmup: int
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def make_session(path: str | os.PathLike, threads: int = 1, optimization: str = "all", *, shared_pool: bool = False):
    """An onnxruntime CPU session with a fixed thread count and graph optimisation level.

    ``shared_pool=True`` runs the session on the process-wide thread pool (which
    ``onnxruntime.capi._pybind_state.set_global_thread_pool_sizes`` must have sized before the first
    session of the process) instead of a pool of its own; ``threads`` is then not applied per session.
    """
    import onnxruntime as ort  # lazy: only timing needs it (import time of `import fxexpand`)

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}")
    opts = ort.SessionOptions()
    if shared_pool:
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = levels[optimization]
    if not os.path.exists(path):
        raise ExportError(f"ONNX file {path} does not exist")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime could not load {path}: {e}") from e


def random_feeds(session, input_shapes: Sequence[Sequence[int]] | None = None, seed: int = 0) -> dict:
    """Random inputs for every graph input (shapes from the file unless given)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inputs = session.get_inputs()
    if input_shapes is not None and len(input_shapes) != len(inputs):
        raise InputError(f"the model has {len(inputs)} inputs but {len(input_shapes)} shapes were given")
    for i, inp in enumerate(inputs):
        shape = list(input_shapes[i]) if input_shapes is not None else list(inp.shape)
        if any(not isinstance(d, int) for d in shape):
            raise InputError(f"input {inp.name} has symbolic shape {inp.shape}; pass input_shapes=")
        dtype = _NP_TYPES.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def time_session(session, feeds: dict, runs: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summarize(times: Sequence[float], warmup: int, threads: int) -> LatencyStats:
    a = np.asarray(times, dtype=np.float64)
    return LatencyStats(float(np.median(a)), float(np.percentile(a, 90)), float(a.mean()), float(a.min()),
                        float(a.std()), len(a), warmup, threads)


def benchmark_onnx(
    path: str | os.PathLike,
    *,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    input_shapes: Sequence[Sequence[int]] | None = None,
    optimization: str = "all",
    seed: int = 0,
) -> LatencyStats:
    """Median / p90 onnxruntime latency of the model at ``path`` on random inputs.

    ``warmup`` untimed runs come first; then ``runs`` timed runs. ``threads`` sets onnxruntime's
    intra-op thread count (recorded in the result).
    """
    if runs < 1 or warmup < 0 or threads < 1:
        raise ValueError("runs and threads must be >= 1 and warmup >= 0")
    sess = make_session(path, threads, optimization)
    feeds = random_feeds(sess, input_shapes, seed)
    time_session(sess, feeds, warmup)
    return summarize(time_session(sess, feeds, runs), warmup, threads)


def compare_onnx(
    paths: Sequence[str | os.PathLike],
    *,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    input_shapes: Sequence[Sequence[int]] | None = None,
    optimization: str = "all",
    seed: int = 0,
) -> list[LatencyStats]:
    """Latency of several ONNX files measured *alternately* (run 1 of each, run 2 of each, ...),
    so that machine noise affects all of them alike; ratios between them are meaningful.

    With ``threads > 1`` the sessions run in a child process on one shared onnxruntime thread pool.
    Sessions with pools of their own do not alternate fairly: after each run a session's worker
    threads keep spinning for a while, waiting for more work, and take the CPUs from the next
    session (on a 2-CPU machine this made 2-thread runs about 4x slower than a session timed on its
    own). A process-wide pool can only be sized before the process's first session, hence the child.
    """
    if runs < 1 or warmup < 0 or threads < 1:
        raise ValueError("runs and threads must be >= 1 and warmup >= 0")
    for p in paths:
        if not os.path.exists(p):
            raise ExportError(f"ONNX file {p} does not exist")
    if threads == 1:  # a 1-thread session has no worker threads: nothing spins, so run in this process
        times = time_alternately(paths, threads, warmup, runs, input_shapes, optimization, seed, shared_pool=False)
    else:
        times = _alternate_in_child(paths, threads, warmup, runs, input_shapes, optimization, seed)
    return [summarize(t, warmup, threads) for t in times]


def time_alternately(paths, threads, warmup, runs, input_shapes, optimization, seed, *,
                     shared_pool) -> list[list[float]]:
    """Per-run times (seconds) of each ONNX file in ``paths``, timed one run each in turn after
    ``warmup`` runs of every file (what :func:`compare_onnx` measures, in this process; the
    ``threads > 1`` child process calls it with ``shared_pool=True``)."""
    sessions = [make_session(p, threads, optimization, shared_pool=shared_pool) for p in paths]
    feeds = [random_feeds(s, input_shapes, seed) for s in sessions]
    for s, f in zip(sessions, feeds):
        time_session(s, f, warmup)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            times[i].extend(time_session(s, f, 1))
    return times


def _alternate_in_child(paths, threads, warmup, runs, input_shapes, optimization, seed) -> list[list[float]]:
    job = {"paths": [str(p) for p in paths], "threads": threads, "warmup": warmup, "runs": runs,
           "input_shapes": [list(s) for s in input_shapes] if input_shapes is not None else None,
           "optimization": optimization, "seed": seed}
    proc = subprocess.run([sys.executable, "-m", "fxexpand.deploy._ort_child"], input=json.dumps(job),
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if "times" in reply:
        return reply["times"]
    if "error" in reply:
        kind = {"InputError": InputError, "ValueError": ValueError}.get(reply["error"], ExportError)
        raise kind(reply["message"])
    err = (proc.stderr or proc.stdout).strip().splitlines()
    raise ExportError(f"onnxruntime timing process failed: {err[-1] if err else f'exit code {proc.returncode}'}")
