"""Issue 16, items 2 and 3: fxexpand's generic contraction against timm's hand-written
``reparameterize_model`` on the parity models (pretrained=False, BatchNorm statistics randomised,
float64, 1x3x64x64): no more convolutions and no more parameters than timm leaves, and the float64
error against the train-time model at most 1e-9. The latency comparison is the benchmark
``benchmarks/reparam_bench.py`` (docs/benchmarks.md)."""

import copy

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand.testing import randomize_bn, rel_error

timm = pytest.importorskip("timm")

PARITY_MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m0_9"]
#: the other block families of issue 16: GhostNet-v3 (re-parameterisable ghost modules), SHViT
#: (residual depthwise conv-BN)
OTHER_FAMILIES = ["ghostnetv3_050", "shvit_s1"]


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PARITY_MODELS + OTHER_FAMILIES)
def test_deploy_contraction_matches_timm_reparameterize(name):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False)).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    small = fxexpand.contract(model, (x,), target="deploy", verify=False)
    deployed = timm.utils.model.reparameterize_model(copy.deepcopy(model))
    assert _convs(small) <= _convs(deployed)
    assert _params(small) <= _params(deployed)
    with torch.no_grad():
        assert rel_error(model(x), small(x)) <= 1e-9
        x2 = torch.randn(2, 3, 96, 80, dtype=torch.float64)  # another input size: no shape was frozen
        assert rel_error(model(x2), small(x2)) <= 1e-9
