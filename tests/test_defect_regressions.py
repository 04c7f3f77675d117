"""Regression tests for the defects issue 12 lists; each failed before its fix."""

import importlib.util

import pytest
import torch
from torch import nn

import fxexpand
import fxexpand.testing as ft
from fxexpand import ContractionError, InputError, PassError, PassManager
from fxexpand.core import Pass
from fxexpand.passes import FoldBatchNorm, InsertInvertedResidual


class TCResNetLike(nn.Module):
    """A TC-ResNet-style Conv1d net: a bias-free stem conv that no BatchNorm follows, then blocks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(8, 12, 3, padding=1, bias=False)
        self.block = nn.Sequential(nn.Conv1d(12, 12, 1, bias=False), nn.BatchNorm1d(12), nn.ReLU(),
                                   nn.Conv1d(12, 12, 3, padding=1, bias=False), nn.BatchNorm1d(12), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(x.mean(-1))


# -- 1. an expansion the library cannot contract is not created ------------------------------------------------
def test_bias_free_conv_without_batchnorm_is_not_expanded_and_the_report_says_why():
    model = ft.randomize_bn(TCResNetLike()).double().eval()
    x = torch.randn(2, 8, 20, dtype=torch.float64)
    expanded = fxexpand.compile(model, passes=[InsertInvertedResidual(fraction=1.0, kernel_size="match"),
                                               fxexpand.passes.DecayActivations()], example_inputs=(x,))
    regions = fxexpand.core.find_regions(expanded)
    assert "stem" not in regions and "block.0" in regions and "block.3" in regions
    why = [n.reason for n in expanded.fxexpand_notes if n.where == "stem" and n.action == "skipped"]
    assert why and "bias=False" in why[0] and "no BatchNorm" in why[0]
    ft.randomize_bn(expanded, seed=4)
    fxexpand.set_decay(expanded, 1.0)
    small = fxexpand.contract(expanded.eval(), (x,))  # raised ContractionError before the fix
    model.load_state_dict(small.state_dict())
    assert ft.rel_error(expanded(x), model(x)) <= 1e-9


@pytest.mark.parametrize("config", ["netbooster", "netbooster-match", "inverted_residual-all",
                                    "inverted_residual-match-blend"])
def test_random_models_that_were_refused_now_round_trip(config):
    """The property check no longer has a "refused" outcome: seeds 0..39 all expand and contract (or
    expand nothing), where 15 of 40 netbooster round trips were refused before the fix."""
    statuses = {ft.check_expansion(*ft.random_model(seed), config, seed=seed, deploy=False).status
                for seed in range(0, 40, 3)}
    assert statuses <= {"ok", "not applicable"} and "ok" in statuses


# -- 2. set_decay / LinearDecay on a linear-only recipe ------------------------------------------------------
def test_set_decay_on_linear_only_expansion_is_a_noop_that_reports_zero():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    expanded = fxexpand.compile(model, passes=fxexpand.recipes.expandnets("CL", ratio=2))
    assert fxexpand.set_decay(expanded, 1.0) == 0  # raised ValueError before the fix
    schedule = fxexpand.LinearDecay(expanded, total_steps=4)
    assert schedule.step() == 1.0 and schedule.global_step == 1 and schedule.done
    fxexpand.contract(expanded, (x,))
    boosted = fxexpand.compile(model, passes=fxexpand.recipes.netbooster(targets=None, fraction=1.0, kernel_size="match"))
    assert fxexpand.set_decay(boosted, 0.5) == 2 * len(fxexpand.core.find_regions(boosted))
    with pytest.raises(ContractionError, match="not linear yet"):
        fxexpand.contract(boosted, (x,))


# -- 3. PassManager names the pass for every fxexpand error ---------------------------------------------------
class RaisesInputError(Pass):
    def call(self, gm):
        raise InputError("the inputs do not fit")


class RaisesContractionError(Pass):
    def call(self, gm):
        raise ContractionError("cannot contract this")


@pytest.mark.parametrize("failing,kind", [(RaisesInputError, InputError), (RaisesContractionError, ContractionError)])
def test_manager_names_the_pass_for_any_fxexpand_error(failing, kind):
    gm = fxexpand.trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval())
    with pytest.raises(kind) as ei:
        PassManager(passes=[FoldBatchNorm(), failing()])(gm)
    msg = str(ei.value)
    assert f"pass {failing.__name__} failed" in msg and "FoldBatchNorm" in msg


def test_nested_managers_name_the_pass_once():
    gm = fxexpand.trace(nn.Sequential(nn.Conv2d(3, 3, 1)))
    inner = PassManager(passes=[RaisesInputError()])
    with pytest.raises(InputError) as ei:
        PassManager(passes=[inner])(gm)
    assert str(ei.value).count("failed (passes run before it") == 1


# -- 4. bench --help without the extras; square brackets survive rich ---------------------------------------
def test_bench_help_works_without_the_bench_extras(monkeypatch, capsys):
    from fxexpand import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as ei:
        cli.main(["bench", "--help"])
    assert ei.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert cli.main(["bench", "--quick"]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err  # rich used to swallow "[bench]"


def test_error_messages_keep_square_brackets(capsys):
    from fxexpand import cli

    cli._fail("see [FoldBatchNorm] skipped: conv [bold]x[/bold]")
    assert "[FoldBatchNorm] skipped: conv [bold]x[/bold]" in capsys.readouterr().err


# -- 5. registered names that cannot be built by name -----------------------------------------------------------
@pytest.mark.parametrize("name,needs", [("verify", "reference"), ("insert_ema_blocks", "ema_model")])
def test_pass_needing_arguments_is_refused_by_name_with_what_it_needs(name, needs):
    with pytest.raises(PassError, match=f"cannot be built by name.*{needs}"):
        fxexpand.build_pass(name)
    with pytest.raises(PassError, match=needs):
        fxexpand.compile(nn.Linear(2, 2), passes=[name])
    assert fxexpand.core.required_arguments(fxexpand.get_pass(name))


def test_passes_without_required_arguments_build_by_name():
    for name, cls in fxexpand.registered_passes().items():
        if not fxexpand.core.required_arguments(cls):
            assert isinstance(fxexpand.build_pass(name), cls)


# -- ordering constraints are declared, and a manager that breaks one is refused ----------------------------
def test_manager_refuses_an_order_that_breaks_a_declared_constraint():
    with pytest.raises(PassError, match="fold_batchnorm must run before restore_original"):
        PassManager(passes=[fxexpand.passes.RestoreOriginal(), FoldBatchNorm()])
    with pytest.raises(PassError, match="fuse_linear must run before restore_original"):
        PassManager(passes=[fxexpand.passes.RestoreOriginal(), fxexpand.passes.FuseLinear()])
    with pytest.raises(PassError, match="fold_batchnorm must run before remove_identity"):
        PassManager(passes=[fxexpand.passes.RemoveIdentity(), FoldBatchNorm()],
                    constraints=[("fold_batchnorm", "remove_identity")])
    PassManager(passes=[FoldBatchNorm(), fxexpand.passes.RestoreOriginal()])  # the declared order is accepted


# -- preconditions are checked before anything changes ---------------------------------------------------------
def test_insert_ema_blocks_refuses_before_changing_anything():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    full = nn.Sequential(nn.Conv2d(3, 4, 1), *[Block() for _ in range(4)])
    x = torch.randn(1, 3, 6, 6)
    plan = fxexpand.GrowthPlan(full, depth_factor=0.5, stages=2, example_inputs=(x,))
    start = plan.initial_model()
    wrong_ema = nn.Sequential(nn.Conv2d(3, 4, 1), *[nn.Conv2d(4, 4, 1) for _ in range(4)])
    before = ft.graph_signature(start)
    snap = ft.snapshot(start)
    with pytest.raises(fxexpand.PreconditionError, match="does not match"):
        fxexpand.passes.InsertEMABlocks(ema_model=wrong_ema, count=1)(start)
    assert ft.graph_signature(start) == before  # nothing half rewritten (submodules were deleted before)
    ft.assert_unchanged(start, snap, "a refused InsertEMABlocks")
    assert len(start(x)) == 1
