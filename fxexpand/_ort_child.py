"""Child process of :func:`fxexpand.compare_onnx` for ``threads > 1``: sizes onnxruntime's process-wide
thread pool before any session exists, times the files alternately on it and prints the times as JSON.

Reads one JSON job from stdin: paths, threads, warmup, runs, input_shapes, optimization, seed.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    job = json.loads(sys.stdin.read())
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(int(job["threads"]), 1)  # intra-op, inter-op
    from .bench import _alternate

    times = _alternate(job["paths"], job["threads"], job["warmup"], job["runs"], job["input_shapes"],
                       job["optimization"], job["seed"], shared_pool=True)
    print(json.dumps({"times": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
