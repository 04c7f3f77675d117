"""benchmarks/exits_bench.py --quick: runs end to end and writes a well-formed result (no timing asserted)."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "exits_bench.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("exits_bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "exits_bench_quick.json").read_text()), proc.stdout


def _acc(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_quick_run_writes_json_md_png(quick):
    out, res, stdout = quick
    assert {"machine", "settings", "model", "runs", "summary", "conclusions", "latency", "total_seconds"} <= set(res)
    md = (out / "exits_bench_quick.md").read_text()
    assert "Anytime prediction" in md and "Budgeted batch" in md and "onnxruntime" in md
    assert "Anytime prediction" in stdout  # the markdown is printed at the end
    pytest.importorskip("matplotlib")
    assert (out / "exits_bench_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_model_has_four_exits_and_settings_are_recorded(quick):
    _, res, _ = quick
    s, m = res["settings"], res["model"]
    assert s["quick"] and s["seeds"] == 1 and s["epochs"] == 2 and s["temperature"] == 0.5
    assert m["num_exits"] == 4 and len(m["exit_points"]) == 3
    cum = m["cum_cost_fraction"]
    assert len(cum) == 4 and all(0 < a < b for a, b in itertools.pairwise(cum)) and cum[-1] == pytest.approx(1.0)
    assert len(res["runs"]) == 2 * s["seeds"] and {r["variant"] for r in res["runs"]} == {"boosted", "baseline"}


def test_accuracies_and_costs(quick):
    _, res, _ = quick
    s, c1 = res["settings"], res["model"]["cum_cost_fraction"][0]
    for run in res["runs"]:
        assert [r["exit"] for r in run["anytime"]] == [1, 2, 3, 4]
        assert all(_acc(r["accuracy"]) for r in run["anytime"])
        assert set(run["budget_curves"]) == {"flat", "fraction"}
        for rule, curve in run["budget_curves"].items():
            assert [r["budget_fraction"] for r in curve] == s["budgets"]
            for r in curve:
                assert _acc(r["accuracy"]) and 0 < r["mean_cost_fraction"] <= 1 + 1e-9
                # thresholds fitted on val, cost measured on test: within a tolerance of the budget (of exit 1's
                # cost where the budget is below it); the flat rule only lowers the cost on val
                assert r["mean_cost_fraction"] <= max(r["budget_fraction"], c1) + 0.1, (rule, r)
            if rule == "fraction":  # budget 1.0: p = 0, nobody leaves early
                assert curve[-1]["budget_fraction"] == 1.0 and curve[-1]["mean_cost_fraction"] == pytest.approx(1.0)
                assert curve[-1]["accuracy"] == run["anytime"][-1]["accuracy"]
    for r in res["summary"]["anytime"]:
        assert _acc(r["boosted"]["mean"]) and _acc(r["baseline"]["mean"])
        d = r["diff"]
        assert d["mean"] == pytest.approx(r["boosted"]["mean"] - r["baseline"]["mean"])
        assert d["ci_low"] is None and d["verdict"].startswith("n/a")  # one seed: no interval
    for rows in res["summary"]["budget"].values():
        assert [r["budget"] for r in rows] == s["budgets"]
        assert all(_acc(r[v]["accuracy"]["mean"]) for r in rows for v in ("boosted", "baseline"))


def test_latency_and_runner_agree_with_torch(quick):
    _, res, _ = quick
    lat = res["latency"]
    assert lat["backbone"]["latency_ms"] > 0 and 0 < lat["backbone"]["flops_over_all_exits"] < 1
    rows = lat["budgets"]
    assert sorted((r["rule"], r["budget"]) for r in rows) == sorted(
        (rule, b) for rule in ("flat", "fraction") for b in res["settings"]["latency_budgets"])
    n_test = res["settings"]["sizes"]["test"]
    for r in rows:
        assert r["latency_ms"] > 0 and r["latency_ratio"] > 0 and math.isfinite(r["latency_ratio"])
        assert r["mismatches"] == 0  # the Runner's (label, exit) equals torch's for every test sample
        assert r["accuracy_runner"] == pytest.approx(r["accuracy_torch"], abs=1e-12)
        assert r["histogram_runner"] == r["histogram_torch"] and sum(r["histogram_runner"]) == n_test
        assert 0 < r["predicted_cost_fraction"] <= 1 + 1e-9
        assert r["predicted_cost_over_backbone"] == pytest.approx(
            r["predicted_cost_fraction"] / lat["backbone"]["flops_over_all_exits"])
    full = next(r for r in rows if r["rule"] == "fraction" and r["budget"] == 1.0)
    assert full["histogram_runner"][-1] == n_test and full["predicted_cost_fraction"] == pytest.approx(1.0)
    assert full["accuracy_torch"] == res["runs"][0]["anytime"][-1]["accuracy"]  # seed 0, boosted: exit 4
    assert len(lat["segments"]) == 4 and all(sg["ort_ms"] > 0 for sg in lat["segments"])
    assert sum(sg["flops_fraction"] for sg in lat["segments"]) == pytest.approx(1.0)


def test_replot_rebuilds_md_from_json(quick):
    out, _, _ = quick
    md = out / "exits_bench_quick.md"
    before = md.read_text()
    md.unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--replot", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text() == before
