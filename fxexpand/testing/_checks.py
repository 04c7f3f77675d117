"""Property checks run on generated models (by the tests, and by ``python -m fxexpand.testing sweep``)."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import onnxruntime as ort
import torch
import torch.fx as fx
from torch import nn

from .. import recipes
from ..api import compile as fx_compile
from ..api import contract
from ..core import (
    DynamicLayer,
    EquivalenceError,
    Pass,
    PreconditionError,
    PassManager,
    PassResult,
    find_regions,
    flatten_outputs,
    propagate_shapes,
    trace,
)
from ..deploy.cost import count_flops
from ..deploy.export import export_onnx
from ..training.netaug import WidthSampler, netaug_loss, set_width, use_width
from ..passes import (
    AugmentWidth,
    InsertEarlyExits,
    DecayActivations,
    FoldBatchNorm,
    FuseLinear,
    InsertInvertedResidual,
    LinearExpand,
    RemoveIdentity,
)
from ..training.schedule import set_decay
from ._helpers import require, assert_unchanged, rel_error, snapshot

__all__ = [
    "CheckResult",
    "EXPANSIONS",
    "CONTRACTION_PASSES",
    "check_expansion",
    "check_deploy",
    "check_pass",
    "check_verify_each",
    "check_netaug",
    "check_early_exits",
    "BreakOutput",
]

RTOL64 = 1e-9


def _expansions() -> dict[str, Callable[[], list]]:
    return {
        "netbooster": lambda: recipes.netbooster(),
        "netbooster-match": lambda: recipes.netbooster(kernel_size="match", ratio=2),
        "inverted_residual-all": lambda: [InsertInvertedResidual(fraction=1.0, ratio=2), DecayActivations()],
        "inverted_residual-match-blend": lambda: [
            InsertInvertedResidual(fraction=1.0, ratio=2, kernel_size="match", shortcut=False),
            DecayActivations(kind="blend")],
        "expandnets-cl": lambda: recipes.expandnets("CL", ratio=2),
        "expandnets-cl-all": lambda: recipes.expandnets("CL", ratio=2, layers="all"),
        "expandnets-ck": lambda: recipes.expandnets("CK", ratio=2, fc=False),
        "expandnets-ck-init": lambda: recipes.expandnets("CK", ratio=2, init="nonlinear"),
        "expandnets-fc2": lambda: [LinearExpand(mode="FC", ratio=2, fc_layers=2)],
        "expandnets-cl-preserve": lambda: [LinearExpand(mode="CL", ratio=2, init="preserve", fraction=0.5)],
    }


#: expansion configurations checked by :func:`check_expansion`: name -> factory of a pass list
EXPANSIONS: dict[str, Callable[[], list]] = _expansions()


def _contraction_passes() -> dict[str, Callable[[], Pass]]:
    return {
        "remove_identity": lambda: RemoveIdentity(),
        "fold_batchnorm": lambda: FoldBatchNorm(),
        "fuse_linear": lambda: FuseLinear(),
        "fuse_linear(allow_flop_increase)": lambda: FuseLinear(allow_flop_increase=True),
    }


#: function-preserving passes checked by :func:`check_pass`: name -> factory
CONTRACTION_PASSES: dict[str, Callable[[], Pass]] = _contraction_passes()


@dataclass
class CheckResult:
    """Outcome of one check: ``status`` is ``"ok"`` or ``"not applicable"`` (the pass expanded
    nothing). Every failure raises instead: ``AssertionError`` for a broken property, an fxexpand
    error (a :class:`~fxexpand.ContractionError` included: a region an fxexpand pass created must
    always contract) otherwise."""

    check: str
    status: str
    detail: str = ""
    errors: dict[str, float] = field(default_factory=dict)


def _random_inputs(inputs: tuple, gen: torch.Generator, n: int) -> list[tuple]:
    out = [tuple(inputs)]
    for _ in range(n - 1):
        out.append(tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in inputs))
    return out


def _compare(ref: nn.Module, cand: nn.Module, trials: list[tuple], what: str, rtol: float) -> float:
    worst = 0.0
    with torch.no_grad():
        for xs in trials:
            a, b = ref(*xs), cand(*xs)
            require(a.shape == b.shape, f"{what}: output shape {tuple(b.shape)} != {tuple(a.shape)}")
            e = rel_error(a, b)
            require(e <= rtol, f"{what}: relative error {e:.3e} > {rtol:.0e}")
            worst = max(worst, e)
    return worst


def _flops(model: nn.Module, inputs: tuple) -> int:
    return count_flops(model, inputs)


def check_expansion(model: nn.Module, example_inputs: tuple, passes: str | Sequence[Any], *, steps: int = 2,
                    seed: int = 0, deploy: bool = True) -> CheckResult:
    """Expand -> train -> alpha = 1 -> contract back, in float64, and check the round trip.

    ``passes`` is a name from :data:`EXPANSIONS` or a list of passes. Checks: ``compile`` and
    ``contract`` leave their input untouched; the contracted model (target ``"original"``) has the
    original's state_dict keys and shapes and loads strictly into a copy of it; that copy's outputs
    equal the expanded model's to ``1e-9`` relative on three inputs; FLOPs equal the original's;
    ``contract(target="deploy")`` matches as well and does not increase FLOPs.
    """

    name = passes if isinstance(passes, str) else "custom"
    pass_list = EXPANSIONS[passes]() if isinstance(passes, str) else list(passes)
    m64 = copy.deepcopy(model).double().eval()
    x64 = tuple(t.double() if t.is_floating_point() else t for t in example_inputs)
    snap = snapshot(m64)
    expanded = fx_compile(m64, passes=pass_list, example_inputs=x64)
    assert_unchanged(m64, snap, f"compile({name})")
    regions = find_regions(expanded)
    if not regions:
        return CheckResult(f"expand[{name}]", "not applicable", "no layer was expanded")
    gen = torch.Generator().manual_seed(seed)
    expanded.train()
    opt = torch.optim.SGD(expanded.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        xs = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in x64)
        out = expanded(*xs)
        loss = (out - torch.randn(out.shape, generator=gen, dtype=out.dtype)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_decay(expanded, 1.0)  # a no-op for linear-only expansions
    expanded.eval()
    snap_e = snapshot(expanded)
    small = contract(expanded, x64, target="original")  # a ContractionError here is a bug in the expansion
    assert_unchanged(expanded, snap_e, "contract(target='original')")
    sd_o, sd_s = m64.state_dict(), small.state_dict()
    require(set(sd_s) == set(sd_o), f"contracted state_dict keys differ: missing {sorted(set(sd_o) - set(sd_s))}, "
                                     f"extra {sorted(set(sd_s) - set(sd_o))}")
    for k, v in sd_o.items():
        require(sd_s[k].shape == v.shape,
                 f"{k}: contracted shape {tuple(sd_s[k].shape)} != original {tuple(v.shape)}")
    restored = copy.deepcopy(m64)
    restored.load_state_dict(sd_s, strict=True)
    trials = _random_inputs(x64, gen, 3)
    errors = {"original": _compare(expanded, restored, trials, f"expand[{name}] -> contract(original)", RTOL64)}
    f_orig, f_small = _flops(m64, x64), _flops(restored, x64)
    require(f_small == f_orig, f"contracted FLOPs {f_small} != original FLOPs {f_orig}")
    if deploy:
        dep = contract(expanded, x64, target="deploy")
        errors["deploy"] = _compare(expanded, dep, trials, f"expand[{name}] -> contract(deploy)", RTOL64)
        # inside a region the fusion restores the original layer, which may cost more than the expanded
        # chain (a narrow bottleneck can be cheaper than a k x k conv): compare with the original
        f_dep = _flops(dep, x64)
        require(f_dep <= f_orig, "contract(deploy) of the expanded model has more FLOPs than the original: "
                                  f"{f_dep} > {f_orig}")
    return CheckResult(f"expand[{name}]", "ok", f"{len(regions)} region(s)", errors)


def check_deploy(model: nn.Module, example_inputs: tuple, *, onnx: bool = True) -> CheckResult:
    """``contract(target="deploy")`` in float32 on a generated model.

    Checks: the input model is untouched; the float64 contraction (which ``contract`` carries out
    to verify the algebra) matches to ``1e-9`` relative; FLOPs do not increase; with ``onnx``, the
    exported contracted model runs in onnxruntime and matches torch (float32: ``1e-4`` relative
    to the output's scale).
    """

    m = copy.deepcopy(model).eval()
    snap = snapshot(m)
    small = contract(m, example_inputs, target="deploy")
    assert_unchanged(m, snap, "contract(target='deploy')")
    ver = small.fxexpand_report.verification
    e64 = ver.max_rel_error("float64")
    require(e64 <= RTOL64, f"deploy contraction: float64 relative error {e64:.3e}")
    f_in, f_out = _flops(m, example_inputs), _flops(small, example_inputs)
    require(f_out <= f_in, f"contract(deploy) increased FLOPs: {f_in} -> {f_out}")
    errors = {"float64": e64, "float32": ver.max_rel_error("float32")}
    if onnx:
        errors["onnx"] = _check_onnx(small, example_inputs)
    return CheckResult("deploy", "ok", f"FLOPs {f_in} -> {f_out}", errors)


def _check_onnx(model: nn.Module, inputs: tuple) -> float:


    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, inputs, Path(tmp) / "contracted.onnx")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})
    with torch.no_grad():
        want = model(*inputs)
    e = rel_error(want, torch.from_numpy(got[0]))
    require(e <= 1e-4, f"onnxruntime differs from torch by {e:.3e} relative")
    return e


def _traced64(model: nn.Module, inputs: tuple) -> tuple[nn.Module, fx.GraphModule, tuple]:
    m64 = copy.deepcopy(model).double().eval()
    x64 = tuple(t.double() for t in inputs)
    gm = trace(copy.deepcopy(m64))
    propagate_shapes(gm, x64)
    return m64, gm, x64


def check_pass(pass_factory: Callable[[], Pass] | str, model: nn.Module, example_inputs: tuple, *,
               seed: int = 0) -> CheckResult:
    """A function-preserving pass, run on a float64 trace of ``model``, keeps outputs to 1e-9.

    ``pass_factory`` is a name from :data:`CONTRACTION_PASSES` or a callable returning a pass (your
    own pass works too). The model is untouched and the rewritten graph lints.
    """
    name = pass_factory if isinstance(pass_factory, str) else "custom"
    factory = CONTRACTION_PASSES[pass_factory] if isinstance(pass_factory, str) else pass_factory
    snap = snapshot(model)
    m64, gm, x64 = _traced64(model, example_inputs)
    res = factory()(gm)
    out = res.graph_module
    out.graph.lint()
    out.recompile()
    assert_unchanged(model, snap, name)
    trials = _random_inputs(x64, torch.Generator().manual_seed(seed), 3)
    e = _compare(m64, out, trials, f"pass {name}", RTOL64)
    status = "ok" if res.modified else "not applicable"
    return CheckResult(f"pass[{name}]", status, f"{sum(n.action != 'skipped' for n in res.notes)} rewrite(s)",
                       {"float64": e})


class BreakOutput(Pass):
    """A deliberately wrong pass (for testing ``verify_each``): scales the model's output by 1.001
    and adds 1e-3, an error the float32 check (rtol 1e-4) must catch."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        g = graph_module.graph
        out = next(n for n in g.nodes if n.op == "output")
        val = out.args[0]
        with g.inserting_before(out):
            scaled = g.call_function(torch.mul, (val, 1.001))
            shifted = g.call_function(torch.add, (scaled, 1e-3))
        out.args = (shifted,)
        return PassResult(graph_module, True)


def check_verify_each(model: nn.Module, example_inputs: tuple, position: int) -> CheckResult:
    """``PassManager(verify_each=True)`` names :class:`BreakOutput` (injected at ``position``
    among the contraction passes) as the first pass that changed the function, and no other."""

    good = [RemoveIdentity(), FoldBatchNorm(), FuseLinear()]
    position = position % (len(good) + 1)
    passes = good[:position] + [BreakOutput()] + good[position:]
    m = copy.deepcopy(model).eval()

    gm = trace(m)
    propagate_shapes(gm, example_inputs)
    pm = PassManager(passes=passes, verify_each=True, example_inputs=example_inputs)
    try:
        pm(gm)
    except EquivalenceError as e:
        msg = str(e)
        require(msg.startswith("pass BreakOutput changed the model's function"), msg)
        before = ", ".join(p.name for p in good[:position]) or "none"
        require(f"passes run before it: {before})" in msg, msg)
        return CheckResult("verify_each", "ok", f"named BreakOutput at position {position}")
    raise AssertionError("verify_each did not catch the injected BreakOutput")


def _scalar_loss(out: Any, _target: Any = None) -> torch.Tensor:
    """A loss that depends on every output element (any output structure)."""
    return sum(t.float().square().mean() for _, t in flatten_outputs(out) if t.is_floating_point())


def check_netaug(model: nn.Module, example_inputs: tuple, *, configs: int = 3, seed: int = 0,
                 pass_factory: Callable[[], Pass] | None = None) -> CheckResult:
    """NetAug's properties on ``model``: base mode equals the original (float64 ≤ 1e-12 relative, eval
    and train mode; float32 ≤ 1e-5); every sampled configuration and the largest one run forward and
    backward with finite gradients, and the augmented loss's gradient reaches the base weights;
    after two NetAug steps, ``contract`` → strict ``load_state_dict`` into the original architecture
    → equal outputs (≤ 1e-12); ``model`` is untouched. ``"not applicable"``: no free channel group."""
    snap = snapshot(model)
    make = pass_factory or (lambda: AugmentWidth(seed=seed))
    errors: dict[str, float] = {}
    ref = copy.deepcopy(model).double().eval()
    xs = tuple(t.double() if t.is_floating_point() else t for t in example_inputs)
    try:
        aug = fx_compile(ref, passes=[make()], example_inputs=xs)
    except PreconditionError as e:
        if "no channel group" in str(e):
            assert_unchanged(model, snap, "check_netaug")
            return CheckResult("netaug", "not applicable", str(e))
        raise
    require(any(isinstance(m, DynamicLayer) for m in aug.modules()), "AugmentWidth made no dynamic layer")
    aug.eval()
    errors["base_eval"] = _compare(ref, aug, [xs], "base mode (eval)", 1e-12)
    ref_t, aug_t = copy.deepcopy(ref).train(), copy.deepcopy(aug).train()
    torch.manual_seed(seed)
    a = ref_t(*xs)
    torch.manual_seed(seed)
    b = aug_t(*xs)
    errors["base_train"] = rel_error(a, b)
    require(errors["base_train"] <= 1e-12, f"base mode (train): relative error {errors['base_train']:.3e}")
    ref_mods = dict(ref_t.named_modules())
    for name, m in aug_t.named_modules():
        if isinstance(m, DynamicLayer) and getattr(m, "running_mean", None) is not None:
            e, r = m.extract(), ref_mods[name]
            require(torch.allclose(e.running_mean, r.running_mean, rtol=1e-12, atol=1e-15)
                     and torch.allclose(e.running_var, r.running_var, rtol=1e-12, atol=1e-15),
                     f"base mode updated the running statistics of {name} differently from the original")
    # every sampled configuration (and the largest) runs forward and backward; gradients reach the base
    sampler = WidthSampler(aug, seed=seed, total_steps=10 * configs)
    dyn = [m for m in aug.modules() if isinstance(m, DynamicLayer)]
    aug.train()
    aug.zero_grad(set_to_none=True)
    with use_width(aug, "base", augmented=True):  # a zero-initialised head blocks every gradient: compare
        _scalar_loss(aug(*xs)).backward()
    reaches = sum(float(_base_slice_grad(m).abs().sum()) for m in dyn) > 0
    for step, cfg in [(i, sampler.sample(i)) for i in range(configs)] + [(-1, "max")]:
        aug.zero_grad(set_to_none=True)
        stats = [t.clone() for t in _running(aug)]
        with use_width(aug, cfg):
            _scalar_loss(aug(*xs)).backward()
        grads = [p.grad for p in aug.parameters() if p.grad is not None]
        require(grads and all(torch.isfinite(g).all() for g in grads), f"config {step}: non-finite gradients")
        base_grad = sum(float(_base_slice_grad(m).abs().sum()) for m in dyn)
        require(base_grad > 0 or not reaches,
                 f"config {step}: the augmented loss's gradient does not reach the base weights")
        require(all(torch.equal(s, t) for s, t in zip(stats, _running(aug))),
                 f"config {step}: an augmented forward changed the running statistics")
    # train two NetAug steps, contract, load into the original architecture
    opt = torch.optim.SGD(aug.parameters(), lr=1e-3)
    for step in range(2 if len(xs) == 1 else 0):  # one step with one backward, one with two
        opt.zero_grad(set_to_none=True)
        loss = netaug_loss(aug, sampler, step, xs[0], None, _scalar_loss, separate_backward=step == 1)
        if step == 0:
            loss.backward()
        opt.step()
    aug.eval()
    small = contract(aug, xs)
    restored = copy.deepcopy(ref)
    restored.load_state_dict(small.state_dict(), strict=True)
    errors["contract"] = _compare(aug, restored, [xs], "contracted + strict load", 1e-12)
    # float32: the same pass on a float32 copy
    ref32 = copy.deepcopy(model).float().eval()
    aug32 = fx_compile(ref32, passes=[make()], example_inputs=tuple(example_inputs)).eval()
    errors["base_float32"] = _compare(ref32, aug32, [tuple(example_inputs)], "base mode float32", 1e-5)
    assert_unchanged(model, snap, "check_netaug")
    return CheckResult("netaug", "ok", f"{len(dyn)} dynamic layers", errors)


def _running(model: nn.Module) -> list[torch.Tensor]:
    return [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


def _base_slice_grad(layer: DynamicLayer) -> torch.Tensor:
    w = getattr(layer, "weight", None)
    if w is None or w.grad is None:
        return torch.zeros(1)
    cols = layer.base_positions()
    if w.dim() == 1 or layer.depthwise:
        return w.grad[cols]
    return w.grad[:layer.base_widths[layer.out_group]][:, cols]


def check_early_exits(model: nn.Module, example_inputs: tuple, *, seed: int = 0) -> CheckResult:
    """BoostNet's exits on ``model``: the multi-exit model returns one ``(batch, classes)`` tensor
    per exit in train and eval mode, every head gets a gradient, F_N = t·F_{N-1} + f_N with f_N the
    original output (float64 ≤ 1e-12), and ``contract`` gives back the backbone (strict load, equal
    outputs); ``model`` is untouched. ``"not applicable"``: no (batch, classes) output or no exit point."""
    snap = snapshot(model)
    ref = copy.deepcopy(model).double().eval()
    xs = tuple(t.double() if t.is_floating_point() else t for t in example_inputs)
    try:
        multi = fx_compile(ref, passes=[InsertEarlyExits(head="linear", seed=seed)], example_inputs=xs)
    except PreconditionError as e:
        if "no exit point" in str(e) or "output" in str(e):
            assert_unchanged(model, snap, "check_early_exits")
            return CheckResult("early_exits", "not applicable", str(e))
        raise
    multi.eval()
    with torch.no_grad():
        want, outs = ref(*xs), multi(*xs)
    require(isinstance(outs, tuple) and len(outs) >= 2 and all(o.shape == want.shape for o in outs),
             "the multi-exit model does not return one (batch, classes) tensor per exit")
    t = multi.fxexpand_records["ExitRecord"].temperatures[-1]
    err = rel_error(outs[-1] - t * outs[-2], want)
    require(err <= 1e-12, f"F_N - t F_(N-1) is not the backbone's output: relative error {err:.3e}")
    trained = copy.deepcopy(multi).train()  # a training forward updates BN statistics: on a copy
    outs_t = trained(*xs)
    require(isinstance(outs_t, tuple) and len(outs_t) == len(outs), "train mode changes the outputs' structure")
    sum(o.square().mean() for o in outs_t).backward()
    require(all(p.grad is not None for h in trained.exit_heads for p in h.parameters()), "a head got no gradient")
    small = contract(multi, xs)
    restored = copy.deepcopy(ref)
    restored.load_state_dict(small.state_dict(), strict=True)
    e2 = _compare(ref, restored, [xs], "contracted backbone", 1e-12)
    assert_unchanged(model, snap, "check_early_exits")
    return CheckResult("early_exits", "ok", f"{len(outs)} exits", {"f_N": err, "contract": e2})
