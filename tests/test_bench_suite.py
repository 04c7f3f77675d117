"""The benchmark suite (``fxexpand bench``), its peer reference formulas, and the engine changes made
for near-linear compile cost (behaviour only; no wall-clock assertions)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxexpand
from fxexpand.core import (
    fresh_name,
    has_module,
    module_call_count,
    propagate_shapes,
    region_of,
    replace_nodes_with_module,
    set_traced_regions,
)
from fxexpand.testing import randomize_bn

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_peers
        import bench_scaling

        yield bench_peers, bench_scaling
    finally:
        sys.path.remove(str(BENCH))


# -- peers: the papers' formulas and fxexpand agree --------------------------------------------------


@pytest.mark.parametrize("case", ["repvgg", "dbb"])
def test_reference_formulas_match_fxexpand_float64(bench_modules, case):
    peers, _ = bench_modules
    torch.manual_seed(0)
    net = randomize_bn(peers.CASES[case](8), seed=3).eval()
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    r = peers.compare(net, x)
    scale = r["output_scale"]
    assert scale > 0.1
    assert r["max_abs_ref_vs_model"] <= 1e-12 * max(1.0, scale)  # the derived formulas are exact
    assert r["max_abs_fx_vs_model"] <= 1e-12 * max(1.0, scale)
    assert r["max_abs_fx_vs_ref"] <= 1e-12 * max(1.0, scale)
    # fxexpand reaches the papers' deployed form: one conv per block, no BatchNorm left, same kernels
    assert r["fx_convs"] == r["ref_convs"] == len(net)
    assert r["fx_batchnorms"] == 0
    assert r["fx_kernel_equal_ref"]


def test_batchnorm_branch_fused_module_and_functional():
    """``conv(x) + BN(x)`` (RepVGG's identity branch) becomes one conv, in both traced forms."""

    class Mod(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.conv(x) + self.bn(x)

    class Fn(Mod):
        def forward(self, x):
            bn = self.bn
            return self.conv(x) + torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                                 bn.bias, False, 0.1, bn.eps)

    for cls in (Mod, Fn):
        m = cls().eval()
        with torch.no_grad():
            m.bn.running_mean.normal_(0, 0.3)
            m.bn.running_var.uniform_(0.5, 2.0)
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.normal_(0, 0.3)
        x = torch.randn(2, 6, 9, 9)
        out = fxexpand.contract(m, (x,), target="deploy")
        assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in out.graph.nodes)
        assert not any(isinstance(mod, nn.BatchNorm2d) for mod in out.modules()), cls.__name__
        assert sum(isinstance(mod, nn.Conv2d) for mod in out.modules()) == 1
        torch.testing.assert_close(out(x), m(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_branch_not_fused_when_shared_or_training():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(x) + self.bn(x) + self.bn(x)  # the BN is called twice (rule 7)

    m = Shared().eval()
    x = torch.randn(1, 4, 6, 6)
    out = fxexpand.contract(m, (x,), target="deploy")
    assert sum(n.op == "call_module" and n.target == "bn" for n in out.graph.nodes) == 2
    torch.testing.assert_close(out(x), m(x), rtol=1e-5, atol=1e-5)

    class Train(Shared):
        def forward(self, x):
            return self.conv(x) + self.bn(x)

    t = Train().eval()
    t.bn.train()  # a BN in training mode normalises by batch statistics: not an affine map
    gm = fx.symbolic_trace(t)
    from fxexpand.passes import FuseLinear

    propagate_shapes(gm, (x,))
    t.bn.train()  # propagate_shapes restores flags; make sure the BN is still training
    res = FuseLinear(scope="all")(gm)
    assert not res.modified


# -- engine: the O(1)-per-rewrite helpers behave like the old whole-graph scans ----------------------


def _old_region_of(regions, node):
    paths = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        for key, val in stack.items():
            paths.append(val[0] if isinstance(val, tuple) else key)
    if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
        paths.append(node.target)
    best = None
    for p in paths:
        for r in regions:
            if p == r or p.startswith(r + "."):
                if best is None or len(r) < len(best):
                    best = r
    return best


def test_region_of_matches_prefix_scan():
    rng = random.Random(0)
    words = ["a", "b", "ab", "a.b", "body", "0", "1", "10"]
    g = fx.Graph()
    gm = fx.GraphModule(nn.Module(), g)
    for trial in range(300):
        regions = {".".join(rng.choice(words) for _ in range(rng.randint(1, 3))): None for _ in range(rng.randint(1, 6))}
        set_traced_regions(gm, regions)
        node = g.placeholder(f"x{trial}")
        node.op = rng.choice(["call_module", "call_function", "get_attr"])
        node.target = ".".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        node.meta["nn_module_stack"] = {
            f"k{i}": (".".join(rng.choice(words) for _ in range(rng.randint(1, 4))), nn.Module) for i in range(rng.randint(0, 3))}
        assert region_of(gm, node) == _old_region_of(regions, node)
        gm.meta["fxexpand_regions"] = tuple(regions)  # a plain sequence in the cache is accepted as well
        assert region_of(gm, node) == _old_region_of(regions, node)


def test_fresh_name_and_module_lookups():
    m = nn.Module()
    m.conv = nn.Conv2d(1, 1, 1)
    m.conv_1 = nn.Conv2d(1, 1, 1)
    m.register_buffer("conv_2", torch.zeros(1))
    m.sub = nn.Sequential(nn.Conv2d(1, 1, 1))
    assert fresh_name(m, "conv") == "conv_3"
    assert fresh_name(m, "sub.0") == "sub_0"
    assert fresh_name(m, "") == "fused"
    assert has_module(m, "sub.0") and has_module(m, "conv") and has_module(m, "")
    assert not has_module(m, "sub.1") and not has_module(m, "conv_2") and not has_module(m, "conv.weight")


def test_replace_nodes_keeps_shared_module_and_counts_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.b = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)) + self.b(x)  # b is called from two places

    gm = fx.symbolic_trace(Twice())
    assert module_call_count(gm, "b") == 2 and module_call_count(gm, "a") == 1
    a_node = next(n for n in gm.graph.nodes if n.target == "a")
    b_node = next(iter(a_node.users))
    new = replace_nodes_with_module(gm, [a_node, b_node], nn.Conv2d(2, 2, 1), a_node.args[0], "b")
    assert new.target != "b"            # the shared module is not overwritten (rule 7)
    assert isinstance(gm.b, nn.Conv2d) and module_call_count(gm, "b") == 1
    gm.recompile()
    gm(torch.randn(1, 2, 3, 3))
    # a name held by the chain itself is reused in place
    gm2 = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)))
    n0, n1 = [n for n in gm2.graph.nodes if n.op == "call_module"]
    new2 = replace_nodes_with_module(gm2, [n0, n1], nn.Conv2d(2, 2, 1), n0.args[0], "1")
    assert new2.target == "1"


def test_long_chain_contracts_exactly(bench_modules):
    """The scaling benchmark's chains (here 60 blocks) contract back exactly after the engine changes."""
    _, scaling = bench_modules
    torch.manual_seed(0)
    x = torch.randn(1, scaling.C, scaling.SIDE, scaling.SIDE)
    chain = randomize_bn(scaling._scale_init(scaling.ConvBNReLUChain(60)), 1).eval()
    from fxexpand.passes import LinearExpand

    expanded = fxexpand.compile(chain, passes=[LinearExpand(mode="CL")]).eval()
    small = fxexpand.contract(expanded, (x,))  # verified in float32 and float64
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in chain.state_dict().items()}
    cc = scaling._scale_init(scaling.ConvConvChain(60)).eval()
    dep = fxexpand.contract(cc, (x,), target="deploy")
    assert sum(isinstance(m, nn.Conv2d) for m in dep.modules()) == 60
    assert dep.fxexpand_report.verification.passed


# -- the suite end to end ----------------------------------------------------------------------------


def test_fxexpand_bench_quick(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "fxexpand", "bench", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "quick.json").read_text())
    assert set(doc) >= {"machine", "config", "sections", "wall_s"}
    m = doc["machine"]
    for k in ("cpu_model", "torch_num_threads", "loadavg_start", "loadavg_end", "onnxruntime", "torch",
              "optional_tools"):
        assert k in m, k
    s = doc["sections"]
    assert set(s) == {"inference", "peers", "scaling", "training"}
    inf = s["inference"]["cases"]
    assert inf and all("latency" in c for c in inf if "error" not in c)
    c0 = next(c for c in inf if "error" not in c)
    for row in c0["latency"]:
        assert row["ratio_median"]["original"] == 1.0
        assert {"expanded", "contracted", "deploy"} <= set(row["ratio_median"])
        for v in ("onnxslim", "onnxsim"):
            assert v in row["ratio_median"] or v in c0["skipped"]
    assert "params" in c0 and "flops" in c0
    assert s["peers"]["cases"]["repvgg"]["float64"]["max_abs_fx_vs_ref"] < 1e-10
    assert "slopes" in s["scaling"] and s["scaling"]["rows"]
    # compiler stages on the inference models too (item 4: "for the models in 2")
    mc = s["scaling"]["model_costs"]["models"]
    assert [m["model"] for m in mc] == doc["config"]["inference"]["models"]
    m0 = mc[0]
    for k in ("trace", "fx_trace_fuse", "deploy_original_noverify"):
        assert m0["stages"][k]["median_s"] > 0 and "peak_rss_growth_mib" in m0["stages"][k], k
    r0 = m0["recipes"]["expandnets_ck"]["stages"]
    for k in ("expand", "contract_noverify", "contract_verify", "deploy_noverify", "export",
              "pass:FuseLinear", "expand_pass:LinearExpand(CK)"):
        assert r0[k]["median_s"] > 0, k
    md = (out / "quick.md").read_text()
    assert "Compiler cost on the inference models" in md and "fx symbolic_trace + fuse" in md
    tr = s["training"]["cases"]
    assert tr and all("ratio_median" in c for c in tr if "error" not in c)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"quick_inference.png", "quick_scaling.png", "quick_training.png"} <= set(pngs)
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fxexpand_bench_missing_benchmarks_dir(monkeypatch, capsys):
    from fxexpand import cli

    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    assert "benchmarks" in capsys.readouterr().err
