"""NetAug end to end: model zoo, BatchNorm semantics, sampling, channel sorting, training helpers."""

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import fxexpand
from fxexpand.core import DynamicLayer, InputError
from fxexpand.demo import DigitsNet, load_digits
from fxexpand.passes import AugmentWidth
from fxexpand.testing import assert_unchanged, check_netaug, randomize_bn, rel_error, snapshot


class Conv1dNet(nn.Module):
    """Conv1d with BatchNorm1d, a depthwise residual block and flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8)
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw, self.b2 = nn.Conv1d(8, 12, 1), nn.BatchNorm1d(12)
        self.fc = nn.Linear(12 * 10, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = y + torch.relu(self.dw(y))
        y = torch.relu(self.b2(self.pw(y)))
        return self.fc(torch.flatten(F.max_pool1d(y, 4), 1))


def small_vit():
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    return vit


X = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
ZOO = {
    "mobilenet_v2_035": (lambda: torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10), X),
    "mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(num_classes=10), X),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), X),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), X),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), X),
    "vit_tiny": (small_vit, X[:, :, :16, :16]),
    "conv1d": (Conv1dNet, torch.randn(3, 2, 40, generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_properties(name):
    """Base mode = original (float64 ≤ 1e-12, eval and train mode; float32), every sampled config and
    the largest run forward/backward with the gradient reaching the base weights, NetAug steps ->
    contract -> strict load -> equal outputs, the input model untouched (fxexpand.testing.check_netaug)."""
    make, x = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(make())
    res = check_netaug(model, (x,), configs=2)
    assert res.status == "ok", res.detail
    assert res.errors["base_eval"] <= 1e-12 and res.errors["contract"] <= 1e-12


def _augment(model, x, **kw):
    return fxexpand.compile(model, passes=[AugmentWidth(**kw)], example_inputs=(x,))


def _notes(gm, action):
    return {n.where: n.reason for n in gm.fxexpand_notes if n.action == action}


def test_zoo_groups_and_reasons():
    """What is augmented and what is frozen, with the reason, on the awkward models."""
    torch.manual_seed(0)
    shuffle = _augment(torchvision.models.shufflenet_v2_x0_5(num_classes=10), X)
    frozen = _notes(shuffle, "frozen")
    # the channel shuffle (view / transpose) and chunk freeze the block outputs; branch hidden widths augment
    assert any("view" in r or "chunk" in r or "transpose" in r for r in frozen.values()), frozen
    assert "stage2.1.branch2.0" in _notes(shuffle, "augmented")
    eff = _augment(torchvision.models.efficientnet_b0(num_classes=10), X)
    aug = _notes(eff, "augmented")
    # squeeze-excitation: the SE reduce width is its own expand group; the gated width is tied to the block's
    assert any("fc1" in g for g in aug), aug
    vit = _augment(small_vit(), X[:, :, :16, :16])
    aug = _notes(vit, "augmented")
    assert sorted(aug) == ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0"]
    assert all("expand group" in r and "32 -> widths [32, 64, 96]" in r for r in aug.values())
    mb = _augment(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10), X,
                  width_multipliers=[1.0, 1.8, 2.6], expand_multipliers=[1.0, 1.6, 2.2, 2.8])
    rec = fxexpand.width_record(mb)
    axes = {g: s.axis for g, s in rec.groups.items()}
    assert axes["features.2.conv.0.0"] == "expand" and axes["features.2.conv.2"] == "width"  # hidden / residual
    assert rec.groups["features.2.conv.0.0"].choices == [48, 77, 106, 134]   # 48 x [1, 1.6, 2.2, 2.8]
    assert rec.groups["features.2.conv.2"].choices == [8, 14, 21]            # 8 x [1, 1.8, 2.6]
    assert "classifier.1" in _notes(mb, "frozen")                           # reaches the output


def test_contracted_model_has_the_original_cost_and_onnx_graph(tmp_path):
    """Same FLOPs, parameters and ONNX graph (op sequence and initializer shapes) as the original."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)).eval()
    aug = _augment(model, X)
    small = fxexpand.contract(aug.eval(), (X,))
    assert fxexpand.count_flops(small, (X,)) == fxexpand.count_flops(model, (X,))
    assert fxexpand.count_parameters(small) == fxexpand.count_parameters(model)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    fxexpand.export_onnx(model, (X,), a)
    fxexpand.export_onnx(small, (X,), b)
    ga, gb = onnx.load(a).graph, onnx.load(b).graph
    assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node]
    assert sorted(tuple(t.dims) for t in ga.initializer) == sorted(tuple(t.dims) for t in gb.initializer)


def test_contract_refuses_an_augmented_configuration():
    aug = _augment(DigitsNet(), torch.randn(2, 1, 8, 8))
    fxexpand.set_width(aug, "max")
    with pytest.raises(fxexpand.ContractionError, match="set_width"):
        fxexpand.contract(aug.eval(), (torch.randn(2, 1, 8, 8),))
    fxexpand.set_width(aug, "base")
    fxexpand.contract(aug.eval(), (torch.randn(2, 1, 8, 8),))


# -- sampling ------------------------------------------------------------------------------------------
def test_sampler_is_a_function_of_seed_and_step_and_stops_width_augmentation():
    aug = _augment(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10), X, stop_width_at=0.5)
    rec = fxexpand.width_record(aug)
    a = fxexpand.WidthSampler(aug, seed=3, total_steps=100)
    b = fxexpand.WidthSampler(copy.deepcopy(aug), seed=3, total_steps=100)
    seq = [a.sample(s) for s in range(100)]
    assert seq == [b.sample(s) for s in range(100)]                  # another process / rank: the same
    assert [a.sample(s) for s in range(40, 60)] == seq[40:60]         # a resumed run continues the sequence
    assert seq != [fxexpand.WidthSampler(aug, seed=4, total_steps=100).sample(s) for s in range(100)]
    for step, cfg in enumerate(seq):
        for g, w in cfg.items():
            assert w in rec.groups[g].choices
            if rec.groups[g].axis == "width" and step >= 50:
                assert w == rec.groups[g].base                       # width augmentation stopped halfway
    width_groups = [g for g, s in rec.groups.items() if s.axis == "width"]
    expand_groups = [g for g, s in rec.groups.items() if s.axis == "expand"]
    assert any(seq[s][g] != rec.groups[g].base for s in range(50) for g in width_groups)
    assert any(seq[s][g] != rec.groups[g].base for s in range(50, 100) for g in expand_groups)  # goes on
    with pytest.warns(UserWarning, match="total_steps"):
        fxexpand.WidthSampler(aug).sample(0)


def test_set_width_validates():
    aug = _augment(DigitsNet(), torch.randn(2, 1, 8, 8))
    with pytest.raises(InputError, match="unknown channel group"):
        fxexpand.set_width(aug, {"nope": 3})
    g = next(iter(fxexpand.width_record(aug).groups))
    with pytest.raises(InputError, match="outside"):
        fxexpand.set_width(aug, {g: 10_000})
    with pytest.raises(InputError, match="no augmentable widths"):
        fxexpand.set_width(DigitsNet(), "max")


# -- BatchNorm -------------------------------------------------------------------------------------
def test_augmented_forwards_leave_every_running_statistic_alone():
    torch.manual_seed(0)
    aug = _augment(torchvision.models.shufflenet_v2_x0_5(num_classes=10), X).train()
    before = {k: v.clone() for k, v in aug.state_dict().items() if "running" in k or "num_batches" in k}
    for cfg in ("max", fxexpand.WidthSampler(aug, total_steps=10).sample(1)):
        with fxexpand.use_width(aug, cfg):
            aug(X).sum().backward()
    after = aug.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    aug(X)  # a base-mode training forward updates them, as an ordinary BatchNorm does
    assert not all(torch.equal(v, aug.state_dict()[k]) for k, v in before.items() if "running_mean" in k)


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_running_statistics_describe_the_tiny_model_after_training():
    """No BN re-estimation is needed: the contracted model's eval accuracy equals the augmented model's
    in base mode, and update_bn on the training data changes it only within noise."""
    xtr, ytr, xte, yte = load_digits()
    torch.manual_seed(0)
    model = DigitsNet()
    aug = _augment(model, xtr[:2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64, shuffle=True)
    opt = torch.optim.SGD(aug.parameters(), lr=0.1, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6)
    fxexpand.training.Trainer(aug, opt, epochs=6, lr_scheduler=cosine, netaug=fxexpand.WidthSampler(aug, seed=0)).fit(loader)
    acc_base = _accuracy(aug, xte, yte)
    small = fxexpand.contract(aug, (xte[:2],))
    model.load_state_dict(small.state_dict())
    acc_small = _accuracy(model, xte, yte)
    assert acc_small == acc_base > 0.9
    refreshed = copy.deepcopy(model)
    for m in refreshed.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    torch.optim.swa_utils.update_bn(((xb,) for xb, _ in loader), refreshed)
    assert abs(_accuracy(refreshed, xte, yte) - acc_small) <= 0.03  # within noise (450 test images)


# -- channel sorting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sort_channels_preserves_the_tiny_and_the_largest_model(dtype):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)).to(dtype).eval()
    x = X.to(dtype)
    aug = _augment(model, x).eval()
    with torch.no_grad():
        for m in aug.modules():  # give the augmented channels distinct importances
            if isinstance(m, DynamicLayer) and getattr(m, "weight", None) is not None:
                m.weight.mul_(1 + torch.rand_like(m.weight))
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    base0 = aug(x)
    with fxexpand.use_width(aug, "max", augmented=False):
        max0 = aug(x)
    opt = torch.optim.SGD(aug.parameters(), lr=0.1, momentum=0.9)
    for p in aug.parameters():  # momentum buffers equal to the parameters: they must move identically
        opt.state[p]["momentum_buffer"] = p.detach().clone()
    params = {p: p.detach().clone() for p in aug.parameters()}
    perms = fxexpand.sort_channels(aug, optimizer=opt)
    assert perms and any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    with torch.no_grad():
        assert rel_error(base0, aug(x)) <= tol                      # the tiny model: exactly unchanged
        with fxexpand.use_width(aug, "max", augmented=False):
            assert rel_error(max0, aug(x)) <= tol                   # the largest model: a permutation of it
    rec = fxexpand.width_record(aug)
    for gid, perm in perms.items():
        assert torch.equal(perm[:rec.groups[gid].base], torch.arange(rec.groups[gid].base))
    # the optimizer state moved with its parameters
    assert any(not torch.equal(params[p], p.detach()) for p in aug.parameters())
    assert all(torch.equal(opt.state[p]["momentum_buffer"], p.detach()) for p in aug.parameters())
    # scope="all" (the official code): the largest model is still preserved, the tiny one changes
    fxexpand.sort_channels(aug, scope="all")
    with torch.no_grad():
        with fxexpand.use_width(aug, "max", augmented=False):
            assert rel_error(max0, aug(x)) <= tol


# -- training helpers ---------------------------------------------------------------------------------
def test_one_and_two_backward_passes_give_the_same_gradients():
    torch.manual_seed(0)
    aug = _augment(randomize_bn(DigitsNet()), torch.randn(2, 1, 8, 8)).double()
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    sampler = fxexpand.WidthSampler(aug, seed=1, total_steps=10)
    grads = []
    for separate in (False, True):
        model = copy.deepcopy(aug)
        loss = fxexpand.netaug_loss(model, sampler, 2, x, y, F.cross_entropy, alpha=0.7, separate_backward=separate)
        if not separate:
            loss.backward()
        else:
            assert not loss.requires_grad
        grads.append([p.grad.clone() for p in model.parameters()])
        assert all(m.is_base for m in model.modules() if isinstance(m, DynamicLayer))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(*grads))


def test_trainer_option_trains_and_ends_in_base_mode():
    xtr, ytr, _, _ = load_digits()
    torch.manual_seed(0)
    aug = _augment(DigitsNet(), xtr[:2])
    loader = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 256, 64)]
    opt = torch.optim.SGD(aug.parameters(), lr=0.05)
    snap = snapshot(aug)
    sampler = fxexpand.WidthSampler(aug, seed=0)
    trainer = fxexpand.training.Trainer(aug, opt, epochs=2, netaug=sampler, separate_backward=True,
                                        sort_channels="augmented")
    trainer.fit(loader)
    assert sampler.total_steps == 8
    assert all(m.is_base for m in aug.modules() if isinstance(m, DynamicLayer))
    with pytest.raises(AssertionError):
        assert_unchanged(aug, snap)  # it trained
    with pytest.raises(TypeError):
        fxexpand.training.Trainer(aug, opt, epochs=1, netaug=True)
    with pytest.raises(ValueError):
        fxexpand.training.Trainer(aug, opt, epochs=1, sort_channels="augmented")


def test_lightning_callback():
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            x, y = batch
            return fxexpand.netaug_loss(self, self.fxexpand_sampler, self.global_step, x, y, F.cross_entropy)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    aug = _augment(DigitsNet(), torch.randn(2, 1, 8, 8))
    ds = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    sampler = fxexpand.WidthSampler(aug, seed=0)
    cb = fxexpand.training.netaug_lightning_callback(sampler, sort="augmented")
    before = copy.deepcopy(aug.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(Module(aug), train_dataloaders=torch.utils.data.DataLoader(ds, batch_size=8))
    assert sampler.total_steps == 8
    assert any(not torch.equal(v, aug.state_dict()[k]) for k, v in before.items())
    assert all(m.is_base for m in aug.modules() if isinstance(m, DynamicLayer))
    fxexpand.contract(aug.eval(), (ds.tensors[0][:2],))


def test_benchmark_quick_mode_runs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "netaug_bench.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--rounds", "2", "--mem-steps", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "netaug_bench_quick.json").read_text())
    for r in res["models"].values():
        assert r["flops_ratio_floor"] > 1.5 and r["saved_activation_ratio"]["netaug-2bw"] < r["saved_activation_ratio"]["netaug"]
        assert r["step_time_ratio"]["vanilla"] == 1.0  # ratios only: no timing asserted


def test_save_and_load_an_augmented_model(tmp_path):
    """fxexpand.save records the pass recipe and the input shape; load rebuilds the augmented model
    (AugmentWidth is deterministic) and loads its weights; without an input shape save refuses."""
    model = fxexpand.build_model("torchvision:mobilenet_v2", width_mult=0.35, num_classes=10)
    aug = _augment(model, X)
    fxexpand.set_width(aug, "max")
    with torch.no_grad():
        for p in aug.parameters():
            p.add_(0.01)
    fxexpand.set_width(aug, "base")
    with pytest.raises(ValueError, match="input_shape"):
        fxexpand.save(aug, tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()
    fxexpand.save(aug, tmp_path / "a.pt", input_shape=(2, 3, 24, 24))
    back = fxexpand.load(tmp_path / "a.pt")
    assert fxexpand.width_record(back).groups.keys() == fxexpand.width_record(aug).groups.keys()
    for cfg in ("base", "max"):
        fxexpand.set_width(aug, cfg), fxexpand.set_width(back, cfg)
        with torch.no_grad():
            assert torch.equal(aug.eval()(X), back.eval()(X))
