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
        assert all(r["saved_bytes"][v] > 0 and r["rss_growth_bytes"][v] >= 0 for v in r["saved_bytes"])
    assert (tmp_path / "collapse_bench_quick.md").read_text().startswith("| model |")
