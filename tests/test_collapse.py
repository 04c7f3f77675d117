"""Online collapse (train_mode="collapsed"): the composed op equals the chain, and training in
collapsed mode is training in explicit mode (same gradients, same parameters, same contraction)."""

import copy
import itertools

import pytest
import torch
import torchvision
from torch import nn

import fxexpand
import fxexpand.testing as ft
from fxexpand.core import ExpandedRegion, find_regions
from fxexpand.core import collapse
from fxexpand.core.collapse import chain_problem, compose_chain, run_collapsed, runtime_problem
from fxexpand.core import DecayActivation, Residual
from fxexpand.demo.models import SmallNet
from fxexpand.passes import LinearExpand
from fxexpand.testing import rel_error


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_composition_equals_the_chain(dtype):
    torch.manual_seed(0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for nd, g, (s1, s2), (d1, d2), p, b1, b2 in itertools.product(
            [1, 2], [1, 3, 6], [(1, 1), (2, 1), (1, 2)], [(1, 1), (2, 1), (1, 3)], [0, 2], [False, True], [False, True]):
        conv = nn.Conv1d if nd == 1 else nn.Conv2d
        body = nn.Sequential(conv(6, 12, 3, stride=s1, padding=p, dilation=d1, groups=g, bias=b1),
                             conv(12, 18, 3, stride=s2, dilation=d2, groups=g, bias=b2),
                             conv(18, 6, 1, groups=g, bias=b2)).to(dtype)
        assert chain_problem(body) == ""
        x = torch.randn(2, 6, *([17] * nd), dtype=dtype)
        with torch.no_grad():
            a, b = body(x), run_collapsed(body, x)
        assert a.shape == b.shape and rel_error(a, b) <= tol, (nd, g, s1, s2, d1, d2, p)
        op = compose_chain(body)
        assert op["groups"] == g and op["padding"] == (p,) * nd
    lin = nn.Sequential(nn.Linear(5, 20), nn.Linear(20, 30, bias=False), nn.Linear(30, 4)).to(dtype)
    x = torch.randn(3, 7, 5, dtype=dtype)
    with torch.no_grad():
        assert rel_error(lin(x), run_collapsed(lin, x)) <= tol


def _trees(i, j):
    """Every composition order of layers i..j (binary trees; see collapse._plan)."""
    if i == j:
        yield i
        return
    for k in range(i, j):
        for left in _trees(i, k):
            for right in _trees(k + 1, j):
                yield (left, right)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_every_composition_order_equals_the_chain(dtype):
    """Composition is associative: each order (the plan picks the cheapest) gives the chain's
    function, for pointwise, k×k, strided, dilated, grouped, biased layers in 1-3 dims."""
    torch.manual_seed(0)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    bodies = []
    for nd, g in [(1, 1), (2, 1), (2, 2), (3, 1)]:
        c = convs[nd]
        bodies.append(nn.Sequential(c(4, 8, 1, groups=g), c(8, 12, 3, stride=2, groups=g), c(12, 6, 1, groups=g, bias=False),
                                    c(6, 4, 3, dilation=2, groups=g)))
        bodies.append(nn.Sequential(c(4, 8, 3, padding=1, dilation=2, groups=g), c(8, 8, 3, stride=2, groups=g, bias=False),
                                    c(8, 4, 2, groups=g)))
    bodies.append(nn.Sequential(nn.Linear(6, 24), nn.Linear(24, 16, bias=False), nn.Linear(16, 3), nn.Linear(3, 5)))
    for body in bodies:
        body = body.to(dtype)
        lin = type(body[0]) is nn.Linear
        nd = 0 if lin else body[0].weight.dim() - 2
        x = torch.randn(2, 6) if lin else torch.randn(2, 4, *([15, 13, 14][:nd]))
        x = x.to(dtype)
        with torch.no_grad():
            ref = body(x)
            orders = list(_trees(0, len(body) - 1))
            assert len(orders) == (5 if len(body) == 4 else 2)
            for order in orders:
                op = compose_chain(body, order=order)
                if lin:
                    out = nn.functional.linear(x, op["weight"], op["bias"])
                else:
                    fn = [nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d][nd - 1]
                    out = fn(x, op["weight"], op["bias"], op["stride"], op["padding"], op["dilation"], op["groups"])
                assert out.shape == ref.shape and rel_error(ref, out) <= tol, (body, order)


def test_plan_composes_in_the_cheapest_order():
    # FC m -> 4m -> 4n -> n (ExpandNets FC): right to left; CL 1x1 -> kxk -> 1x1: the k×k with the first 1x1 first
    fc = nn.Sequential(nn.Linear(512, 2048), nn.Linear(2048, 256), nn.Linear(256, 64))
    assert collapse._plan(tuple(map(collapse._layer_key, fc)))[0] == (0, (1, 2))
    assert collapse._plan(tuple(map(collapse._layer_key, fc)))[1] == 64 * 256 * 2048 + 64 * 2048 * 512
    cl = nn.Sequential(nn.Conv2d(16, 64, 1), nn.Conv2d(64, 128, 7), nn.Conv2d(128, 32, 1))
    assert collapse._plan(tuple(map(collapse._layer_key, cl)))[0] == ((0, 1), 2)
    assert collapse._plan(tuple(map(collapse._layer_key, cl)))[2][2] == (7, 7)


def test_chains_that_cannot_collapse_say_why():
    assert "ReLU" in chain_problem(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    assert "padded" in chain_problem(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 3, padding=1)))
    assert "groups" in chain_problem(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 4, 1)))
    assert chain_problem(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4))) == ""  # depthwise mixes
    assert "mixes" in chain_problem(nn.Sequential(nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1)))
    assert "starts with" in chain_problem(nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)))
    assert "running statistics" in chain_problem(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)))
    assert "different widths" in chain_problem(Residual(nn.Sequential(nn.Conv2d(2, 3, 1))))
    assert "not a tap" in chain_problem(Residual(nn.Sequential(nn.Conv2d(2, 2, 3, stride=2, padding=1))))
    assert "not a tap" in chain_problem(Residual(nn.Sequential(nn.Conv2d(2, 2, 3))))  # unpadded: the grid shifts
    assert chain_problem(nn.Conv2d(2, 2, 1)) != ""
    # linear in some states only: BatchNorm in train mode, an activation still decaying, dropout on
    body = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), DecayActivation(nn.ReLU(), alpha=0.5),
                         nn.Dropout(0.1), nn.Conv2d(2, 2, 1))
    assert chain_problem(body) == ""
    why = runtime_problem(body.train())
    assert "BatchNorm2d in train mode" in why and "alpha 0.5 < 1" in why and "Dropout in train mode" in why
    body.eval()
    assert "alpha 0.5" in runtime_problem(body) and "BatchNorm" not in runtime_problem(body)
    body[2].alpha.fill_(1.0)
    assert runtime_problem(body) == ""


def _linear_bodies(nd: int):
    """Chains that are linear in eval-state: BatchNorm (with and without affine), identities,
    dropout, decayed activations, mixed depthwise/dense groups, identity shortcuts."""
    c = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    act = lambda: DecayActivation(nn.ReLU6(), kind="leaky", alpha=1.0)  # noqa: E731
    return [
        # NetBooster's block on a 3x3 conv at alpha = 1: 1x1 (pad) → BN → act → dw 3x3 → BN → act → 1x1, + x
        Residual(nn.Sequential(c(6, 12, 1, padding=1, bias=False), bn(12), act(), c(12, 12, 3, groups=12, bias=False),
                               bn(12), act(), c(12, 6, 1, bias=True))),
        # its kernel-1 form on a 1x1 conv, dilated, and a strided one without a shortcut
        Residual(nn.Sequential(c(6, 24, 1, bias=False), bn(24), act(), c(24, 24, 1, groups=24), bn(24, affine=False),
                               act(), c(24, 6, 1))),
        nn.Sequential(c(6, 12, 1, padding=2, groups=2, bias=False), bn(12), nn.Identity(), c(12, 12, 3, stride=2, dilation=2, groups=12),
                      nn.Dropout(0.2), bn(12), c(12, 8, 1, groups=2)),
        # depthwise first, then grouped: the per-channel filter feeds every output of its group
        nn.Sequential(c(6, 6, 3, padding=1, groups=6), bn(6), c(6, 9, 3, groups=3, bias=False), bn(9)),
        Residual(nn.Sequential(c(6, 6, 3, padding=2, dilation=2, groups=3), bn(6), c(6, 6, 1, groups=3))),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_batchnorm_identity_and_shortcut_chains_collapse_exactly(dtype):
    """Item 1: BatchNorm in eval mode folds (differentiably in its affine parameters), identities
    and alpha = 1 activations drop out, depthwise layers compose with dense ones, an identity
    shortcut adds the identity kernel — same outputs, same gradients for every parameter."""
    torch.manual_seed(0)
    tol, gtol = (1e-12, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    bodies = [(nd, b) for nd in (1, 2, 3) for b in _linear_bodies(nd)]
    bodies.append((0, Residual(nn.Sequential(nn.Linear(5, 20), nn.BatchNorm1d(20), nn.Linear(20, 5)))))
    for nd, body in bodies:
        ft.randomize_bn(body)
        body = body.to(dtype).eval()
        assert chain_problem(body) == "" and runtime_problem(body) == "", body
        x = torch.randn(3, 5, dtype=dtype) if nd == 0 else torch.randn(3, 6, *([9, 8, 7][:nd]), dtype=dtype)
        a, b = body(x), run_collapsed(body, x)
        assert a.shape == b.shape and rel_error(a, b) <= tol, body
        g = torch.randn_like(a)
        params = [p for p in body.parameters()]
        ga = torch.autograd.grad((a * g).sum(), params)
        gb = torch.autograd.grad((b * g).sum(), params)
        for p, u, v in zip(params, ga, gb):
            assert _rel(u, v) <= gtol, (body, p.shape)


def test_netbooster_block_collapses_at_alpha_one_with_frozen_batchnorms():
    """A NetBooster model: explicit while its BatchNorms train or alpha < 1 (and says so); with
    alpha = 1 and BatchNorms in eval mode inside a training model, the blocks run collapsed (where
    composing pays for their input) and a training step is the explicit one's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = ft.randomize_bn(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)).double()
    nb = fxexpand.compile(model, passes=fxexpand.recipes.netbooster(), example_inputs=(x,)).train()
    nb(x)
    forms = fxexpand.train_forms(nb)
    assert forms and all(f.startswith("explicit: ") and "BatchNorm2d in train mode" in f for f in forms.values())
    fxexpand.set_decay(nb, 1.0)
    explicit = copy.deepcopy(nb)
    fxexpand.set_train_mode(explicit, "explicit")
    for m in (nb, explicit):  # frozen BatchNorms (fine-tuning), the model itself in training mode
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
    y = torch.randint(0, 10, (2,))
    torch.manual_seed(1)  # the same dropout masks
    gc = torch.autograd.grad(nn.functional.cross_entropy(nb(x), y), list(nb.parameters()), allow_unused=True)
    forms = fxexpand.train_forms(nb)  # deep blocks on 1x1 maps: composing costs more than the chain
    assert list(forms.values()).count("collapsed") >= len(forms) // 2
    assert set(forms.values()) <= {"collapsed", "explicit: composing costs more than the chain on this input"}
    torch.manual_seed(1)
    ge = torch.autograd.grad(nn.functional.cross_entropy(explicit(x), y), list(explicit.parameters()), allow_unused=True)
    assert set(fxexpand.train_forms(explicit).values()) == {"explicit"}
    factors = {id(p) for r in find_regions(explicit).values() for p in r.parameters()}
    _assert_grads_match(list(explicit.parameters()), ge, gc, factors)


def test_default_mode_and_report():
    x = torch.randn(2, 3, 32, 32)
    cl = fxexpand.compile(SmallNet(), passes=fxexpand.recipes.expandnets("CL"), example_inputs=(x,))
    modes = {n.where: n.action for n in cl.fxexpand_notes if n.pass_name == "compile"}
    assert modes and set(modes.values()) == {"collapsed"}
    assert all(r.train_mode == "collapsed" for r in find_regions(cl).values())
    nb = fxexpand.compile(torchvision.models.mobilenet_v2(width_mult=0.35), passes=fxexpand.recipes.netbooster())
    notes = [n for n in nb.fxexpand_notes if n.pass_name == "compile"]
    # NetBooster blocks: linear only at alpha = 1 with frozen BatchNorms, so explicit for now, and why
    assert notes and all(n.action == "explicit" and "BatchNorm2d in train mode" in n.reason
                         and "DecayActivation at alpha 0 < 1" in n.reason for n in notes)
    assert all(r.train_mode == "collapsed" for r in find_regions(nb).values())
    region = find_regions(cl)["features.0"]
    with torch.no_grad():
        assert torch.equal(region.eval()(x), region.body(x))          # eval / export: the explicit chain
        assert region.last_form == ""
        collapsed = region.train()(x)                                 # training: the composed op
        assert region.last_form == "collapsed"
        assert rel_error(collapsed, region.body(x)) <= 1e-5
    ex = fxexpand.compile(SmallNet(), passes=fxexpand.recipes.expandnets("CL"), train_mode="explicit")
    assert all(r.train_mode == "explicit" for r in find_regions(ex).values())
    with pytest.raises(ValueError):
        fxexpand.compile(SmallNet(), passes=fxexpand.recipes.expandnets("CL"), train_mode="fast")


def _mnv2():
    return torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)


CASES = {
    "smallnet-CL": (SmallNet, lambda: fxexpand.recipes.expandnets("CL", ratio=2), (4, 3, 32, 32)),
    "smallnet-CK": (SmallNet, lambda: fxexpand.recipes.expandnets("CK", ratio=2), (4, 3, 32, 32)),
    "smallnet-FC": (SmallNet, lambda: fxexpand.recipes.expandnets("FC", ratio=2), (4, 3, 32, 32)),
    "mobilenet_v2-CL": (_mnv2, lambda: [LinearExpand(mode="CL", ratio=2, fraction=0.3)], (4, 3, 64, 64)),
    "mobilenet_v2-FC": (_mnv2, lambda: [LinearExpand(mode="FC", ratio=2)], (4, 3, 64, 64)),
}


def _train(model, x, y, opt_name, steps):
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    grads = None
    torch.manual_seed(1)  # the same dropout masks in both forms
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return grads, opt


def _rel(a, b):
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


def _assert_grads_match(params, g_e, g_c, factors):
    scale = max(float(g.norm()) for g in g_e if g is not None)
    for p, a, b in zip(params, g_e, g_c):
        assert (a is None) == (b is None)
        if a is None:
            continue
        if float(a.norm()) <= 1e-12 * scale:  # analytically zero (a bias before a BatchNorm): rounding only
            assert float(b.norm()) <= 1e-11 * scale
        else:
            assert _rel(a, b) <= (1e-10 if id(p) in factors else 1e-9)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_collapsed_training_is_explicit_training(case, opt_name):
    make, passes, shape = CASES[case]
    torch.manual_seed(0)
    model = ft.randomize_bn(make()).double()
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],))
    collapsed = fxexpand.compile(model, passes=passes(), example_inputs=(x,))
    assert any(r.train_mode == "collapsed" for r in find_regions(collapsed).values())
    explicit = copy.deepcopy(collapsed)
    fxexpand.set_train_mode(explicit, "explicit")
    g_c, opt_c = _train(collapsed.train(), x, y, opt_name, 3)
    g_e, opt_e = _train(explicit.train(), x, y, opt_name, 3)
    factors = {id(p) for r in find_regions(explicit).values() for p in r.parameters()}
    _assert_grads_match(list(explicit.parameters()), g_e, g_c, factors)
    for (name, a), b in zip(explicit.named_parameters(), collapsed.parameters()):  # every factor after N steps
        if id(a) in factors:
            assert _rel(a.detach(), b.detach()) <= 1e-9, name
    flat_e = torch.cat([p.detach().flatten() for p in explicit.parameters()])
    flat_c = torch.cat([p.detach().flatten() for p in collapsed.parameters()])
    assert _rel(flat_e, flat_c) <= 1e-9  # all parameters (BatchNorm layers included), globally
    assert collapsed.state_dict().keys() == explicit.state_dict().keys()
    sc, se = fxexpand.contract(collapsed.eval(), (x,)), fxexpand.contract(explicit.eval(), (x,))
    assert se.state_dict().keys() == sc.state_dict().keys()
    with torch.no_grad():  # the same contracted model: equal outputs, weights equal to rounding
        assert rel_error(se(x), sc(x)) <= 1e-9
    for k, v in se.state_dict().items():
        assert _rel(v.double(), sc.state_dict()[k].double()) <= 1e-8 or v.abs().max() == 0, k


def test_checkpoint_moves_between_forms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    a = fxexpand.compile(SmallNet(), passes=fxexpand.recipes.expandnets("CL"), example_inputs=(x,))
    opt = torch.optim.Adam(a.parameters())
    a(x).sum().backward()
    opt.step()
    b = fxexpand.compile(SmallNet(), passes=fxexpand.recipes.expandnets("CL"), example_inputs=(x,),
                         train_mode="explicit")
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.Adam(b.parameters())
    opt_b.load_state_dict(opt.state_dict())
    with torch.no_grad():
        assert rel_error(a.eval()(x), b.eval()(x)) <= 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_random_models_collapse_exactly(seed):
    model, inputs = ft.random_model(seed)
    model = model.double()
    xs = tuple(t.double() for t in inputs)
    # every eligible layer (the paper's selection leaves some random models with nothing to expand)
    collapsed = fxexpand.compile(model, passes=fxexpand.recipes.expandnets("CL", ratio=2, layers="all"),
                                 example_inputs=xs)
    regions = find_regions(collapsed)
    assert regions
    explicit = copy.deepcopy(collapsed)
    fxexpand.set_train_mode(explicit, "explicit")
    collapsed.train(), explicit.train()
    torch.manual_seed(1)
    out_c = collapsed(*xs)
    torch.manual_seed(1)  # the same dropout masks
    out_e = explicit(*xs)
    assert rel_error(out_e, out_c) <= 1e-10
    gc = torch.autograd.grad(out_c.square().sum(), list(collapsed.parameters()), allow_unused=True)
    ge = torch.autograd.grad(out_e.square().sum(), list(explicit.parameters()), allow_unused=True)
    factors = {id(p) for r in find_regions(explicit).values() for p in r.parameters()}
    _assert_grads_match(list(explicit.parameters()), ge, gc, factors)
    assert all(isinstance(r, ExpandedRegion) for r in regions.values())


def _train_loss(model, xs, opt, steps):
    torch.manual_seed(1)  # the same dropout masks in both forms
    grads = None
    for step in range(steps):
        opt.zero_grad()
        out = model(*xs)
        (out.square().mean() + out.mean()).backward()
        if step == 0:
            grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        opt.step()
    return grads


@pytest.mark.parametrize("seed", range(4))
def test_random_models_train_the_same_collapsed(seed):
    """Item 2 on random models: CL, CK and FC (every eligible layer), 3 SGD and 3 Adam steps from the
    same start give the same factors (≤ 1e-9), every factor's first gradient matches (≤ 1e-10), and
    the contracted models agree."""
    model, inputs = ft.random_model(seed)
    model = model.double()
    xs = tuple(t.double() for t in inputs)
    tried = 0
    for mode in ("CL", "CK", "FC"):
        collapsed = fxexpand.compile(model, passes=[LinearExpand(mode=mode, ratio=2, layers="all")], example_inputs=xs)
        if not find_regions(collapsed):
            continue  # no layer of this kind (CK needs a kernel > 3, FC a Linear layer)
        tried += 1
        for opt_name in ("sgd", "adam"):
            c = copy.deepcopy(collapsed).train()
            e = copy.deepcopy(collapsed).train()
            fxexpand.set_train_mode(e, "explicit")
            make = (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)) if opt_name == "sgd" else \
                (lambda ps: torch.optim.Adam(ps, lr=1e-3))
            g_c = _train_loss(c, xs, make(c.parameters()), 3)
            g_e = _train_loss(e, xs, make(e.parameters()), 3)
            factors = {id(p) for r in find_regions(e).values() for p in r.parameters()}
            _assert_grads_match(list(e.parameters()), g_e, g_c, factors)
            # a factor whose gradient is analytically zero (a bias before a training BatchNorm) gets
            # rounding noise as its gradient, which Adam divides by its own size: compared absolutely
            scale = max(float(g.norm()) for g in g_e if g is not None)
            for (name, a), b, g in zip(e.named_parameters(), c.parameters(), g_e):
                if id(a) in factors and float(g.norm()) > 1e-12 * scale:
                    assert _rel(a.detach(), b.detach()) <= 1e-9, (mode, opt_name, name)
                elif id(a) in factors:
                    assert float((a - b).abs().max()) <= 1e-6, (mode, opt_name, name)
            with torch.no_grad():
                sc, se = fxexpand.contract(c.eval(), xs), fxexpand.contract(e.eval(), xs)
                # ≤ 1e-8: those noise-driven biases (differing by ~1e-9) shift the eval-mode output
                assert rel_error(se(*xs), sc(*xs)) <= (1e-9 if opt_name == "sgd" else 1e-8), (mode, opt_name)
    assert tried >= 1


def test_a_forward_composes_each_region_once(monkeypatch):
    """Item 4: the kernel is composed once per region per forward (and never cached across steps)."""
    calls = []
    real = collapse.compose_chain
    monkeypatch.setattr(collapse, "compose_chain", lambda body, order=None: calls.append(id(body)) or real(body, order))
    x = torch.randn(4, 3, 32, 32)
    model = fxexpand.compile(SmallNet(), passes=fxexpand.recipes.expandnets("CL"), example_inputs=(x,)).train()
    for step in range(2):
        calls.clear()
        model(x).sum().backward()
        collapsed = [n for n, f in fxexpand.train_forms(model).items() if f == "collapsed"]
        assert collapsed and len(calls) == len(collapsed) == len(set(calls)), step


def test_decay_identity_follows_every_write():
    """``is_identity`` is cached on the buffer's version (no accelerator sync per forward) and still
    sees every write: fill_, set_decay, load_state_dict, a copy's own buffer."""
    m = DecayActivation(nn.ReLU(), alpha=0.5)
    assert not m.is_identity
    with torch.no_grad():
        m.alpha.fill_(1.0)
    assert m.is_identity
    m.load_state_dict({"alpha": torch.tensor(0.25), "decay_step": torch.tensor(0)})
    assert not m.is_identity
    fxexpand.set_decay(m, 1.0)
    assert m.is_identity
    c = copy.deepcopy(m)
    fxexpand.set_decay(c, 0.0)
    assert not c.is_identity and m.is_identity
