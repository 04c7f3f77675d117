"""Issue 17: offline data, the demo's model zoo, the papers' protocols (NetBooster's two phases,
ExpandNets' layer choice / CK widths / +Init, NetAug), the paired statistics and the demo itself."""

import json
import math

import pytest
import torch
import torchvision
from scipy import stats
from torch import nn

import fxexpand
from fxexpand.cli import main
from fxexpand.core import ContractionError, DecayActivation, InputError, find_regions, residual_branch_nodes, trace
from fxexpand.demo import compare as demo
from fxexpand.demo import data
from fxexpand.demo import early_exits as exits_demo
from fxexpand.demo.models import DigitsNet, SmallNet, TinyConv1d
from fxexpand.passes import LinearExpand
from fxexpand.training import protocols


# -- data ---------------------------------------------------------------------------------------------
def test_mnist1d_is_generated_offline_with_disjoint_stratified_splits(monkeypatch):
    import mnist1d.data as md
    import requests

    monkeypatch.setattr(md, "get_dataset", lambda *a, **k: pytest.fail("the downloading get_dataset was called"))
    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("network access"))
    d = data.mnist1d(num_samples=1000)
    sizes = d.sizes()
    assert sizes["test"] == 200 and sizes["train"] + sizes["val"] == 800  # the package's 80/20 split
    assert d.input_shape == (1, 40) and d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    rows = lambda x: {tuple(r.tolist()) for r in x.flatten(1)}  # noqa: E731
    assert not rows(d.x_train) & rows(d.x_val)
    full = torch.cat([d.y_train, d.y_val])
    for c in range(10):  # every class loses round(20 %) of its training samples to validation
        n = int((full == c).sum())
        assert int((d.y_val == c).sum()) == round(0.2 * n)
    again = data.mnist1d(num_samples=1000)
    assert torch.equal(again.x_val, d.x_val) and torch.equal(again.y_test, d.y_test)
    other = data.mnist1d(num_samples=1000, split_seed=1)
    assert not torch.equal(other.y_val, d.y_val)


def test_digits_splits_and_bad_input():
    d = data.digits()
    assert d.input_shape == (1, 8, 8) and sum(d.sizes().values()) == 1797
    assert d.x_train.max() <= 1.0 and d.x_train.min() >= 0.0
    with pytest.raises(InputError, match="unknown dataset"):
        data.load("cifar10")
    with pytest.raises(InputError, match="val_fraction"):
        data.mnist1d(val_fraction=1.0)
    with pytest.raises(InputError, match="num_samples"):
        data.mnist1d(num_samples=10)


def test_tiny_conv1d_zoo():
    counts = {w: sum(p.numel() for p in TinyConv1d(w).parameters()) for w in (4, 6, 8)}
    assert counts == {4: 606, 6: 900, 8: 1250}
    assert TinyConv1d(4)(torch.randn(3, 1, 40)).shape == (3, 10)
    with pytest.raises(ValueError):
        TinyConv1d(0)


# -- ExpandNets: the paper's layers, CK widths, +Init ------------------------------------------------------
def test_residual_branch_nodes_resnet18():
    gm = trace(torchvision.models.resnet18())
    inside = {n.target for n in residual_branch_nodes(gm) if n.op == "call_module"}
    assert "layer1.0.conv1" in inside and "layer2.0.downsample.0" in inside and "layer4.1.conv2" in inside
    assert "conv1" not in inside and "fc" not in inside


def test_paper_layers_mobilenet_v2_only_non_residual_kxk():
    model = torchvision.models.mobilenet_v2(width_mult=0.35)
    e = fxexpand.compile(model, passes=fxexpand.recipes.expandnets("CL", fc=True))
    expanded = set(find_regions(e))
    # the stem and the depthwise 3x3 convs of the blocks without a residual connection (stride 2 or
    # a channel change), no 1x1 conv, no residual block's conv, not the logit layer
    assert expanded == {"features.0.0", "features.1.conv.0.0", "features.2.conv.1.0", "features.4.conv.1.0",
                        "features.7.conv.1.0", "features.11.conv.1.0", "features.14.conv.1.0",
                        "features.17.conv.1.0"}
    everything = fxexpand.compile(model, passes=fxexpand.recipes.expandnets("CL", layers="all"))
    assert {"features.3.conv.0.0", "features.3.conv.1.0", "classifier.1"} <= set(find_regions(everything))


def test_paper_layers_plain_cnn_every_kxk_and_hidden_fc():
    e = fxexpand.compile(SmallNet(), passes=fxexpand.recipes.expandnets("CK"))
    assert set(find_regions(e)) == {"features.0", "features.4", "features.8", "classifier.1"}
    t = fxexpand.compile(TinyConv1d(4), passes=fxexpand.recipes.expandnets("CL"), example_inputs=(torch.randn(2, 1, 40),))
    assert set(find_regions(t)) == {"stem.0", "blocks.0.dw", "blocks.1.dw", "blocks.2.dw", "fc1"}
    with pytest.raises(ValueError, match="layers"):
        LinearExpand(mode="CL", layers="some")


def test_ck_widths_follow_the_paper():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(5, 4, 9, padding=4)

        def forward(self, x):
            return self.conv(x)

    e = fxexpand.compile(Net(), passes=[LinearExpand(mode="CK", ratio=3)])
    convs = list(find_regions(e)["conv"].body)
    # k = 9: four 3x3 convs; p_1 = r·m = 15, p_i = r·n = 12 after that, then n = 4
    assert [(c.in_channels, c.out_channels) for c in convs] == [(5, 15), (15, 12), (12, 12), (12, 4)]
    x = torch.randn(2, 5, 13, 11, dtype=torch.float64)
    small = fxexpand.contract(e.double().eval(), (x,))
    assert small.fxexpand_report.verification.max_rel_error("float64") <= 1e-9


def test_init_nonlinear_counterpart_then_linearize_then_contract():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 40)
    y = torch.randint(0, 10, (16,))
    e = fxexpand.compile(TinyConv1d(4), passes=fxexpand.recipes.expandnets("CK", init="nonlinear"), example_inputs=(x,))
    regions = find_regions(e)
    assert all(any(isinstance(m, DecayActivation) for m in r.body) for r in regions.values())
    # not linear while alpha < 1: set to collapse, but run explicitly until linearised, and say why
    assert all(r.train_mode == "collapsed" for r in regions.values())
    notes = {n.where: n for n in e.fxexpand_notes if n.pass_name == "compile"}
    assert all(notes[n].action == "explicit" and "DecayActivation at alpha 0 < 1" in notes[n].reason for n in regions)
    with pytest.raises(ContractionError):
        fxexpand.contract(e.eval(), (x,))
    e.train()
    opt = torch.optim.SGD(e.parameters(), lr=0.05)
    for _ in range(3):  # phase 1: the nonlinear counterpart trains
        opt.zero_grad()
        nn.functional.cross_entropy(e(x), y).backward()
        opt.step()
    assert all(f.startswith("explicit: DecayActivation at alpha 0 < 1") for f in fxexpand.train_forms(e).values())
    before = {id(p): p.detach().clone() for p in e.parameters()}
    removed = fxexpand.linearize(e)
    assert removed == 6  # CK on four kernel-5 convs (one ReLU each) + the hidden FC (two)
    after = {id(p): p for p in e.parameters()}
    assert set(after) == set(before) and all(torch.equal(after[i], before[i]) for i in before)
    assert all(not any(isinstance(m, DecayActivation) for m in r.body) for r in find_regions(e).values())
    assert all(r.train_mode == "collapsed" for r in find_regions(e).values())
    # the ExpandNet's own state_dict layout: the linearised model loads strictly into a fresh ExpandNet
    fresh = fxexpand.compile(TinyConv1d(4), passes=fxexpand.recipes.expandnets("CK"), example_inputs=(x,))
    fresh.load_state_dict(e.state_dict(), strict=True)
    opt = torch.optim.SGD(e.parameters(), lr=0.05)  # phase 2: the ExpandNet trains anew
    e.train()
    opt.zero_grad()
    nn.functional.cross_entropy(e(x), y).backward()
    opt.step()
    small = fxexpand.contract(e.eval(), (x,))
    assert small.fxexpand_report.verification.max_rel_error("float64") <= 1e-9
    tiny = TinyConv1d(4)
    tiny.load_state_dict(small.state_dict(), strict=True)
    torch.testing.assert_close(tiny.eval()(x), e.eval()(x), rtol=1e-4, atol=1e-5)


# -- protocols -------------------------------------------------------------------------------------------
def _alphas(proto, epochs=10):
    x, y = torch.randn(32, 1, 40), torch.randint(0, 10, (32,))
    m = proto.compile(TinyConv1d(4), (x,))
    alphas, calls = [], []

    def make(params, total):
        calls.append(total)
        return torch.optim.SGD(params, lr=0.01), None

    def cb(ev, tr, **info):
        if ev == "epoch":
            alphas.append(round(info["alpha"], 3))

    protocols.run(m, proto, [(x, y)] * 2, epochs=epochs, make_optimizer=make, callbacks=[cb])
    return m, alphas, calls


def test_netbooster_protocol_giant_then_plt_at_the_start_then_finetune():
    m, alphas, calls = _alphas(protocols.netbooster())
    assert calls == [20, 20]  # a fresh optimizer and schedule per phase (10 epochs × 2 steps each)
    assert alphas[:10] == [0.0] * 10  # phase 1: the deep giant at alpha = 0
    assert alphas[10:] == [0.5, 1.0] + [1.0] * 8  # phase 2: PLT over its first 20 %, then alpha = 1
    assert fxexpand.get_decay(m) == 1.0
    _, ed0, _ = _alphas(protocols.netbooster(decay_fraction=0.0))
    assert ed0 == [0.0] * 10 + [1.0] * 10  # the E_d = 0 ablation
    with pytest.raises(InputError):
        protocols.netbooster(decay_fraction=1.0)


def test_expandnets_init_protocol_linearizes_between_phases():
    m, alphas, calls = _alphas(protocols.expandnets_init("CK"), epochs=3)
    assert calls == [6, 6] and alphas[:3] == [0.0] * 3
    assert not any(isinstance(mod, DecayActivation) for mod in m.modules())
    assert protocols.expandnets_init().epochs_factor == 2.0 and protocols.netbooster().epochs_factor == 2.0


def test_netaug_protocol_contracts_to_the_tiny_model():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 40), torch.randint(0, 10, (32,))
    proto = protocols.PROTOCOLS["netaug"]()
    m = proto.compile(TinyConv1d(4), (x,))
    protocols.run(m, proto, [(x, y)] * 2, epochs=1, make_optimizer=lambda p, n: (torch.optim.SGD(p, lr=0.01), None))
    small = fxexpand.contract(m, (x,))
    TinyConv1d(4).load_state_dict(small.state_dict(), strict=True)


def test_step_flops_counts_forward_and_backward():
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    # forward 2·8·(4·5 + 5·3) = 560; backward: layer 2 input and weight gradients 2·(2·8·15), layer 1
    # only its weight gradient 2·8·20 (the input needs none) = 800
    assert protocols.step_flops(mlp, torch.randn(8, 4), torch.randint(0, 3, (8,))) == 1360
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    tiny = TinyConv1d(4)
    stats_before = tiny.stem[1].running_mean.clone()
    assert protocols.step_flops(tiny, x, y) > 3 * fxexpand.count_flops(tiny, (x,))
    assert torch.equal(tiny.stem[1].running_mean, stats_before)  # counted on a copy
    assert all(p.grad is None for p in tiny.parameters())
    cl = fxexpand.compile(tiny, passes=fxexpand.recipes.expandnets("CL"), example_inputs=(x,))
    ex = fxexpand.compile(tiny, passes=fxexpand.recipes.expandnets("CL"), example_inputs=(x,), train_mode="explicit")
    assert protocols.step_flops(cl, x, y) < protocols.step_flops(ex, x, y)
    assert all(p.grad is None for p in cl.parameters())


# -- statistics -----------------------------------------------------------------------------------------------
def test_paired_difference_is_scipys_t_interval():
    a, b = [0.9, 0.92, 0.88, 0.91], [0.87, 0.9, 0.88, 0.86]
    d = demo.paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    low, high = stats.t.interval(0.95, 3, loc=sum(diffs) / 4, scale=stats.sem(diffs))
    assert d["mean"] == pytest.approx(0.025) and d["low"] == pytest.approx(low) and d["high"] == pytest.approx(high)
    assert math.isnan(demo.paired_difference([1.0], [0.5])["low"])
    with pytest.raises(ValueError):
        demo.paired_difference([1.0], [])


def test_matched_compute_interpolates_in_log_compute():
    ladder = [(1.0, 0.80), (2.0, 0.86), (4.0, 0.90)]
    assert demo._interpolate(ladder, 2.0)[0] == pytest.approx(0.86)
    assert demo._interpolate(ladder, 2 ** 1.5)[0] == pytest.approx(0.88)
    acc, note = demo._interpolate(ladder, 16.0)
    assert acc == 0.90 and "beyond" in note


# -- the demo -----------------------------------------------------------------------------------------------------
def test_demo_cli_small_run_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["demo", "--epochs", "1", "--seeds", "2", "--workers", "1", "--out", str(out),
               "--methods", "vanilla,vanilla-x2,netbooster,expandnets-ck-init"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "short run: 2 seeds" in text and "netbooster" in text and "Δ same epochs" in text
    assert "vs vanilla at the same epochs" in text
    rep = json.loads((out / "demo.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.png"]  # no partial files
    assert len(rep["runs"]) == 8 and {r["split"] for r in rep["runs"]} == {"test"}
    rows = {r["method"]: r for r in rep["summary"]}
    assert rows["netbooster"]["vs_vanilla_epochs"]["baseline"] == "vanilla-x2"
    assert rows["netbooster"]["vs_vanilla_compute"]["n"] == 2 and "phase1_accuracy_mean" in rows["netbooster"]
    assert rows["vanilla"]["latency_ratio"] == 1.0 and rows["vanilla"]["compute_ratio"] == 1.0
    assert rows["vanilla-x2"]["compute_ratio"] == pytest.approx(2.0, rel=1e-6)
    assert rows["netbooster"]["max_rel_error64"] <= 1e-9 and rows["expandnets-ck-init"]["max_rel_error64"] <= 1e-9
    lat = rep["latency"]
    assert len({v["parameters"] for v in lat.values()}) == 1 and len({v["flops"] for v in lat.values()}) == 1


def test_demo_tuning_uses_the_validation_split_only():
    cfg = demo.DemoConfig(epochs=1, seeds=1, methods=("vanilla",), tune=True, lr_grid=(0.01, 0.05), tune_seeds=(7,),
                          workers=1, latency_runs=5)
    rep = demo.run_demo(cfg)
    assert set(rep.tuning) == {"vanilla"} and rep.tuning["vanilla"]["chosen"] in (0.01, 0.05)
    assert [r["split"] for r in rep.runs] == ["test"] and rep.runs[0]["lr"] == rep.tuning["vanilla"]["chosen"]


def test_a_diverged_run_is_recorded_not_a_crash(monkeypatch):
    real_run = protocols.run

    def diverge(model, *args, **kwargs):
        real_run(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(protocols, "run", diverge)
    task = dict(dataset="mnist1d", width=4, epochs=1, batch_size=128, method="expandnets-ck", seed=0, lr=0.1,
                split="val")
    r = demo.train_run(task)
    assert r["diverged"] is True and r["accuracy"] <= 0.2 and r["max_rel_error64"] == 0.0
    monkeypatch.setattr(protocols, "run", real_run)
    assert demo.train_run(task)["diverged"] is False


def test_demo_bad_args(capsys):
    assert main(["demo", "--methods", "vanilla,magic", "--epochs", "1"]) == 2
    assert "unknown methods" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0"]) == 2
    with pytest.raises(InputError, match="vanilla"):
        demo.DemoConfig(methods=("netbooster",)).check()


def test_exits_demo_small_run(tmp_path):
    rep = exits_demo.run(seeds=2, epochs=1, workers=1)
    assert len(rep.summary["anytime"]) == 3 and len(rep.summary["budget"]) == len(exits_demo.BUDGETS)
    assert rep.summary["anytime"][-1]["cost_fraction"] == 1.0
    js, png = exits_demo.write_outputs(rep, tmp_path)
    assert js.exists() and png.exists() and len(list(tmp_path.iterdir())) == 2
    assert exits_demo.table(rep).row_count == 3 + len(exits_demo.BUDGETS)


def test_exits_demo_tunes_each_variant_on_validation():
    rep = exits_demo.run(seeds=1, epochs=1, workers=1, tune=True, lr_grid=(0.03, 0.1))
    assert set(rep.config["tuning"]) == {"boosted", "plain"}
    for v, t in rep.config["tuning"].items():
        assert t["chosen"] in (0.03, 0.1) and rep.config["lr"][v] == t["chosen"]
        assert t["chosen"] == max((0.03, 0.1), key=lambda g: t["val_last_exit_accuracy"][str(g)])
    assert {r["lr"] for r in rep.runs if r["variant"] == "plain"} == {rep.config["lr"]["plain"]}


def test_digits_stays_available():
    assert sum(p.numel() for p in DigitsNet().parameters()) == 2998
    assert demo.load_digits()[0].shape[1:] == (1, 8, 8)
