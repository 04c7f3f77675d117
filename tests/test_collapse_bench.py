"""benchmarks/collapse_bench.py --quick runs and reports every ratio (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "collapse_bench.py"


def test_collapse_benchmark_quick_mode(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "collapse_bench_quick.json").read_text())
    assert [(r["model"], r["mode"]) for r in res["rows"]] == [("smallnet", "CL"), ("demo_tiny_conv1d", "FC")]
    for r in res["rows"]:
        assert r["time_ratio"]["original"] == 1.0 and set(r["time_ratio"]) == {"original", "explicit", "collapsed"}
        assert r["collapsed_regions"] == r["regions"] > 0
        assert 0 < r["compose_share_of_collapsed_step"] < 1
        for v in ("original", "explicit", "collapsed"):
            peak = r["peak_memory_bytes"][v]
            assert peak["total"] == peak["state"] + peak["activations"] and peak["state"] > 0 and peak["activations"] > 0
            assert r["rss_growth_bytes"][v] >= 0
        # the expanded forms hold more parameter state than the original; the floor counts it
        assert r["peak_memory_bytes"]["explicit"]["state"] > r["peak_memory_bytes"]["original"]["state"]
        assert r["peak_memory_floor_ratio"] > 1
    assert (tmp_path / "collapse_bench_quick.md").read_text().startswith("| model |")
