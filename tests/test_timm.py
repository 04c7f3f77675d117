"""Issue 16, items 4-6: timm models in fxexpand.

* tracing uses timm's own FX registrations (leaf modules, autowrapped functions) when timm is
  loaded, and does without them when it is not;
* ``timm:<name>`` factories (``fxexpand.build_model``, ``fxexpand.load``, the CLI), built with
  ``pretrained=False``, and a :class:`~fxexpand.LoadError` naming the ``[timm]`` extra when timm is
  missing;
* NetBooster, ExpandNets and NetAug round trips on timm models: expand, a few SGD steps, contract,
  strict ``load_state_dict`` into a fresh timm model, same outputs.
"""

import builtins
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxexpand
from fxexpand import LoadError
from fxexpand.cli import main
from fxexpand.core import ModelFactory, find_regions, get_record
from fxexpand.core.trace import timm_fx_registrations
from fxexpand.passes import LinearExpand
from fxexpand.testing import randomize_bn, rel_error

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, Conv2dSame  # noqa: E402
from timm.layers.pos_embed import resample_abs_pos_embed  # noqa: E402
from timm.models.efficientvit_msra import LocalWindowAttention  # noqa: E402


# ------------------------------------------------------------------------------------------------
# tracing with timm's registrations

def test_efficientvit_m0_traces_with_timm_leaf_modules():
    """``if H == ws and W == ws`` in LocalWindowAttention stops torch.fx; timm registers the module
    as a leaf, and fxexpand uses that registration."""
    model = timm.create_model("efficientvit_m0", pretrained=False).eval()
    gm = fxexpand.trace(model)
    leaves = [n.target for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LocalWindowAttention)]
    assert len(leaves) == sum(isinstance(m, LocalWindowAttention) for m in model.modules()) > 0
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class _WithTimmLeaf(nn.Module):
    """A model holding a timm leaf module (``Conv2dSame``: TF "same" padding computed from the input
    shape at run time) between ordinary conv + BN layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.same = Conv2dSame(8, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.same(self.stem(x)))))


def test_model_with_a_timm_leaf_module_contracts_exactly():
    model = randomize_bn(_WithTimmLeaf()).eval()
    gm = fxexpand.trace(model)
    assert any(n.op == "call_module" and n.target == "same" for n in gm.graph.nodes)
    x = torch.randn(2, 3, 17, 13)
    small = fxexpand.contract(model, (x,), target="deploy")  # verifies in float32 and float64
    report = small.fxexpand_report
    assert report.verification.max_rel_error("float64") < 1e-12
    assert report._count("folded") == 1  # the stem's BN; the leaf's output BN has no conv module before it
    assert isinstance(small.get_submodule("same"), Conv2dSame)
    with torch.no_grad():
        x2 = torch.randn(1, 3, 20, 24)  # the leaf still computes its padding at run time
        assert rel_error(model(x2), small(x2)) < 1e-5


def test_timm_autowrapped_functions_are_single_calls():
    leaves, functions = timm_fx_registrations()
    assert LocalWindowAttention in leaves and resample_abs_pos_embed in functions

    class PosEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 16, 8))

        def forward(self, x):
            return x + resample_abs_pos_embed(self.pos, (2, 2), num_prefix_tokens=0)

    gm = fxexpand.trace(PosEmbed())
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is resample_abs_pos_embed]
    assert len(calls) == 1
    x = torch.randn(2, 4, 8)
    assert torch.equal(gm(x), PosEmbed.forward(gm, x))


@pytest.mark.parametrize("drop", [0.0, 0.2])
def test_batchnormact_is_a_leaf_in_both_modes_and_folds_with_its_activation(drop):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=(
        nn.Dropout if drop else None)), nn.Conv2d(4, 2, 1))
    if drop:
        model[1].drop = nn.Dropout(drop)
    for mode in (model.train(), model.eval()):
        gm = fxexpand.trace(mode)
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    gm_train = fxexpand.trace(model.train())
    # a graph compiled in training mode follows .eval(): the leaf reads self.training at run time
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    expected = model.eval()(x)
    assert torch.equal(gm_train.eval()(x), expected)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m = copy.deepcopy(model).to(dtype)
        small = fxexpand.contract(m, (x.to(dtype),), target="deploy")
        assert small.fxexpand_report._count("folded") == 1
        assert rel_error(m(x.to(dtype)), small(x.to(dtype))) < tol
        kinds = [type(small.get_submodule(n.target)).__name__ for n in small.graph.nodes if n.op == "call_module"]
        assert kinds == ["Conv2d", "ReLU", "Conv2d"]  # the BatchNorm folded; its ReLU kept; eval Dropout removed
        assert not any(isinstance(q, BatchNormAct2d) for q in small.modules())
    # the user's model keeps its module (and its mode)
    assert isinstance(model[1], BatchNormAct2d) and not model.training


def test_without_timm_the_registrations_are_empty(monkeypatch):
    monkeypatch.delitem(sys.modules, "timm")
    assert timm_fx_registrations() == ((), ())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert len(fxexpand.trace(model).graph.nodes) == 5


# ------------------------------------------------------------------------------------------------
# timm:<name> factories and the CLI

def _no_timm(monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_build_model_timm_factory_and_save_load(tmp_path):
    model = fxexpand.build_model("timm:mobilenetv3_small_050", num_classes=7)
    assert type(model).__name__ == "MobileNetV3" and model.num_classes == 7
    assert get_record(model, ModelFactory) == ModelFactory("timm:mobilenetv3_small_050", {"num_classes": 7})
    randomize_bn(model)
    path = fxexpand.save(model, tmp_path / "m.pt", input_shape=(1, 3, 32, 32))
    loaded = fxexpand.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(LoadError, match="no model named"):
        fxexpand.build_model("timm:not_a_model")
    with pytest.raises(LoadError, match="pretrained=False"):
        fxexpand.build_model("timm:mobilenetv3_small_050", pretrained=True)


def test_timm_factory_without_timm_names_the_extra(monkeypatch, tmp_path, capsys):
    _no_timm(monkeypatch)
    with pytest.raises(LoadError, match=r"pip install 'fxexpand\[timm\]'"):
        fxexpand.build_model("timm:repvgg_a0")
    out = tmp_path / "m.onnx"
    assert main(["contract", "timm:repvgg_a0", "-o", str(out)]) == 2
    assert "pip install 'fxexpand[timm]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_contracts_a_timm_model(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["contract", "timm:mobilenetv3_small_050", "-o", str(out), "--input-shape", "1,3,32,32"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 0
    assert "timm:mobilenetv3_small_050" in text and "wrote" in text
    # failures leave nothing behind
    bad = tmp_path / "bad.onnx"
    assert main(["contract", "timm:not_a_model", "-o", str(bad)]) == 2
    assert "timm has no model named 'not_a_model'" in capsys.readouterr().err
    assert main(["contract", "timm:mobilenetv3_small_050", "-o", str(bad), "--input-shape", "1,3"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ------------------------------------------------------------------------------------------------
# expansion round trips: expand -> a few SGD steps -> contract -> strict load into a fresh timm model

ROUND_TRIP_MODELS = ["mobilenetv3_small_100", "efficientnet_b0", "mobilenetv4_conv_small", "repvgg_a0"]


def _recipe(recipe: str, name: str) -> list:
    if recipe == "netbooster":
        return fxexpand.recipes.netbooster()
    if recipe == "expandnets":
        if name == "repvgg_a0":
            # the paper's layer choice expands only non-residual k×k convs, and every 3×3 conv of RepVGG
            # lies in a multi-branch (residual) block: expand eligible layers instead, a quarter of them
            # (CL, r = 4, as the recipe) to keep the test fast
            return [LinearExpand(mode="CL", ratio=4, layers="all", fraction=0.25)]
        return fxexpand.recipes.expandnets("CL")
    return fxexpand.recipes.netaug()


@torch.no_grad()
def _calibrate_bn(model: nn.Module) -> None:
    """Running statistics from 8 random images (cumulative average over two train-mode passes): after
    a few SGD steps on two images a fresh timm model's eval-mode statistics are far from its
    activations, and deep nets (mobilenetv4) overflow to inf in eval mode; with two images, the
    unbiased variances of the layers after global pooling (two values per channel) are twice the
    batch's, which compounds through depth."""
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(2):
        model(x)
    for m, mom in saved:
        m.momentum = mom


@pytest.mark.parametrize("recipe", ["netbooster", "expandnets", "netaug"])
@pytest.mark.parametrize("name", ROUND_TRIP_MODELS)
def test_expansion_round_trip_on_timm_models(name, recipe):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    big = fxexpand.compile(model, passes=_recipe(recipe, name), example_inputs=(x,))
    if recipe == "netaug":
        assert fxexpand.width_record(big).groups, "nothing was augmented"
        sampler = fxexpand.WidthSampler(big, seed=0, total_steps=2)
    else:
        assert find_regions(big), "nothing was expanded"
    opt = torch.optim.SGD(big.parameters(), lr=1e-3, momentum=0.9)
    big.train()
    for step in range(2):
        if recipe == "netaug":
            loss = fxexpand.netaug_loss(big, sampler, step, x, y, F.cross_entropy)
        else:
            loss = F.cross_entropy(big(x), y)
        opt.zero_grad()
        loss.backward()
        # NetBooster's depthwise kernel-1 convs feed BatchNorms (scale invariant: gradient ~ 1/|w|) and
        # start from PyTorch's default init (some |w| ~ 1e-4): on a fresh model and two images their
        # gradients reach 1e5, so two plain steps blow the model up; clip as a training run would
        torch.nn.utils.clip_grad_norm_(big.parameters(), 1.0)
        opt.step()
    _calibrate_bn(big)
    if recipe != "netaug":
        fxexpand.set_decay(big, 1.0)  # the end of Progressive Linearization Tuning: contraction is allowed
    big.eval()
    small = fxexpand.contract(big, (x[:1],))  # verifies float32 and float64 against the expanded model
    fresh = timm.create_model(name, pretrained=False, num_classes=10)
    fresh.load_state_dict(small.state_dict(), strict=True)
    fresh.eval()
    assert small.fxexpand_report.verification.max_rel_error("float64") < 1e-9  # the algebra is exact
    with torch.no_grad():
        want = big(x)
        assert torch.isfinite(want).all()
        assert rel_error(small(x), fresh(x)) < 1e-5
        # float32: random-init timm models are ill-conditioned (outputs up to ~1e7), so allow ten
        # times the expanded model's own float32 rounding error (its distance to its float64 twin)
        noise = rel_error(copy.deepcopy(big).double()(x.double()), want)
        assert rel_error(want, fresh(x)) <= max(1e-5, 10 * noise)
