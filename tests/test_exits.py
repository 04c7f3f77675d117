"""BoostNet end to end: boosting and gradient rescaling (Eq. 7) checked numerically, backbones,
evaluation (costs, anytime, budgeted), segment export and the onnxruntime early-exit runner."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxexpand
from fxexpand import exits
from fxexpand.exits import policy as exit_policy
from fxexpand.demo import DigitsNet
from fxexpand.passes import InsertEarlyExits
from fxexpand.testing import randomize_bn

from .passes.test_insert_early_exits import Backbone, X


def _grads(model, loss, params):
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]


def test_stop_gradient_and_gradient_rescaling_match_eq7():
    """On a 3-exit toy in float64: l_n sends no gradient to heads i < n (stop-grad on F_{n-1}); with
    rescaling, block b_n receives 1/(N-n+1) · Σ_{i≥n} ∂l_i/∂b_n (computed by hand from the
    per-exit gradients of the same model without rescaling); heads get their own loss's gradient."""
    torch.manual_seed(0)
    model = randomize_bn(Backbone()).double().train()
    x, y = X.double(), torch.tensor([0, 3, 4])
    plain = fxexpand.compile(model, passes=[InsertEarlyExits(head="linear", rescale_gradients=False)],
                             example_inputs=(x,)).train()
    scaled = fxexpand.compile(model, passes=[InsertEarlyExits(head="linear")], example_inputs=(x,)).train()
    scaled.load_state_dict(plain.state_dict())
    blocks = {1: ["stem", "s1"], 2: ["s2"], 3: ["s3", "fc"]}
    heads = {1: "exit_heads.0", 2: "exit_heads.1"}

    def params(m, prefixes):
        return [p for n, p in m.named_parameters() if any(n.startswith(q + ".") for q in prefixes)]

    losses = [F.cross_entropy(o, y) for o in plain(x)]
    for n in (2, 3):  # stop-gradient: l_n does not reach the heads before n
        for i in range(1, n):
            assert all(float(g.abs().max()) == 0.0 for g in _grads(plain, losses[n - 1], params(plain, [heads[i]])))
    total = sum(F.cross_entropy(o, y) for o in scaled(x))
    total.backward()
    N = 3
    for n, prefixes in blocks.items():
        per_loss = [_grads(plain, losses[i - 1], params(plain, prefixes)) for i in range(n, N + 1)]
        expected = [sum(g[k] for g in per_loss) / (N - n + 1) for k in range(len(per_loss[0]))]
        got = [p.grad for p in params(scaled, prefixes)]
        for e, g in zip(expected, got):
            assert torch.allclose(e, g, rtol=1e-10, atol=1e-13), (n, float((e - g).abs().max()))
    for i, h in heads.items():
        expected = _grads(plain, losses[i - 1], params(plain, [h]))
        assert all(torch.allclose(e, p.grad, rtol=1e-10, atol=1e-13) for e, p in zip(expected, params(scaled, [h])))
    # the joint-training baseline (boost=False, MSDNet) is one flag away: F_n = f_n, the same heads
    base = fxexpand.compile(model, passes=[InsertEarlyExits(head="linear", boost=False)], example_inputs=(x,)).train()
    outs, boosted = base(x), plain(x)
    assert torch.allclose(outs[1], boosted[1] - 0.5 * boosted[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(outs[2], boosted[2] - 0.5 * boosted[1], rtol=1e-12, atol=1e-12)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv1d(8, 16, 3, stride=2, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv1d(16, 16, 3, stride=2, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.b3(self.b2(self.b1(self.stem(x)))).mean(2))


BACKBONES = {  # model, input shape, number of exits
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), 4),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10), (2, 3, 32, 32), 5),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (2, 3, 32, 32), 5),
    "digits_tiny_cnn": (DigitsNet, (2, 1, 8, 8), 2),
    "conv1d": (Conv1dNet, (2, 2, 32), 3),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbones(name):
    make, shape, n_exits = BACKBONES[name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = randomize_bn(make())
    multi = fxexpand.compile(model, passes=[InsertEarlyExits()], example_inputs=(x,))
    outs = multi.train()(x)
    assert isinstance(outs, tuple) and len(outs) == n_exits and all(o.shape == (2, 10) for o in outs)
    exits.loss(outs, torch.tensor([1, 2])).backward()
    for k in range(n_exits - 1):  # every head gets a gradient every step
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in multi.exit_heads[k].parameters())
    multi.eval()
    small = fxexpand.contract(multi, (x,))
    fresh = make()
    fresh.load_state_dict(small.state_dict(), strict=True)  # the backbone, original names
    with torch.no_grad():  # its output is the raw last head f_N (tests/passes/test_remove_exits.py)
        assert torch.equal(fresh.eval()(x), small(x))
    assert set(fresh.state_dict()) == set(model.state_dict())


def _digits_multi(boost=True, seed=0):
    torch.manual_seed(seed)
    model = DigitsNet()
    return fxexpand.compile(model, passes=[InsertEarlyExits(head="linear", boost=boost)],
                            example_inputs=(torch.randn(2, 1, 8, 8),))


def test_costs_match_the_flop_counter():
    multi = _digits_multi().eval()
    x = torch.randn(4, 1, 8, 8)
    c = exits.exit_costs(multi, (x,))
    assert len(c["flops"]) == 2 and all(f > 0 for f in c["flops"])
    # the segments together are the whole multi-exit model; the last cumulative cost covers the backbone
    assert sum(c["flops"]) * 4 == fxexpand.count_flops(multi, (x,))
    assert sum(c["flops"]) * 4 >= fxexpand.count_flops(DigitsNet(), (x,))
    assert c["params"][-1] == fxexpand.count_parameters(multi)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(n)]


def test_fit_evaluate_anytime_and_curve():
    multi = _digits_multi().eval()
    x = torch.randn(2, 1, 8, 8)
    val, test = _data(3, 1), _data(3, 2)
    table = exits.anytime(multi, test, (x,))
    assert [r["exit"] for r in table] == [1, 2] and table[-1]["cost_fraction"] == 1.0
    full = exits.fit(multi, val, 1.0, (x,), flat_rule=False)
    assert full.p == 0.0 and exits.evaluate(multi, test, full)["histogram"][0] == 0  # budget 1: nobody exits early
    half = exits.fit(multi, val, 0.7, (x,), flat_rule=False)
    res = exits.evaluate(multi, val, half)
    assert abs(res["mean_cost_fraction"] - 0.7) < 0.05  # the fitted fractions spend the budget on held-out data
    assert sum(res["histogram"]) == 96
    curve = exits.budget_curve(multi, val, test, (x,), budgets=[0.6, 0.8, 1.0])
    assert [round(r["budget"] / sum(half.step_costs), 6) for r in curve] == [0.6, 0.8, 1.0]
    with pytest.raises(ValueError):
        exits.fit(multi, val, 1.5, (x,))


def test_export_runner_matches_torch_for_every_sample(tmp_path):
    torch.manual_seed(0)
    multi = _digits_multi()
    opt = torch.optim.SGD(multi.parameters(), lr=0.1)
    for xb, yb in _data(4, 3):  # a few steps, so confidences spread
        opt.zero_grad()
        exits.loss(multi(xb), yb).backward()
        opt.step()
    multi.eval()
    x = torch.randn(1, 1, 8, 8)
    policy = exits.fit(multi, _data(2, 4), 0.75, (x,))
    out = exits.export(multi, (x,), tmp_path / "deploy", policy)
    manifest = json.loads((out / "policy.json").read_text())
    assert [s["file"] for s in manifest["segments"]] == ["segment_1.onnx", "segment_2.onnx"]
    runner = exits.Runner(out)
    test = torch.cat([xb for xb, _ in _data(2, 5)])
    with torch.no_grad():
        logits = [o for o in multi(test)]
    scores = exit_policy.confidences(logits)
    idx = exit_policy.exit_indices(scores, policy.thresholds)
    labels = torch.stack([lg.argmax(1) for lg in logits])
    hist = [0, 0]
    for s in range(test.shape[0]):
        label, k = runner(test[s:s + 1])
        assert (label, k) == (int(labels[idx[s], s]), int(idx[s]) + 1), s
        hist[k - 1] += 1
    assert hist[0] > 0 and hist[1] > 0  # both exits are used
    with pytest.raises(fxexpand.ExportError, match="not an empty directory"):
        exits.export(multi, (x,), out, policy)  # never overwrites


def test_trainer_accepts_a_multi_exit_model():
    multi = _digits_multi()
    opt = torch.optim.SGD(multi.parameters(), lr=0.05)
    before = copy.deepcopy(multi.exit_heads.state_dict())
    fxexpand.training.Trainer(multi, opt, epochs=1).fit(_data(2, 6))
    assert any(not torch.equal(v, multi.exit_heads.state_dict()[k]) for k, v in before.items())


def test_lightning_training_step_with_exits_loss():
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, idx):
            x, y = batch
            return exits.loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    multi = _digits_multi()
    before = copy.deepcopy(multi.state_dict())
    ds = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         callbacks=[fxexpand.training.lightning_callback(epochs=1, steps_per_epoch=4)])
    trainer.fit(Module(multi), train_dataloaders=torch.utils.data.DataLoader(ds, batch_size=8))
    assert any(not torch.equal(v, multi.state_dict()[k]) for k, v in before.items() if "exit_heads" in k)


def test_save_and_load_a_multi_exit_model(tmp_path):
    multi = fxexpand.compile(fxexpand.build_model("fxexpand:SmallNet", num_classes=10),
                             passes=[InsertEarlyExits()], example_inputs=(torch.randn(2, 3, 32, 32),))
    with pytest.raises(ValueError, match="input_shape"):
        fxexpand.save(multi, tmp_path / "m.pt")
    fxexpand.save(multi, tmp_path / "m.pt", input_shape=(2, 3, 32, 32))
    back = fxexpand.load(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(multi.eval()(x), back.eval()(x)))
