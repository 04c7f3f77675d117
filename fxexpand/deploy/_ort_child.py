"""Child process of :func:`fxexpand.compare_onnx` for ``threads > 1``: sizes onnxruntime's process-wide
thread pool before any session exists, times the files alternately on it and prints the times as JSON
(or, for an fxexpand error or ValueError, its type and message).

Reads one JSON job from stdin: paths, threads, warmup, runs, input_shapes, optimization, seed.
"""

from __future__ import annotations

import json
import sys

from onnxruntime.capi import _pybind_state

from ..core import FxExpandError
from .bench import time_alternately


def main() -> int:
    job = json.loads(sys.stdin.read())

    _pybind_state.set_global_thread_pool_sizes(int(job["threads"]), 1)  # intra-op, inter-op

    try:
        times = time_alternately(job["paths"], job["threads"], job["warmup"], job["runs"], job["input_shapes"],
                           job["optimization"], job["seed"], shared_pool=True)
    except (FxExpandError, ValueError) as e:  # the caller raises the same type
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 1
    print(json.dumps({"times": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
