"""Network Expansion: block discovery, depth growth from the EMA, width growth, EMA, schedules."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from torch import nn
from torch.fx import GraphModule as fx_GraphModule
from torchvision.models.convnext import CNBlockConfig

import fxexpand
import fxexpand.testing as ft
from fxexpand.core import (
    FxExpandError,
    GrowthRecord,
    InputError,
    ParameterOrigins,
    get_record,
)
from fxexpand.training.growth import spread
from fxexpand.passes import GrowWidth, InsertEMABlocks
from fxexpand.testing import assert_unchanged, randomize_bn, rel_error, snapshot


def small_vit(layers=12):
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=10)


def train_steps(model, x, y, optimizer, ema=None, steps=2):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
    assert torch.isfinite(loss)
    return float(loss.detach())


def chain_blocks(model, chain_id):
    return list(get_record(model, GrowthRecord).chains[chain_id].members)


# ------------------------------------------------------------------------------ block discovery


def test_chains_of_torchvision_models():
    x = torch.randn(1, 3, 32, 32)
    vit = fxexpand.find_chains(small_vit(), (x,))
    assert [(c.id, c.cls, len(c)) for c in vit] == [("encoder.layers", "EncoderBlock", 12)]
    assert vit[0].blocks[3] == "encoder.layers.encoder_layer_3"

    r18 = {c.id: c.blocks for c in fxexpand.find_chains(torchvision.models.resnet18(weights=None), (x,))}
    assert r18 == {"layer1": ("layer1.0", "layer1.1"), "layer2.1": ("layer2.1",),
                   "layer3.1": ("layer3.1",), "layer4.1": ("layer4.1",)}

    mb = fxexpand.find_chains(torchvision.models.mobilenet_v2(weights=None), (x,))
    runs = [c.blocks for c in mb if c.cls == "InvertedResidual"]
    assert runs == [("features.3",), ("features.5", "features.6"), ("features.8", "features.9", "features.10"),
                    ("features.12", "features.13"), ("features.15", "features.16")]


def test_chains_of_convnext_swin_and_a_user_sequential():
    x = torch.randn(1, 3, 32, 32)
    cnx = torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 3), CNBlockConfig(32, None, 2)], num_classes=10)
    got = {c.id: (c.cls, len(c)) for c in fxexpand.find_chains(cnx, (x,)) if len(c) > 1}
    assert got == {"features.1": ("CNBlock", 3), "features.3": ("CNBlock", 2)}

    swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 3], num_heads=[2, 2],
                                              window_size=[4, 4], num_classes=10)
    got = {c.id: (c.cls, len(c)) for c in fxexpand.find_chains(swin, (x,)) if len(c) > 1}
    assert got == {"features.1": ("SwinTransformerBlock", 2), "features.3": ("SwinTransformerBlock", 3)}

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return x + F.relu(self.bn(self.conv(x)))

    user = nn.Sequential(nn.Conv2d(3, 8, 3), *[Block(8) for _ in range(4)], nn.Conv2d(8, 4, 1), Block(4))
    got = [(c.id, c.blocks) for c in fxexpand.find_chains(user, (x,))]
    assert got == [("1..4", ("1", "2", "3", "4")), ("6", ("6",))]


def test_a_block_reading_an_outside_tensor_is_not_a_block():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, ctx):
            return x + self.lin(ctx)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Mix(), Mix()

        def forward(self, x):
            return self.b(self.a(x, x), x)

    assert fxexpand.find_chains(Net(), (torch.randn(2, 8),)) == []


def test_spread():
    assert spread(12, 6) == [0, 2, 4, 7, 9, 11]
    assert spread(12, 12) == list(range(12))
    assert spread(5, 1) == [0]
    with pytest.raises(ValueError):
        spread(3, 4)


# ------------------------------------------------------------------------------ depth growth


def test_vit_grows_6_9_12_from_the_ema_and_loads_into_the_full_model():
    full = small_vit()
    full_snap = snapshot(full)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plan = fxexpand.GrowthPlan(full, depth_factor=0.5, stages=3, epochs=6, example_inputs=(x[:1],))
    assert plan.alphas == [0.5, 0.75, 1.0]
    assert [s.new_blocks for s in plan] == [{"encoder.layers": 3}, {"encoder.layers": 3}, {}]

    model = plan.initial_model()
    assert len(chain_blocks(model, "encoder.layers")) == 6
    assert set(model.state_dict()) < set(full.state_dict())
    ema = fxexpand.EMA(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sizes = []
    for stage in plan:
        train_steps(model, x, y, optimizer, ema)
        blocks_before = chain_blocks(model, "encoder.layers")
        ema_before = copy.deepcopy(ema.module)
        model_snap = snapshot(model)
        grown = fxexpand.compile(model, passes=[InsertEMABlocks(ema_model=ema.module, count=stage.new_blocks)])
        assert_unchanged(model, model_snap)  # the input model is untouched
        # every inserted block equals the EMA block it was copied from, at insertion
        inserted = set(_inserted_blocks(grown))
        for name, src in _inserted_blocks(grown).items():
            a = grown.get_submodule(name).state_dict()
            b = ema_before.get_submodule(src).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert len(inserted) == sum(stage.new_blocks.values())
        # the blocks already there keep their trained weights (renamed, in order)
        kept = [n for n in chain_blocks(grown, "encoder.layers") if n not in inserted]
        for old, new in zip(blocks_before, kept):
            assert torch.equal(model.get_submodule(old).mlp[0].weight, grown.get_submodule(new).mlp[0].weight)
        optimizer = stage.rebuild_optimizer(optimizer, grown)
        model = grown
        sizes.append(len(chain_blocks(model, "encoder.layers")))
        train_steps(model, x, y, optimizer, ema)   # a few steps after each growth
    assert sizes == [9, 12, 12]
    assert_unchanged(full, full_snap)
    fresh = small_vit()
    fresh.load_state_dict(model.state_dict())       # strict: the full architecture
    fresh.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))     # same blocks in the same order


def _inserted_blocks(grown):
    """{inserted block name: EMA block it copies} from the grown model's parameter records."""
    out = {}
    for pname, src in get_record(grown, ParameterOrigins).copied_from.items():
        parts, sparts = pname.split("."), src.split(".")
        k = 3  # encoder.layers.encoder_layer_i
        out[".".join(parts[:k])] = ".".join(sparts[:k])
    return out


def test_resnet18_depth_growth_within_stages():
    full = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    plan = fxexpand.GrowthPlan(full, depth_factor=0.5, stages=2, example_inputs=(x[:1],))
    assert plan.counts == {"layer1": [1, 2]}
    model = plan.initial_model()
    assert "layer1.1.conv1.weight" not in model.state_dict() and "layer1.0.conv1.weight" in model.state_dict()
    ema = fxexpand.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for stage in plan:
        train_steps(model, x, y, opt, ema, steps=1)
        model = stage.grow(model, ema)
        opt = stage.rebuild_optimizer(opt, model)
        train_steps(model, x, y, opt, ema, steps=1)
    assert chain_blocks(model, "layer1") == ["layer1.0", "layer1.1"]
    fresh = torchvision.models.resnet18(weights=None, num_classes=10)
    fresh.load_state_dict(model.state_dict())
    fresh.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_explicit_positions_and_errors():
    full = small_vit(layers=4)
    x = torch.randn(1, 3, 32, 32)
    plan = fxexpand.GrowthPlan(full, depth_factor=0.5, stages=2, example_inputs=(x,))
    model = plan.initial_model()                      # blocks 0 and 3 of 4
    ema = fxexpand.EMA(model)
    grown = fxexpand.compile(model, passes=[InsertEMABlocks(ema_model=ema.module, count=2, positions=[0, 0])])
    assert _inserted_blocks(grown) == {"encoder.layers.encoder_layer_1": "encoder.layers.encoder_layer_0",
                                       "encoder.layers.encoder_layer_2": "encoder.layers.encoder_layer_0"}
    with pytest.raises(FxExpandError, match="positions"):
        fxexpand.compile(model, passes=[InsertEMABlocks(ema_model=ema.module, count=2, positions=[5, 0])])
    with pytest.raises(FxExpandError, match="cannot insert"):
        fxexpand.compile(model, passes=[InsertEMABlocks(ema_model=ema.module, count={"encoder.layers": 3})])
    with pytest.raises(FxExpandError, match="GrowthPlan"):
        fxexpand.compile(full, passes=[InsertEMABlocks(ema_model=ema.module, count=1)])
    with pytest.raises(FxExpandError, match="does not match"):
        fxexpand.compile(model, passes=[InsertEMABlocks(ema_model=nn.Sequential(), count=1)])
    with pytest.raises(InputError, match="no chain"):
        fxexpand.GrowthPlan(nn.Sequential(nn.Linear(4, 4)), depth_factor=0.5, example_inputs=(torch.randn(1, 4),))
    with pytest.raises(ValueError, match="exactly one"):
        fxexpand.GrowthPlan(full, depth_factor=0.5, width_factor=0.5)
    with pytest.raises(ValueError):
        fxexpand.GrowthPlan(full, depth_factor=1.5)


# ------------------------------------------------------------------------------ width growth


class SmallCNN(nn.Module):
    """Residual add, depthwise conv, concatenation, squeeze-excitation gate, flatten + Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.pw = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 24, 1)
        self.se1, self.se2 = nn.Conv2d(24, 8, 1), nn.Conv2d(8, 24, 1)
        self.side = nn.Conv2d(16, 8, 1, stride=1)
        self.bn = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(32 * 4, 20), nn.Linear(20, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + F.relu(self.b1(self.c1(x)))
        z = self.pw(self.dw(x))
        z = z * torch.sigmoid(self.se2(F.relu(self.se1(z.mean((2, 3), keepdim=True)))))
        y = F.relu(self.bn(torch.cat([z, self.side(x)], 1)))
        return self.fc2(F.relu(self.fc1(torch.flatten(self.pool(y), 1))))


def _new_filter_cosines(before: nn.Module, after: fx_GraphModule) -> float:
    """max |cos| between the new output filters of every grown conv/linear and its old filters (and
    between the new ones), leaving out the filters the pass reported as random (null space too small)."""
    random_rows = {n.where: int(n.reason.split()[0]) for n in after.fxexpand_notes if n.action == "random"}
    worst = 0.0
    for name, m in after.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or (isinstance(m, nn.Conv2d) and m.groups > 1):
            continue
        k = before.get_submodule(name).weight.shape[0]
        w = m.weight.detach().double().flatten(1)
        n_new = w.shape[0] - k - random_rows.get(name, 0)
        if random_rows.get(name):     # only where the layer has fewer inputs x kernel than filters
            assert w.shape[0] > w.shape[1] - 0 or k + w.shape[0] - k > w.shape[1], name
        if n_new <= 0:
            continue
        new, kept = F.normalize(w[k:k + n_new], dim=1), F.normalize(w[:k], dim=1)
        worst = max(worst, float((new @ kept.T).abs().max()))
        gram = new @ new.T - torch.eye(n_new, dtype=torch.float64)   # and mutually orthogonal
        worst = max(worst, float(gram.abs().max()))
    return worst


def test_width_growth_is_orthogonal_function_preserving_and_ends_at_the_full_model():
    full = randomize_bn(SmallCNN())
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    plan = fxexpand.GrowthPlan(full, width_factor=0.5, stages=3, example_inputs=(x[:1],))
    assert plan.groups == {"stem.0": 16, "pw": 24, "se1": 8, "side": 8, "fc1": 20}
    assert plan.frozen["fc2"] == "reaches the model output"
    model = plan.initial_model().double()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["stem.0.weight"] == (8, 3, 3, 3) and shapes["dw.weight"] == (8, 1, 3, 3)
    assert shapes["fc1.weight"] == (10, (12 + 4) * 4) and shapes["fc2.weight"] == (10, 10)
    ema = fxexpand.EMA(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xd = x.double()
    for stage in plan:
        train_steps(model, xd, y, opt, ema)
        momentum_before = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            out_before = model(xd)
        grown = fxexpand.compile(model, passes=stage.passes(ema.module))
        grown.eval()
        with torch.no_grad():
            assert rel_error(out_before, grown(xd)) <= 1e-9  # function-preserving (float64)
        assert _new_filter_cosines(model, grown) <= 1e-5
        # pw (1x1, 16 -> 24) and se2 (1x1, 8 -> 24) have more filters than inputs: some are random
        assert {n.where for n in grown.fxexpand_notes if n.action == "random"} <= {"pw", "se2"}
        opt = stage.rebuild_optimizer(opt, grown)
        for n, p in grown.named_parameters():              # momentum kept, zero for new channels
            mb = opt.state[p]["momentum_buffer"]
            old = momentum_before[n]
            assert mb.shape == p.shape
            assert torch.equal(mb[tuple(slice(0, s) for s in old.shape)], old)
            assert float(mb.abs().sum()) == pytest.approx(float(old.abs().sum()))
        model = grown
        train_steps(model, xd, y, opt, ema)
    fresh = SmallCNN().double()
    fresh.load_state_dict(model.state_dict())
    fresh.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(xd), model(xd))


def test_width_growth_of_resnet18_and_the_paper_init():
    full = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    plan = fxexpand.GrowthPlan(full, width_factor=0.25, stages=2, example_inputs=(x[:1],), init="orthogonal")
    assert len(plan.groups) == 12  # stem + layer1 residual stream, 3 more streams, 8 inner block widths
    model = plan.initial_model()
    assert model.state_dict()["conv1.weight"].shape == (16, 3, 7, 7)
    grown = plan.stage(0).grow(model)
    assert _new_filter_cosines(model, grown) <= 1e-5
    # the paper's init gives the new channels random incoming weights: the function changes
    model.eval(), grown.eval()
    with torch.no_grad():
        assert rel_error(model(x), grown(x)) > 1e-4
    fresh = torchvision.models.resnet18(weights=None, num_classes=10)
    fresh.load_state_dict(grown.state_dict())


def test_grow_width_needs_a_width_plan():
    with pytest.raises(FxExpandError, match="width_factor"):
        fxexpand.compile(SmallCNN(), passes=[GrowWidth(to=1.0)])
    with pytest.raises(ValueError):
        GrowWidth(to=0.0)


# ------------------------------------------------------------------------------ EMA and schedule


def test_ema_averages_bn_buffers_and_follows_renamed_blocks():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = fxexpand.EMA(net, decay=0.5)
    ema.update(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.add_(2.0)
    ema.update(net)
    assert torch.allclose(ema.module[1].running_mean, torch.full((4,), 1.0))  # 0.5·0 + 0.5·2
    assert ema.n_averaged == 2

    full = small_vit(layers=4)
    plan = fxexpand.GrowthPlan(full, depth_factor=0.5, stages=2, example_inputs=(torch.randn(1, 3, 32, 32),))
    model = plan.initial_model()                      # encoder_layer_0 and encoder_layer_3
    ema = fxexpand.EMA(model, decay=0.9)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.mul_(0.5)                               # make the average differ from the model
    avg_of_3 = copy.deepcopy(ema.module.get_submodule("encoder.layers.encoder_layer_3").state_dict())
    grown = fxexpand.compile(model, passes=plan.stage(0).passes(ema.module))
    ema.follow(grown)
    # [old 0, copy of EMA 0, old 3, copy of EMA 3] are renamed to blocks 0..3: old block 3 is now block 2
    names = chain_blocks(grown, "encoder.layers")
    assert names == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    after = ema.module.get_submodule("encoder.layers.encoder_layer_2").state_dict()
    assert all(torch.equal(after[k], avg_of_3[k]) for k in avg_of_3)   # renamed: 3 -> 2 keeps its average
    with pytest.raises(InputError, match="different architecture"):
        fxexpand.EMA(nn.Linear(2, 2)).update(nn.Linear(3, 3))


def test_stage_boundaries_and_optimizer_rebuild_keep_the_learning_rate():
    full = small_vit(layers=4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    plan = fxexpand.GrowthPlan(full, depth_factor=0.25, stages=4, epochs=10, example_inputs=(x[:1],))
    assert plan.alphas == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [(s.start_epoch, s.end_epoch) for s in plan] == [(0, 3), (3, 5), (5, 8), (8, 10)]
    assert plan.stage_at(6).index == 2
    assert [s.new_blocks for s in plan] == [{"encoder.layers": 1}] * 3 + [{}]
    model = plan.initial_model()
    head = [p for n, p in model.named_parameters() if n.startswith("heads")]
    body = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    opt = torch.optim.SGD([{"params": body, "lr": 0.1}, {"params": head, "lr": 0.01}], momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ema = fxexpand.EMA(model)
    train_steps(model, x, y, opt, ema)
    sched.step()
    stage = plan.stage(0)
    grown = stage.grow(model, ema)
    moved = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    opt2 = stage.rebuild_optimizer(opt, grown)
    assert opt2 is opt and [g["lr"] for g in opt.param_groups] == [0.05, 0.005]
    n_params = sum(1 for _ in grown.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params
    origin = get_record(grown, ParameterOrigins).origin
    for n, p in grown.named_parameters():
        if n in origin:                                  # momentum moved with the (renamed) parameter
            assert torch.equal(opt.state[p]["momentum_buffer"], moved[origin[n][0]])
        else:                                            # inserted block: in the body group, fresh state
            assert any(q is p for q in opt.param_groups[0]["params"]) and all(k is not p for k in opt.state)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.0025]
    train_steps(grown, x, y, opt, ema)
    with pytest.raises(InputError, match="fxexpand.compile"):
        fxexpand.rebuild_optimizer(opt, small_vit(layers=4))


# ------------------------------------------------------------------------------ random models


def _plan_or_none(model, x, **kw):
    try:
        return fxexpand.GrowthPlan(model, stages=2, example_inputs=(x,), **kw)
    except InputError:  # nothing to grow in this model
        return None


@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ft.models())
def test_width_growth_on_random_models_keeps_the_function_and_ends_at_the_original(case):
    print(f"random model seed={case.seed}")
    (x,) = case.example_inputs
    plan = _plan_or_none(case.model, x, width_factor=0.5)
    if plan is None:
        return
    start = plan.initial_model().double().eval()
    grown = plan.stage(0).grow(start).eval()
    xd = x.double()
    with torch.no_grad():
        assert rel_error(start(xd), grown(xd)) <= 1e-9
        original, _ = ft.random_model(case.seed)
        original = original.double().eval()
        original.load_state_dict(grown.state_dict())   # strict: the generated architecture
        assert rel_error(original(xd), grown(xd)) <= 1e-12


def _with_a_chain(model, x, copies=3):
    """``model`` with its first shape-preserving block replaced by a Sequential of ``copies``
    differently initialised copies of it (a chain to grow), or None if it has no such block."""
    singles = [c for c in fxexpand.find_chains(model, (x,)) if len(c) == 1]
    if not singles:
        return None
    name = singles[0].blocks[0]
    block = model.get_submodule(name)
    reps = [block]
    for i in range(1, copies):
        rep = copy.deepcopy(block)
        with torch.no_grad():
            for p in rep.parameters():
                p.mul_(1 + 0.1 * i)
        reps.append(rep)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Sequential(*reps))
    return model


@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ft.models())
def test_depth_growth_on_random_models_ends_at_the_original(case):
    print(f"random model seed={case.seed}")
    (x,) = case.example_inputs
    full = _with_a_chain(case.model, x)
    if full is None:
        return
    original = copy.deepcopy(full)
    plan = fxexpand.GrowthPlan(full, depth_factor=0.34, stages=3, example_inputs=(x,))
    model = plan.initial_model()
    ema = fxexpand.EMA(model, decay=0.5)
    for stage in plan:
        with torch.no_grad():
            for p in ema.module.parameters():
                p.mul_(0.9)                     # the average differs from the model
        model = stage.grow(model, ema).eval()
        ema.update(model)
    assert [len(c.members) for c in get_record(model, GrowthRecord).chains.values()] == [3]
    original.load_state_dict(model.state_dict())   # strict
    with torch.no_grad():
        assert torch.equal(original.eval()(x), model(x))


def test_random_models_do_get_grown():
    """The two properties above are not vacuous: some generated models have free channel groups and
    shape-preserving blocks."""
    depth = width = 0
    for seed in range(20):
        model, (x,) = ft.random_model(seed)
        width += _plan_or_none(model, x, width_factor=0.5) is not None
        depth += _with_a_chain(model, x) is not None
    assert depth >= 3 and width >= 3


def test_regression_depthwise_conv_thinned_to_one_channel_stays_depthwise():
    """Found by the width property (random model seed 1190): a depthwise conv of 2 channels thinned
    to 1 looked like an ordinary 1-to-1 conv and was grown as a dense 2-to-2 conv."""
    model, (x,) = ft.random_model(1190)
    plan = fxexpand.GrowthPlan(model, width_factor=0.5, stages=2, example_inputs=(x,))
    grown = plan.stage(0).grow(plan.initial_model())
    original, _ = ft.random_model(1190)
    original.load_state_dict(grown.state_dict())


def test_regression_chain_blocks_must_have_the_same_parameters():
    """Found by the depth property (random model seed 3432568, max_blocks=5): blocks of one class
    with different layers inside were chained, and a copy of one landed under the other's name."""
    model, (x,) = ft.random_model(3432568, max_blocks=5)
    for chain in fxexpand.find_chains(model, (x,)):
        sigs = {tuple((k, tuple(v.shape)) for k, v in model.get_submodule(b).state_dict().items())
                for b in chain.blocks}
        assert len(sigs) == 1, chain


def test_growth_benchmark_quick_mode_runs():
    """benchmarks/growth_bench.py (the source of the docs' speed-up figures) keeps working."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "growth_bench.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "speed-up" in out.stdout and out.stdout.count("x** (") == 2
