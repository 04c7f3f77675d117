#!/usr/bin/env python
"""Why ``fxexpand.compare_onnx`` times ``threads > 1`` on one shared onnxruntime thread pool.

Exports torchvision mobilenet_v2 (weights=None, 1x3x112x112) and times three sessions of that one
file, alternated run by run as the benchmark suite does, three ways:

* ``per-session pools``: each session with its own 2-thread intra-op pool (onnxruntime's default);
* ``same, one session alone``: the first of those sessions timed on its own afterwards;
* ``shared pool``: ``fxexpand.compare_onnx(threads=2)``, i.e. a child process whose sessions all run
  on one process-wide 2-thread pool; then one session on such a pool, and 1 thread for reference.

Identical files should time alike. Usage: ``python benchmarks/ort_threads.py [--runs 80]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

import fxexpand
from fxexpand.deploy.bench import make_session, random_feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=80)
    a = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mobilenet_v2.onnx"
        fxexpand.export_onnx(torchvision.models.mobilenet_v2(weights=None).eval(), (torch.randn(1, 3, 112, 112),), path)
        sessions = [make_session(path, threads=2) for _ in range(3)]
        feeds = random_feeds(sessions[0])
        for s in sessions:
            for _ in range(5):
                s.run(None, feeds)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(a.runs):
            for i, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[i].append((time.perf_counter() - t0) * 1e3)
        alone = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            sessions[0].run(None, feeds)
            alone.append((time.perf_counter() - t0) * 1e3)
        del sessions
        shared = fxexpand.compare_onnx([path] * 3, threads=2, runs=a.runs, warmup=5)
        shared_alone = fxexpand.compare_onnx([path], threads=2, runs=a.runs, warmup=5)[0]
        one = fxexpand.compare_onnx([path], threads=1, runs=a.runs, warmup=5)[0]
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"mobilenet_v2 1x3x112x112, onnxruntime 2 intra-op threads, {a.runs} alternated runs per session, "
          f"load average {[round(v, 2) for v in __import__('os').getloadavg()]}")
    print(f"  per-session pools, alternated : medians {fmt(np.median(t) for t in times)} ms")
    print(f"  same, one session alone       : median {np.median(alone):.2f} ms")
    print(f"  shared pool (compare_onnx)    : medians {fmt(s.median_ms for s in shared)} ms")
    print(f"  shared pool, one session      : median {shared_alone.median_ms:.2f} ms")
    print(f"  1 thread (compare_onnx)       : median {one.median_ms:.2f} ms")


if __name__ == "__main__":
    main()
