"""contract(): round trips on torchvision models and a Conv1d model, targets, reports."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxexpand
from fxexpand import count_flops
from fxexpand.testing import assert_unchanged, randomize_bn, rel_error, snapshot

TV_MODELS = ["mobilenet_v2", "resnet18", "efficientnet_b0", "mnasnet0_5", "shufflenet_v2_x0_5", "regnet_x_400mf"]


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(2, 8, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        self.expand = nn.Conv1d(8, 32, 1)
        self.project = nn.Conv1d(32, 8, 3, padding=0)  # linear chain 8->32->8, FLOP-saving to fuse? no
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = self.project(self.expand(x))
        x = x + self.bn(self.dw(x))
        return self.head(x.mean(-1))


def _build(name):
    if name == "conv1d":
        return Conv1dNet(), (2, 2, 37)
    return torchvision.models.get_model(name, weights=None), (1, 3, 64, 64)


@pytest.mark.parametrize("name", TV_MODELS + ["conv1d"])
def test_round_trip_deploy(name):
    model, shape = _build(name)
    model = randomize_bn(model).eval()
    snap = snapshot(model)
    x = torch.randn(*shape)
    small = fxexpand.contract(model, (x,), target="deploy")
    assert_unchanged(model, snap)  # the user's model is untouched
    rep = small.fxexpand_report
    assert rep.verification.passed
    assert rep.verification.max_rel_error("float64") <= 1e-10
    with torch.no_grad():
        assert rel_error(model(x), small(x)) <= 1e-4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small.modules()), "every BN is folded"
    assert count_flops(small, (x,)) <= count_flops(model, (x,))
    # float64 end to end: the algebra itself is exact
    m64 = copy.deepcopy(model).double()
    s64 = fxexpand.contract(m64, (x.double(),), target="deploy")
    with torch.no_grad():
        for _ in range(2):
            x64 = torch.randn(*shape, dtype=torch.float64)
            assert rel_error(m64(x64), s64(x64)) <= 1e-10


def test_conv1d_chain_is_fused_when_profitable():
    model = randomize_bn(Conv1dNet()).eval()
    small = fxexpand.contract(model, (torch.randn(2, 2, 37),), target="deploy")
    fused = [n for n in small.fxexpand_report.notes if n.action == "fused"]
    assert any("expand -> project" in n.where for n in fused)  # 8->32->8 with k=1 then 3: 24*8*... cheaper fused
    assert any("identity residual" == n.reason for n in fused)


def test_original_target_is_a_noop_without_expanded_regions():
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(1, 3, 32, 32)
    small = fxexpand.contract(model, (x,))
    assert small.fxexpand_report.target == "original"
    sd, ref = small.state_dict(), model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(sd)  # strict: the original architecture
    assert not small.fxexpand_report.fused


def test_contract_train_mode_model_and_report_text():
    model = randomize_bn(Conv1dNet()).train()
    snap = snapshot(model)
    small = fxexpand.contract(model, (torch.randn(2, 2, 37),), target="deploy")
    assert model.training and not small.training
    assert_unchanged(model, snap)
    text = str(small.fxexpand_report)
    assert "folded" in text and "target=deploy" in text


def test_contract_rejects_bad_arguments():
    with pytest.raises(ValueError):
        fxexpand.contract(Conv1dNet(), (torch.randn(2, 2, 37),), target="fast")
    with pytest.raises(fxexpand.InputError):
        fxexpand.contract(Conv1dNet(), (torch.randn(2, 5, 37),))
    with pytest.raises(TypeError):
        fxexpand.contract("resnet", (torch.randn(2, 5, 37),))


def test_contract_verify_each_pass():
    model = randomize_bn(Conv1dNet()).eval()
    small = fxexpand.contract(model, (torch.randn(2, 2, 37),), target="deploy", verify_each=True)
    assert small.fxexpand_report.verification.passed


# -- contract traces the user's model without copying it: nothing of theirs may change ----------------
class _CachingBlock(nn.Module):
    """A forward that fills a cache attribute in eval mode (as timm's LeViT attention does)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.cache = {}
        self.calls = []

    def forward(self, x):
        if not self.training:
            self.cache["last"] = x
            self.calls.append(1)
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("target", ["deploy", "original"])
def test_contract_never_changes_the_model_it_traces_without_a_copy(target):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), _CachingBlock(),
                                       nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))
    model.train()
    model[2].eval()  # mixed training flags are kept as they are
    versions = {k: v._version for k, v in model.state_dict().items()}
    tensors = {id(t) for t in [*model.parameters(), *model.buffers()]}
    snap = snapshot(model)
    x = torch.randn(2, 3, 6, 6)
    small = fxexpand.contract(model, (x,), target=target)
    assert_unchanged(model, snap)
    assert model[2].cache == {} and model[2].calls == []  # what tracing put there is gone
    assert {k: v._version for k, v in model.state_dict().items()} == versions  # no tensor written in place
    # the result shares no tensor and no module with the model
    assert not tensors & {id(t) for t in [*small.parameters(), *small.buffers()]}
    assert not {id(m) for m in model.modules()} & {id(m) for m in small.modules()}
    assert small.fxexpand_report.verification.passed


def test_a_failed_contraction_leaves_the_model_as_it_was():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.seen = []

        def forward(self, x):
            self.seen.append(x)
            if x.sum() > 0:  # data-dependent control flow: tracing fails here
                return self.conv(x)
            return x

    model = Bad().train()
    snap = snapshot(model)
    with pytest.raises(fxexpand.TraceError):
        fxexpand.contract(model, (torch.randn(1, 3, 4, 4),))
    assert_unchanged(model, snap)
    assert model.seen == []
