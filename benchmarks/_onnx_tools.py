"""onnxslim / onnxsim on one ONNX file; run as a child process by bench_inference (memory-capped there,
so an optimiser that runs out of memory fails on its own instead of taking the suite with it).

Usage: ``python benchmarks/_onnx_tools.py onnxslim|onnxsim SRC DST``. Imports only onnx and the tool.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _optimise(tool: str, src: Path, dst: Path) -> None:
    import onnx

    if tool == "onnxslim":
        import onnxslim

        model = onnxslim.slim(str(src))
        onnx.save(model, str(dst))
    else:
        import onnxsim

        model, ok = onnxsim.simplify(str(src))
        if not ok:
            raise RuntimeError("onnxsim's own check of the simplified model failed")
        onnx.save(model, str(dst))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("onnxslim", "onnxsim"):
        sys.exit("usage: _onnx_tools.py onnxslim|onnxsim SRC DST")
    _optimise(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
