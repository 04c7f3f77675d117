"""fxexpand.testing.random_model: coverage across seeds, reproducibility, validity; the strategies."""

import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import fxexpand
import fxexpand.testing as ft
from fxexpand.core import module_call_counts

N_COVERAGE = 150


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: with two threads on a shared machine each op waits on the thread pool
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*padding='same'.*")
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def generated():
    return [(s, *ft.random_model(s)) for s in range(N_COVERAGE)]


def test_reproducible_from_seed():
    for seed in (0, 1, 17, 123456):
        m1, (x1,) = ft.random_model(seed)
        m2, (x2,) = ft.random_model(seed)
        assert repr(m1) == repr(m2) and m1.program == m2.program and m1.features == m2.features
        assert torch.equal(x1, x2)
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert list(s1) == list(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
        with torch.no_grad():
            assert torch.equal(m1(x1), m2(x2))
    # the global RNG is neither used nor disturbed
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    ft.random_model(9)
    assert torch.equal(torch.rand(3), a)


def test_seeds_differ():
    reprs = {repr(ft.random_model(s)[0]) for s in range(20)}
    assert len(reprs) >= 18


def test_valid_by_construction(generated):
    """Every model runs on its inputs, gives the shape the builder predicted, traces to the same
    function, and its outputs are finite and (almost always) depend on the input."""
    constant = []
    for seed, model, (x,) in generated:
        assert not model.training
        with torch.no_grad():
            y = model(x)
            gm = fxexpand.trace(model)
            assert torch.equal(gm(x), y), seed
            y2 = model(torch.randn_like(x))
        assert tuple(y.shape) == model.output_shape, seed
        assert torch.isfinite(y).all(), seed
        if torch.equal(y, y2):
            constant.append(seed)
    # padding up to k (asked for) lets a strided kernel-1 conv read only the zero border: rare, valid
    assert len(constant) <= len(generated) // 30, constant


REQUIRED = {
    "Conv1d", "Conv2d", "F.conv1d", "F.conv2d",
    *(f"kernel={k}" for k in range(1, 8)), "kernel_even", "kernel_odd", "kernel_square", "kernel_nonsquare",
    "stride=1", "stride=2", "padding=0", "padding=1..k-1", "padding=k", "padding=same", "dilation=1", "dilation=2",
    "groups=1", "groups=2", "depthwise", "bias", "no_bias",
    "BatchNorm", "BatchNorm(affine=False)", "BatchNorm(track_running_stats=False)", "F.batch_norm",
    "ReLU", "ReLU6", "LeakyReLU", "GELU", "SiLU", "Hardswish", "F.relu", "torch.relu",
    "residual", "parallel", "concat", "maxpool", "avgpool", "flatten", "Linear", "F.linear", "add(+)",
    "add(torch.add)", "shared_module", "Identity", "Dropout", "F.dropout",
}


def test_feature_coverage_across_seeds(generated):
    seen = set().union(*(m.features for _, m, _ in generated))
    assert REQUIRED <= seen, sorted(REQUIRED - seen)


def test_features_match_the_model(generated):
    """The feature list is not just the generator's word: check it against the module tree and trace."""
    for seed, model, _ in generated:
        mods = list(model.modules())
        f = model.features
        assert ("Conv1d" in f) == any(type(m) is nn.Conv1d for m in mods), seed
        assert ("Conv2d" in f) == any(type(m) is nn.Conv2d for m in mods), seed
        no_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in mods)
        assert no_stats == any("track_running_stats=False" in x for x in f), seed
        gm = fxexpand.trace(model)
        shared = any(n > 1 for n in module_call_counts(gm).values())
        assert ("shared_module" in f) == shared, seed
        funcs = {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}
        assert ("F.conv2d" in f or "F.conv1d" in f) == bool(funcs & {"conv1d", "conv2d"}), seed
        for m in mods:  # BatchNorm statistics are randomised (default ones hide folding bugs)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                assert not torch.equal(m.running_var, torch.ones_like(m.running_var)), seed


def test_limits_are_respected_and_checked():
    for seed in range(12):
        m, (x,) = ft.random_model(seed, nd=1, head=False, batch=3, max_blocks=1, max_channels=3)
        assert x.shape[0] == 3 and x.dim() == 3
        assert not any(isinstance(k, (nn.Conv2d, nn.Linear)) for k in m.modules())
        assert sum(isinstance(k, ft.RandomBlock) for k in m.modules()) <= 1
        assert m(x).dim() == 3
        m, (x,) = ft.random_model(seed, nd=2, head=True)
        assert x.dim() == 4 and m(x).dim() == 2
    with pytest.raises(ValueError, match="max_channels"):
        ft.random_model(0, max_channels=1000)
    with pytest.raises(ValueError, match="batch"):
        ft.random_model(0, batch=1)
    with pytest.raises(TypeError, match="unknown limit"):
        ft.random_model(0, channels=3)
    with pytest.raises(ValueError, match="seed"):
        ft.random_model(-1)


@settings(derandomize=True, deadline=None, max_examples=5)
@given(ft.models(max_blocks=2))
def test_models_strategy(case):
    assert isinstance(case.model, ft.RandomNet) and case.model.seed == case.seed
    assert "random_model(%d" % case.seed in repr(case)  # a failing example prints how to reproduce it
    again, inputs = ft.random_model(case.seed, max_blocks=2)
    assert repr(again) == repr(case.model) and torch.equal(inputs[0], case.example_inputs[0])


def test_strategies_explain_missing_hypothesis(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.setitem(sys.modules, "hypothesis.strategies", None)
    with pytest.raises(ImportError, match="pip install hypothesis"):
        ft.models()
    ft.random_model(0)  # the generator itself does not need hypothesis


def test_generated_models_survive_pickle_and_deepcopy(tmp_path):
    import copy

    m, (x,) = ft.random_model(11)
    torch.save(m, tmp_path / "m.pt")
    for other in (copy.deepcopy(m), torch.load(tmp_path / "m.pt", weights_only=False)):
        with torch.no_grad():
            assert torch.equal(other(x), m(x))
