"""Properties of every pass and recipe on random models (fxexpand.testing), derandomised.

A failure prints ``RandomCase(seed=N)``; ``fxexpand.testing.random_model(N)`` rebuilds the model and
``python -m fxexpand.testing sweep --start N --seeds 1 --verbose`` reruns every check on it. The
long sweep over thousands of seeds is documented in docs/testing.md.
"""

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn

import fxexpand
import fxexpand.testing as ft

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread-pool overhead dominates on a shared machine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*padding='same'.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        yield
    torch.set_num_threads(n)


def _show(case):
    note(f"seed={case.seed}: {case.model!r}")
    print(f"random model seed={case.seed}")


# -- expansion -> training -> alpha = 1 -> contraction, for every expansion pass and recipe ------------
@pytest.mark.parametrize("config", sorted(ft.EXPANSIONS))
@settings(max_examples=10, **SETTINGS)
@given(case=ft.models())
def test_expand_train_contract_round_trip(config, case):
    _show(case)
    result = ft.check_expansion(case.model, case.example_inputs, config, seed=case.seed)
    note(str(result))
    # a ContractionError (a region an fxexpand pass created that cannot be contracted) raises: a failure
    assert result.status in ("ok", "not applicable")
    assert (result.status == "ok") == bool(result.errors), result


@pytest.mark.parametrize("config", sorted(ft.EXPANSIONS))
def test_round_trip_is_not_vacuous(config):
    """Each configuration really expands and contracts some generated models (not only "not applicable")."""
    for seed in range(40):
        model, inputs = ft.random_model(seed)
        if ft.check_expansion(model, inputs, config, seed=seed, deploy=False).status == "ok":
            return
    pytest.fail(f"{config}: no generated model among seeds 0..39 was expanded and contracted")


# -- NetAug: base mode, every sampled configuration, contraction -------------------------------------
@settings(max_examples=40, **SETTINGS)
@given(case=ft.models())
def test_netaug_properties(case):
    _show(case)
    result = ft.check_netaug(case.model, case.example_inputs, seed=case.seed)
    note(str(result))
    assert result.status in ("ok", "not applicable")
    assert (result.status == "ok") == bool(result.errors), result


def test_netaug_properties_are_not_vacuous():
    """Most generated models with a conv have a free channel group that AugmentWidth augments."""
    statuses = [ft.check_netaug(*ft.random_model(seed), seed=seed).status for seed in range(30)]
    assert statuses.count("ok") >= 10, statuses


# -- BoostNet: exits on random backbones --------------------------------------------------------------
@settings(max_examples=30, **SETTINGS)
@given(case=ft.models())
def test_early_exit_properties(case):
    _show(case)
    result = ft.check_early_exits(case.model, case.example_inputs, seed=case.seed)
    note(str(result))
    assert result.status in ("ok", "not applicable")
    assert (result.status == "ok") == bool(result.errors), result


def test_early_exit_properties_are_not_vacuous():
    statuses = [ft.check_early_exits(*ft.random_model(seed), seed=seed).status for seed in range(30)]
    assert statuses.count("ok") >= 5, statuses


# -- deploy target, FLOPs, ONNX ---------------------------------------------------------------------
@settings(max_examples=25, **SETTINGS)
@given(case=ft.models())
def test_deploy_contraction_matches_saves_flops_and_exports(case):
    _show(case)
    result = ft.check_deploy(case.model, case.example_inputs, onnx=True)
    note(str(result))
    assert result.status == "ok"


# -- every function-preserving pass on its own ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(ft.CONTRACTION_PASSES))
@settings(max_examples=15, **SETTINGS)
@given(case=ft.models())
def test_contraction_pass_preserves_function(name, case):
    _show(case)
    ft.check_pass(name, case.model, case.example_inputs, seed=case.seed)


# -- verify_each names a deliberately broken pass -------------------------------------------------
@settings(max_examples=12, **SETTINGS)
@given(case=ft.models(), position=st.integers(0, 3))
def test_verify_each_names_the_broken_pass(case, position):
    _show(case)
    ft.check_verify_each(case.model, case.example_inputs, position)


def test_check_pass_catches_a_wrong_pass():
    """The property has teeth: a pass that changes the function fails check_pass."""
    model, inputs = ft.random_model(3)
    with pytest.raises(AssertionError, match="relative error"):
        ft.check_pass(lambda: ft.BreakOutput(), model, inputs)


# -- regressions found by the generator (seeds of the generator as committed with this file) --------
@pytest.mark.parametrize("seed,config", [(16, "netbooster"), (16, "expandnets-cl"), (21, "netbooster-match"),
                                         (25, "expandnets-cl-preserve")])
def test_regression_dilation_of_kernel_1_dims(seed, config):
    """RestoreOriginal compared dilation along kernel-1 dimensions, where it means nothing, and
    refused to restore e.g. a 1x1 conv with dilation 2 (ContractionError)."""
    model, inputs = ft.random_model(seed)
    assert ft.check_expansion(model, inputs, config, seed=seed).status == "ok"


def test_regression_dilation_of_kernel_1_dims_minimal():
    model = nn.Sequential(nn.Conv2d(3, 4, (1, 3), dilation=2, padding=(0, 2)), nn.BatchNorm2d(4)).eval()
    r = ft.check_expansion(model, (torch.randn(2, 3, 7, 9),), [fxexpand.passes.LinearExpand(mode="CL", ratio=2)])
    assert r.status == "ok"


def test_regression_netbooster_shortcut_off_the_kernel_grid():
    """Seed 22: NetBooster (kernel_size="match") added the identity shortcut to a conv with an even
    kernel and dilation 2 (k=4, d=2, p=3): the input position is not a tap of the dilated kernel, so
    the block contracted to a 7-tap kernel and could never be restored (ContractionError)."""
    model, inputs = ft.random_model(22)
    for config in ("netbooster", "netbooster-match"):  # raised ContractionError (geometry) before the fix
        assert ft.check_expansion(model, inputs, config, seed=22).status in ("ok", "not applicable")
    model = nn.Sequential(nn.Conv1d(4, 4, 4, dilation=2, padding=3), nn.ReLU()).eval()
    assert ft.check_expansion(model, (torch.randn(2, 4, 11),), "netbooster-match").status == "ok"
    conv = nn.Conv1d(4, 4, 4, dilation=2, padding=3)
    block = fxexpand.passes.InsertInvertedResidual(kernel_size="match").build_block(conv, nn.ReLU())
    assert isinstance(block, nn.Sequential)  # no shortcut
    conv = nn.Conv1d(4, 4, 5, dilation=2, padding=4)
    block = fxexpand.passes.InsertInvertedResidual(kernel_size="match").build_block(conv, nn.ReLU())
    assert not isinstance(block, nn.Sequential)  # the shortcut lands on the centre tap: kept


@pytest.mark.parametrize("seed", [5, 8])
def test_regression_onnx_same_padding_with_dilation(seed):
    """Seeds 5 and 8: a dilated conv with padding="same" exported as auto_pad=SAME_UPPER, which
    onnxruntime refuses to run (ExportError); export_onnx now writes explicit padding."""
    model, inputs = ft.random_model(seed)
    assert ft.check_deploy(model, inputs, onnx=True).status == "ok"


def test_regression_onnx_same_padding_minimal(tmp_path):
    import torch.nn.functional as F

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, (4, 3), padding="same", dilation=2)   # asymmetric: a pad op
            self.b = nn.Conv1d(3, 3, 3, padding="same", dilation=2)        # symmetric: a number
            self.w = nn.Parameter(torch.randn(3, 3, 2, 2))

        def forward(self, x):
            y = F.conv2d(self.a(x), self.w, None, 1, "same", 2)
            return self.b(y.flatten(2))

    model, x = M().eval(), torch.randn(1, 2, 6, 7)
    gm = fxexpand.trace(model)  # functional convs are rewritten in GraphModules (what contract returns)
    modules_only = nn.Sequential(model.a, nn.Flatten(2), model.b).eval()
    for m in (gm, modules_only):
        fxexpand.export_onnx(m, (x,), tmp_path / "m.onnx")  # raises ExportError if onnxruntime disagrees
    assert model.a.padding == "same" and "same" in gm.code  # export worked on a copy


def _grad_and_logit(model, x, y):
    """Gradient norm at initialisation and eval-mode max |logit| after one SGD step (lr 1e-3, momentum 0.9)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    torch.manual_seed(123)  # the same dropout / stochastic-depth draws for both models
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.flatten(1), y) if out.dim() > 1 else out.square().mean()
    loss.backward()
    grad = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    opt.step()
    model.eval()
    with torch.no_grad():
        return grad, model(x).abs().max().item()


@settings(max_examples=10, **SETTINGS)
@given(case=ft.models(head=True))
def test_netbooster_giant_starts_well_scaled(case):
    """Issue 25: the NetBooster giant's gradient norm at initialisation stays within 10x of the original's
    and its eval-mode logits after one SGD step within 10x (the inserted blocks' "scaled" init). On the
    five real backbones of tests/passes/test_insert_inverted_residual.py the gradient bound is 3x; on
    these tiny random nets (<= 8 channels, random BatchNorm statistics) 2 of 47 seeds reach 4.6-4.8x,
    which is why the bound here is looser (an open item of issue 25)."""
    _show(case)
    x = case.example_inputs[0]
    model = case.model
    classes = model(x).flatten(1).shape[1]
    y = torch.arange(x.shape[0]) % classes
    torch.manual_seed(case.seed % 2**31)  # the inserted blocks' initialisation
    try:
        expanded = fxexpand.compile(model, passes=fxexpand.recipes.netbooster(), example_inputs=(x,))
    except fxexpand.FxExpandError:
        return  # nothing NetBooster can expand in this model (the no-op error)
    if not fxexpand.core.find_regions(expanded):
        return
    g0, l0 = _grad_and_logit(copy.deepcopy(model), x, y)
    g1, l1 = _grad_and_logit(expanded, x, y)
    note(f"grad {g0} -> {g1}, logit {l0} -> {l1}")
    if g0 < 1e-8 or l0 < 1e-8:
        return  # a dead random model (every ReLU off): no scale to compare with
    assert g1 / g0 < 10.0
    assert l1 / l0 < 10.0
