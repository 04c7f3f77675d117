"""Expansion passes, decay schedules and exact contraction back to the original architecture."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxexpand
from fxexpand import ContractionError, PassError
from fxexpand.demo.models import SmallNet
from fxexpand.passes import DecayActivations, InsertInvertedResidual, LinearExpand
from fxexpand.testing import assert_unchanged, randomize_bn, rel_error, snapshot

MODELS = {
    "mobilenet_v2_0.35": lambda: torchvision.models.mobilenet_v2(weights=None, width_mult=0.35),
    "mobilenet_v2_1.0": lambda: torchvision.models.mobilenet_v2(weights=None),
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mnasnet0_5": lambda: torchvision.models.mnasnet0_5(weights=None),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(weights=None),
    "smallnet": lambda: SmallNet(),
}
HAS_BIG_KERNELS = {"resnet18", "mnasnet0_5", "efficientnet_b0", "smallnet"}
RECIPES = {
    "netbooster": lambda: fxexpand.recipes.netbooster(),
    # preserve-init keeps deep CL-expanded models at the original's scale (random init of every
    # factor shrinks activations by ~1e-24 over efficientnet's depth, useless in float32)
    "CL": lambda: [LinearExpand(mode="CL", ratio=2, init="preserve")],
    "CK": lambda: [LinearExpand(mode="CK", ratio=2)],
    "FC": lambda: [LinearExpand(mode="FC", ratio=2, init="preserve")],
}
CASES = [(m, r) for m in MODELS for r in RECIPES if r != "CK" or m in HAS_BIG_KERNELS]


def _train_steps(model, x, n_out, steps=2, lr=1e-2):
    """A few SGD steps on random data in train mode: weights and BN statistics move.
    (Gradients are clipped: tiny batches through deep nets otherwise blow the weights up.)"""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        target = torch.randn(x.shape[0], n_out, generator=gen, dtype=x.dtype)
        nn.functional.mse_loss(model(x), target).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


@pytest.mark.parametrize("model_name,recipe", CASES)
def test_expand_train_contract_restores_original(model_name, recipe):
    torch.manual_seed(0)
    original = MODELS[model_name]()
    snap = snapshot(original)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    expanded = fxexpand.compile(original, passes=RECIPES[recipe]())
    assert_unchanged(original, snap)  # the input model is never modified
    n_expanded = sum(n.action == "expanded" for n in expanded.fxexpand_notes)
    assert n_expanded > 0, [str(n) for n in expanded.fxexpand_notes]
    expanded = expanded.double()
    n_out = 10 if model_name == "smallnet" else 1000
    _train_steps(expanded, x, n_out)
    if fxexpand.training.decay_modules(expanded):
        with pytest.raises(ContractionError, match="not linear yet"):
            fxexpand.contract(expanded, (x,))
        fxexpand.set_decay(expanded, 1.0)
    small = fxexpand.contract(expanded, (x,))
    # strict load into a fresh original: same keys and shapes
    fresh = MODELS[model_name]().double().eval()
    fresh.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        for _ in range(2):
            xi = torch.randn(4, 3, 32, 32, dtype=torch.float64)
            assert rel_error(expanded(xi), fresh(xi)) <= 1e-9
    assert fxexpand.count_flops(fresh, (x,)) == fxexpand.count_flops(original.double(), (x,))
    assert fxexpand.count_parameters(fresh) == fxexpand.count_parameters(original)
    # float32: contract the same expanded model in float32
    e32 = copy.deepcopy(expanded).float()
    s32 = fxexpand.contract(e32, (x.float(),))
    fresh32 = MODELS[model_name]().eval()
    fresh32.load_state_dict(s32.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_error(e32(x.float()), fresh32(x.float())) <= 1e-4


class ConvNet1d(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.a = nn.Conv1d(3, 8, 5, padding=2, bias=bias)
        self.bn_a = nn.BatchNorm1d(8)
        self.b = nn.Conv1d(8, 8, 1, bias=bias)
        self.bn_b = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.nn.functional.gelu(self.bn_b(self.b(x)))
        return self.head(x.mean(-1))


@pytest.mark.parametrize("kernel_size", [1, "match"])
def test_inverted_residual_on_conv1d_with_shortcut(kernel_size):
    model = randomize_bn(ConvNet1d()).double()
    x = torch.randn(3, 3, 21, dtype=torch.float64)
    targets = ["b"] if kernel_size == 1 else ["a", "b"]
    e = fxexpand.compile(model, passes=[InsertInvertedResidual(targets=targets, kernel_size=kernel_size),
                                        DecayActivations()])
    region = e.get_submodule("b")
    assert isinstance(region, fxexpand.ExpandedRegion) and region.original_type == "Conv1d"
    assert isinstance(region.body, fxexpand.core.Residual)  # 8 -> 8, stride 1: shortcut
    acts = fxexpand.training.decay_modules(e)
    assert {m.kind for m in acts.values()} >= {"blend"}  # GELU next to b: blend
    _train_steps(e, x, 4)
    fxexpand.set_decay(e, 1.0)
    small = fxexpand.contract(e, (x,))
    fresh = ConvNet1d().double().eval()
    fresh.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert rel_error(e(x), fresh(x)) <= 1e-9
    assert any(n.action == "absorbed" for n in small.fxexpand_report.notes)  # bias -> BN running_mean


def test_activation_defaults_to_the_models():
    e = fxexpand.compile(ConvNet1d(), passes=[InsertInvertedResidual(targets=["a", "b"], kernel_size="match")])
    assert isinstance(e.get_submodule("a").body.body[2] if hasattr(e.get_submodule("a").body, "body")
                      else e.get_submodule("a").body[2], nn.ReLU)
    assert isinstance(e.get_submodule("b").body.body[2], nn.GELU)
    e = fxexpand.compile(ConvNet1d(), passes=[InsertInvertedResidual(targets=["b"], activation=nn.SiLU)])
    assert isinstance(e.get_submodule("b").body.body[2], nn.SiLU)


def test_bias_without_following_bn_cannot_be_absorbed():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU())
    # the pass decides at selection that the region could not be contracted, and says why
    with pytest.raises(PassError, match="cannot expand 0 .*bias=False.*no BatchNorm"):
        fxexpand.compile(model, passes=[InsertInvertedResidual(targets=["0"]), DecayActivations()])
    # a region built by other means still gets a clear refusal from contract
    e = fxexpand.compile(model, passes=[])
    block = InsertInvertedResidual().build_block(e.get_submodule("0"), nn.Identity())
    e.add_submodule("0", fxexpand.ExpandedRegion(block, e.get_submodule("0"), method="by hand"))
    e.recompile()
    randomize_bn(e)
    with pytest.raises(ContractionError, match="absorb"):
        fxexpand.contract(e, (torch.randn(1, 3, 5, 5),))


def test_undecayed_region_is_refused_with_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    e = fxexpand.compile(model, passes=[InsertInvertedResidual(targets=["0"])])  # no DecayActivations
    with pytest.raises(ContractionError, match="did not contract.*ReLU|0.body"):
        fxexpand.contract(e, (torch.randn(1, 3, 5, 5),))
    e = fxexpand.compile(model, passes=[InsertInvertedResidual(targets=["0"]), DecayActivations()])
    fxexpand.set_decay(e, 0.5)
    with pytest.raises(ContractionError, match=r"0\.body\.2 \(alpha=0\.5\)"):
        fxexpand.contract(e, (torch.randn(1, 3, 5, 5),))
    fxexpand.set_decay(e, 1.0)
    fxexpand.contract(e, (torch.randn(1, 3, 5, 5),))


@pytest.mark.parametrize("mode,layer,shape", [
    ("CL", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
    ("CL", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (2, 6, 7, 7)),
    ("CL", lambda: nn.Conv2d(4, 8, (3, 5), padding=(1, 2), groups=2, dilation=(2, 1)), (2, 4, 11, 9)),
    ("CL", lambda: nn.Conv1d(3, 5, 5, padding=2), (2, 3, 13)),
    ("FC", lambda: nn.Linear(6, 3), (4, 6)),
    ("FC", lambda: nn.Linear(3, 7, bias=False), (4, 3)),
])
@pytest.mark.parametrize("fc_layers", [2, 3])
def test_preserve_init_is_exact_and_full_rank(mode, layer, shape, fc_layers):
    model = nn.Sequential(layer()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    e = fxexpand.compile(model, passes=[LinearExpand(mode=mode, ratio=3, init="preserve", fc_layers=fc_layers)])
    body = e.get_submodule("0").body
    with torch.no_grad():
        assert rel_error(model(x), e(x)) <= 1e-12
    for f in body:
        w = f.weight.detach()
        g = getattr(f, "groups", 1)
        co = w.shape[0] // g
        for gi in range(g):
            blk = w[gi * co:(gi + 1) * co].reshape(co, w.shape[1], -1)
            for t in range(blk.shape[2]):
                assert torch.linalg.matrix_rank(blk[:, :, t]) == min(blk.shape[:2])
    # and every factor receives gradient
    e.train()
    e(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body.parameters())


def test_preserve_refused_for_ck():
    with pytest.raises(ValueError, match="CK"):
        LinearExpand(mode="CK", init="preserve")


def test_ck_places_stride_last_and_padding_first():
    e = fxexpand.compile(nn.Sequential(nn.Conv2d(3, 4, 7, stride=2, padding=3)), passes=[LinearExpand(mode="CK")])
    convs = list(e.get_submodule("0").body)
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3
    assert [c.padding for c in convs] == [(3, 3), (0, 0), (0, 0)]
    assert [c.stride for c in convs] == [(1, 1), (1, 1), (2, 2)]


def test_selection_modes_and_errors():
    model = SmallNet()
    e = fxexpand.compile(model, passes=[LinearExpand(mode="CL", fraction=0.5)])
    expanded = [n.where for n in e.fxexpand_notes if n.action == "expanded"]
    assert expanded == ["features.0", "features.8"]
    e = fxexpand.compile(model, passes=[LinearExpand(mode="CL", targets=lambda name, m: m.out_channels == 16)])
    assert [n.where for n in e.fxexpand_notes if n.action == "expanded"] == ["features.4"]
    with pytest.raises(PassError, match="features.1 .no such conv/linear"):
        fxexpand.compile(model, passes=[LinearExpand(mode="CL", targets=["features.1"])])
    with pytest.raises(PassError, match="nope"):
        fxexpand.compile(model, passes=[LinearExpand(mode="CL", targets=["nope"])])
    with pytest.raises(ValueError):
        LinearExpand(mode="XL")
    with pytest.raises(ValueError):
        InsertInvertedResidual(fraction=2.0)


def test_netbooster_selects_every_other_block_first_pointwise():
    e = fxexpand.compile(torchvision.models.mobilenet_v2(weights=None), passes=fxexpand.recipes.netbooster())
    expanded = [n.where for n in e.fxexpand_notes if n.action == "expanded"]
    # 17 inverted residual blocks (features.1..17): every other one, first pointwise conv in each
    assert expanded[:3] == ["features.1.conv.1", "features.3.conv.0.0", "features.5.conv.0.0"]
    assert len(expanded) == 9
    skipped = {n.where: n.reason for n in e.fxexpand_notes if n.action == "skipped"}
    assert "not the first eligible layer" in skipped["features.3.conv.2"]


def test_shared_module_is_not_expanded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.c(self.c(x))

    e = fxexpand.compile(Shared(), passes=[LinearExpand(mode="CL")])
    assert not any(n.action == "expanded" for n in e.fxexpand_notes)
    assert any("rule 7" in n.reason for n in e.fxexpand_notes)


def test_decay_kinds():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Hardswish())
    with pytest.raises(ValueError):
        DecayActivations(kind="nope")
    e = fxexpand.compile(model, passes=[InsertInvertedResidual(targets=["0"]), DecayActivations(kind="leaky")])
    assert any("does not apply to Hardswish" in n.reason for n in e.fxexpand_notes)
    e = fxexpand.compile(model, passes=[InsertInvertedResidual(targets=["0"]), DecayActivations(kind="blend")])
    assert {m.kind for m in fxexpand.training.decay_modules(e).values()} == {"blend"}


def test_linear_decay_schedule_and_state_dict_round_trip():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    passes = [InsertInvertedResidual(targets=["0"]), DecayActivations()]
    e = fxexpand.compile(model, passes=passes)
    sched = fxexpand.LinearDecay(e, total_steps=10, start_step=2)
    assert fxexpand.get_decay(e) == 0.0
    for _ in range(5):
        sched.step()
    assert sched.global_step == 5 and fxexpand.get_decay(e) == pytest.approx(0.3)
    # resume: a new process rebuilds the expanded model and loads the state_dict
    e2 = fxexpand.compile(model, passes=passes)
    e2.load_state_dict(e.state_dict())
    sched2 = fxexpand.LinearDecay(e2, total_steps=10, start_step=2)
    assert sched2.global_step == 5 and fxexpand.get_decay(e2) == fxexpand.get_decay(e)
    for _ in range(20):
        sched.step()
        sched2.step()
    assert fxexpand.get_decay(e) == fxexpand.get_decay(e2) == 1.0 and sched.done
    sched.step(3)
    assert fxexpand.get_decay(e) == pytest.approx(0.1)
    sched2.load_state_dict(sched.state_dict())
    assert fxexpand.get_decay(e2) == pytest.approx(0.1)
    plain = fxexpand.LinearDecay(model, total_steps=10)  # no decaying activations: only counts steps
    assert plain.step() == 1.0 and plain.global_step == 1
    with pytest.raises(ValueError):
        fxexpand.set_decay(e, 1.5)


def test_expansion_report_and_deploy_target():
    model = randomize_bn(SmallNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    e = fxexpand.compile(model, passes=fxexpand.recipes.expandnets("CK", ratio=2))
    rep = fxexpand.expansion_report(model, e, (x,))
    assert rep["original"]["parameters"] < rep["expanded"]["parameters"]
    assert rep["contracted"]["parameters"] == rep["original"]["parameters"]
    assert rep["contracted"]["flops"] == rep["original"]["flops"]
    assert set(rep["expanded_layers"]) == {"features.0", "features.4", "features.8", "classifier.1"}  # the paper: hidden FCs only
    deploy = fxexpand.contract(e.eval(), (x,), target="deploy")
    assert fxexpand.count_flops(deploy, (x,)) <= fxexpand.count_flops(model, (x,))
