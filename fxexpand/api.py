"""The user-facing entry points: :func:`compile` and :func:`contract`."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import gc
import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import pipelines
from .core import (
    BN_MODULES,
    CONV_TYPES,
    ContractionError,
    DecayActivation,
    ExitRecord,
    ExpandedRegion,
    InputError,
    ModuleRenames,
    Note,
    ParameterOrigins,
    Pass,
    PassError,
    PassManager,
    Recipe,
    VerifyReport,
    as_inputs,
    build_pass,
    delete_unused_submodules,
    find_regions,
    get_record,
    keep_attr,
    nonfinite_tensors,
    persistent_records,
    propagate_shapes,
    set_record,
    shallow_copy_module,
    trace,
)
from .core import verify as verify_models

__all__ = ["compile", "contract", "ContractReport", "set_train_mode", "train_forms"]

logger = logging.getLogger(__name__)


@dataclass
class ContractReport:
    """What :func:`contract` did: the notes of every pass and the verification result."""

    target: str
    notes: list[Note] = field(default_factory=list)
    verification: VerifyReport | None = None

    def _count(self, action: str) -> int:
        return sum(1 for n in self.notes if n.action == action)

    @property
    def fused(self) -> list[Note]:
        return [n for n in self.notes if n.action in ("fused", "folded", "removed")]

    @property
    def skipped(self) -> list[Note]:
        return [n for n in self.notes if n.action == "skipped"]

    def summary(self) -> str:
        parts = [f"target={self.target}", f"folded={self._count('folded')}", f"fused={self._count('fused')}",
                 f"removed={self._count('removed')}", f"skipped={self._count('skipped')}"]
        if self.verification is not None:
            parts.append(f"max_abs_error={self.verification.max_abs_error():.3e}")
        return ", ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary()] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def compile(  # noqa: A001 - mirrors torch.compile's name on purpose
    model: nn.Module,
    passes: Sequence[Pass | str],
    *,
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    verify_each: bool = False,
    train_mode: Literal["collapsed", "explicit"] = "collapsed",
) -> fx.GraphModule:
    """Trace a copy of ``model`` and run ``passes`` on it; returns a new trainable GraphModule.

    ``model`` is never modified (its parameters and buffers stay bit-identical). Passes may be pass
    objects or registered names (see :func:`fxexpand.registered_passes`). ``example_inputs`` enables
    shape information for passes that need it and ``verify_each`` (which names the first pass that
    changed the model's function — only meaningful for function-preserving passes).

    ``train_mode="collapsed"`` (default): in training mode every expanded region whose body is a
    linear, batch-independent chain (ExpandNets CL, CK, FC) runs as one op whose weight is composed
    from the chain's factors each forward — the same function, parameters and gradients as the chain, at
    about the original layer's cost; other regions (NetBooster blocks: BatchNorm, activations) run
    explicitly. ``"explicit"`` runs every chain. The notes say which region runs how and why; switch
    later with :func:`set_train_mode`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile expects an nn.Module, got {type(model).__name__}")
    pass_objs = [build_pass(p) for p in passes]
    training = model.training
    work = copy.deepcopy(model)
    # optional None / bool arguments the example inputs do not give are traced at their defaults
    num_inputs = len(as_inputs(example_inputs)) if example_inputs is not None else None
    gm = trace(work, leaf_modules=leaf_modules, concrete_args=concrete_args, num_inputs=num_inputs)
    # typed records of the input (GrowthPlan's growth record, the model's factory) carry over
    for record in persistent_records(work):
        set_record(gm, record)
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    pm = PassManager(passes=pass_objs, verify_each=verify_each, example_inputs=example_inputs)
    result = pm(gm)
    out = result.graph_module
    out.recompile()
    out.train(training)
    mode_notes = set_train_mode(out, train_mode, notes=True)
    renames = [r for r in result.records if isinstance(r, ModuleRenames)]
    set_record(out, _origins(model, out, renames))
    keep_attr(out, "fxexpand_notes", list(getattr(model, "fxexpand_notes", [])) + list(result.notes) + mode_notes)
    # state_dict metadata: models such as MNASNet read the root's version when loading
    keep_attr(out, "_version", getattr(model, "_version", 1))
    before = get_record(model, Recipe)
    set_record(out, Recipe(list(before.passes if before else []) + [_pass_spec(p) for p in pass_objs]))
    return out


def set_train_mode(model: nn.Module, mode: Literal["collapsed", "explicit"], *, notes: bool = False):
    """Run every expanded region of ``model`` collapsed (where its chain allows) or explicitly.
    Parameters, ``state_dict`` and optimizer state are the same in both forms. Returns
    ``{region: "collapsed" | "explicit" | "explicit: <reason>"}`` (or, with ``notes=True``, the
    corresponding notes)."""
    if mode not in ("collapsed", "explicit"):
        raise ValueError(f"train_mode must be 'collapsed' or 'explicit', got {mode!r}")
    status = {name: region.set_train_mode(mode) for name, region in find_regions(model).items()}
    if not notes:
        return status
    return [Note("compile", s.split(":")[0], name, s.split(": ", 1)[1] if ": " in s else f"train_mode={mode}")
            for name, s in status.items()]


def train_forms(model: nn.Module) -> dict[str, str]:
    """How each expanded region of ``model`` ran in its last training forward: ``"collapsed"``, or
    ``"explicit: <why>"`` (a BatchNorm in train mode, an activation still decaying, composing costing
    more than the chain on that input, ...); ``""`` if it has not run in training since its mode was
    set, ``"explicit"`` for a region set to run its chain."""
    return {name: (region.last_form if region.train_mode == "collapsed" else "explicit")
            for name, region in find_regions(model).items()}


def _origins(model: nn.Module, out: fx.GraphModule, renames: list[ModuleRenames]) -> ParameterOrigins:
    """For every parameter and buffer of ``out``, the tensor of ``model`` it continues, following the
    :class:`ModuleRenames` records the passes returned ({new module name: old name, or None for a new
    module}). Used by :func:`fxexpand.rebuild_optimizer` and :class:`fxexpand.EMA` after growth."""
    renames_map: dict[str, str | None] = {}
    copied: dict[str, str] = {}
    for r in renames:
        renames_map.update(r.renames)
        copied.update(r.copied_from)
    old = dict(itertools.chain(model.named_parameters(), model.named_buffers()))

    def old_name(name: str, table: dict) -> tuple[bool, str | None]:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in table:
                src = table[prefix]
                return True, (None if src is None else ".".join([src] + parts[i:]))
        return False, name

    origin, copied_from = {}, {}
    for name, t in itertools.chain(out.named_parameters(), out.named_buffers()):
        _, src = old_name(name, renames_map)
        if src is not None and src in old:
            origin[name] = (src, weakref.ref(old[src]))
        hit, c = old_name(name, copied)
        if hit and c is not None:
            copied_from[name] = c
    return ParameterOrigins(origin, copied_from)


def _pass_spec(p: Pass) -> tuple[str, dict] | None:
    """(registered name, plain keyword arguments) of a pass, or None if it cannot be recorded."""
    name = getattr(type(p), "registered_name", "")
    if not name or not dataclasses.is_dataclass(p):
        return None
    kwargs = {}
    for f in dataclasses.fields(p):
        if not f.init:
            continue
        v = getattr(p, f.name)
        if isinstance(v, tuple):
            v = list(v)
        if not _plain(v):
            return None
        kwargs[f.name] = v
    return name, kwargs


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def contract(
    model: nn.Module,
    example_inputs: Any,
    *,
    target: Literal["original", "deploy"] = "original",
    verify: bool = True,  # noqa: A002 - the natural keyword for users
    rtol: float = 1e-4,
    atol: float = 0.0,
    trials: int = 3,
    verify_each: bool = False,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    extra_passes: Sequence[Pass | str] = (),
) -> fx.GraphModule:
    """Contract ``model`` for inference; returns a new GraphModule in eval mode.

    Runs identity removal, BatchNorm folding and linear fusion to a fixed point, in eval mode,
    then (unless ``verify=False``) checks the result against ``model`` with :func:`fxexpand.verify`.

    ``model`` is traced as it is, without a copy, and never changed: the passes build new modules
    and tensors instead of writing into existing ones, whatever the result still shares with
    ``model`` is copied at the end, and every module's Python state (training flag, attributes a
    forward fills, e.g. a cache) is restored when ``contract`` returns or raises. The result shares
    no module or tensor with ``model``.

    Targets:
        ``"original"`` (default): contract only what fxexpand expanded (regions created by
        expansion passes), so the result keeps the original architecture and state_dict keys.
        ``"deploy"``: also fold every BatchNorm and make every fusion that does not increase FLOPs.

    The report (:class:`ContractReport`) is attached as ``result.fxexpand_report``; a layer type
    no pass knows (LayerNorm, PReLU, a custom leaf module, ...) is left unchanged and listed there
    as skipped.

    Raises:
        InputError: the example inputs do not fit the model, or its weights contain NaN/Inf.
        ContractionError: an expanded region cannot be contracted exactly (e.g. alpha < 1).
        EquivalenceError: the contracted model does not match (a bug; please report it).
        TraceError, PassError: see their messages.
    """
    if target not in ("original", "deploy"):
        raise ValueError(f"target must be 'original' or 'deploy', got {target!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"contract expects an nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    _refuse_undecayed(model)
    _refuse_nonfinite(model)
    opts = dict(target=target, leaf_modules=tuple(leaf_modules), concrete_args=concrete_args,
                extra_passes=extra_passes, verify_each=verify_each, rtol=rtol, atol=atol)
    with _gc_paused(), _state_restored(model):
        # traced in place, not copied: the passes build new modules and tensors and never change one
        # in place, and what the result still shares with ``model`` is copied at the end (a deep
        # copy of the whole model was a third of the time); any Python state of ``model`` that
        # tracing or eval mode touched is put back when this block ends, even on an error
        # (_contract_once puts the model in eval mode)
        out, notes = _contract_once(model, inputs, owner=model, **opts)
    report = ContractReport(target=target, notes=_dedupe(notes))
    if verify:
        out64 = None
        dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if dt != torch.float64:
            # the same contraction carried out in float64 separates algebra from float32 rounding
            inputs64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                             for t in inputs)
            with _gc_paused():
                out64, _ = _contract_once(copy.deepcopy(model).double(), inputs64, **opts)
        reference = _backbone_reference(model) if get_record(model, ExitRecord) is not None else model
        report.verification = verify_models(reference, out, inputs, rtol=rtol, atol=atol, trials=trials,
                                            candidate64=out64)
    keep_attr(out, "fxexpand_report", report)
    keep_attr(out, "_version", getattr(model, "_version", 1))
    logger.info("contract: %s", report.summary())
    return out



@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused (restored afterwards): tracing, copying and rewriting
    allocate many small objects, and the full collections they trigger each walk every object of
    the process (timm, torch, the model): 10-30 % of a contraction's time. What the pause allocated
    is all still in the youngest generation, so one collection of that generation at the end frees
    the contraction's garbage without walking older objects (and leaves none for the caller)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def _contract_once(work: nn.Module, inputs: tuple, *, target, leaf_modules, concrete_args, extra_passes,
                   verify_each, rtol, atol, owner: nn.Module | None = None) -> tuple[fx.GraphModule, list[Note]]:
    """Contract ``work`` (in eval mode). ``owner``: a module whose submodules and tensors the result
    must not share (``work`` itself when it is the user's model, traced without a copy)."""
    if any(m.training for m in work.modules()):  # (eval() sets every flag through nn.Module.__setattr__)
        work.eval()
    # lazy: the code of the traced graph is never needed, only the contracted graph's (generated once, below)
    # target "deploy": identities and eval-mode dropout never enter the graph (RemoveIdentity would
    # remove every one of them); "original" keeps them outside the expanded regions
    gm = _traced_with_records(work, leaf_modules=leaf_modules, concrete_args=concrete_args, num_inputs=len(inputs),
                              inline_regions=True, lazy=True, drop_identities=target == "deploy")
    propagate_shapes(gm, inputs)
    notes: list[Note] = []
    for manager in pipelines.contraction(target, extra_passes=tuple(extra_passes), verify_each=verify_each,
                                         example_inputs=inputs, rtol=rtol, atol=atol):
        result = manager(gm)
        gm = result.graph_module
        notes += result.notes
    if any(not n.users and n.op not in ("output", "placeholder") for n in gm.graph.nodes):
        gm.graph.eliminate_dead_code()  # (its purity checks cost more than this scan)
    delete_unused_submodules(gm)
    if owner is not None:
        _own(gm, owner)
    gm = _code_generated(gm, type(work).__name__)
    gm.eval()
    return gm, notes + _unknown_layer_notes(gm)


def _code_generated(gm: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """A plain GraphModule with the code of ``gm``'s graph generated (``gm`` may be torch.fx's lazy
    GraphModule), the same submodules, metadata and records; an invalid graph raises here."""
    if hasattr(gm, "real_recompile"):
        # the lazy GraphModule holds nothing of its own but methods: the same object becomes a plain
        # one (torch.fx gives every GraphModule a class of its own, "GraphModuleImpl", on which
        # recompile() installs forward), so nothing is copied or rebuilt (rebuilding was as costly
        # as the code generation itself). torch.jit.script refuses the lazy kind.
        impl = type("GraphModuleImpl", (fx.GraphModule,), {})
        impl.__name__ = class_name
        gm.__class__ = impl
    try:
        gm.graph.lint()
        gm.recompile()
    except Exception as e:
        raise PassError(f"contraction produced an invalid graph: {type(e).__name__}: {e}") from e
    return gm


def _own(gm: fx.GraphModule, owner: nn.Module) -> None:
    """Replace every submodule, parameter and buffer ``gm`` shares with ``owner`` by a copy (one
    deep copy with one memo, so what was shared inside the result stays shared)."""
    modules, tensors = set(), set()
    for m in owner.modules():  # one walk of the tree (parameters() and buffers() would walk it again)
        modules.add(id(m))
        tensors.update(id(t) for t in itertools.chain(m._parameters.values(), m._buffers.values()) if t is not None)
    memo: dict[int, Any] = {}
    shared: list[tuple[str, nn.Module]] = []
    stack = [("", gm)]
    while stack:  # owner's modules are copied whole: their children are not visited
        prefix, mod = stack.pop()
        for name, child in mod._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            if id(child) in modules:
                shared.append((path, child))
            else:
                stack.append((path + ".", child))
        for attrs in (mod._parameters, mod._buffers):
            for name, t in attrs.items():
                if t is not None and id(t) in tensors:
                    attrs[name] = copy.deepcopy(t, memo)
    for path, child in shared:
        parent, _, name = path.rpartition(".")
        gm.get_submodule(parent)._modules[name] = _copy_module(child, memo)


_IMMUTABLE = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


def _copy_module(m: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy(m, memo)``; for a module without children whose attributes are immutable
    values or torch's registries (a ReLU, a Conv2d: most of what a contraction keeps), the same copy
    made directly: a shallow copy with new registries and deep-copied tensors (a fifth of the cost)."""
    state = m.__dict__
    if m._modules or any(not (isinstance(v, _IMMUTABLE) or (isinstance(v, tuple) and all(isinstance(x, _IMMUTABLE)
                                                                                            for x in v))
                              or (k.startswith("_") and type(v) in (dict, set, collections.OrderedDict)))
                         for k, v in state.items()):
        return copy.deepcopy(m, memo)
    if id(m) in memo:
        return memo[id(m)]
    new = shallow_copy_module(m)
    for reg in (new._parameters, new._buffers):
        for k, t in reg.items():
            if t is not None:
                reg[k] = copy.deepcopy(t, memo)
    memo[id(m)] = new
    return new


@contextlib.contextmanager
def _state_restored(model: nn.Module):
    """Every module's Python state (its ``__dict__``: training flag, attributes, and the contents
    of its dict / list / set attributes, e.g. a cache a forward fills) as it was on entry, whatever
    happens inside. Tensors are not copied: contraction never writes one in place."""
    saved = []
    for m in model.modules():
        state = m.__dict__.copy()
        # containers: the registries of tensors and children, and the public ones (a cache); torch's
        # hook registries (empty, private) are left out: a forward does not register hooks
        inner = [(v, v.copy()) for v in (state.get("_parameters"), state.get("_buffers"), state.get("_modules"))
                 if v is not None]
        inner += [(v, v.copy()) for k, v in state.items() if k[0] != "_" and type(v) in (dict, list, set)]
        saved.append((m, state, inner))
    try:
        yield
    finally:
        for m, state, inner in saved:
            if not _unchanged(m.__dict__, state):
                m.__dict__.clear()
                m.__dict__.update(state)
            for obj, content in inner:
                if not _unchanged(obj, content):
                    obj.clear()
                    obj.extend(content) if isinstance(obj, list) else obj.update(content)


def _unchanged(now: Any, before: Any) -> bool:
    """Whether a dict / list / set holds what it held: compared in C (``==`` takes an item that is
    the same object as equal without calling its ``__eq__``), item by item by identity when an
    ``__eq__`` (a tensor's, a tracing proxy's) gets in the way."""
    try:
        if now == before:
            return True
    except Exception:
        pass
    return _same_items(now, before)


def _same_items(a: Any, b: Any) -> bool:
    """Whether two dicts / lists / sets hold the same objects (by identity: no ``__eq__`` of a tensor)."""
    if len(a) != len(b):
        return False
    if isinstance(a, dict):
        return all(k in b and a[k] is b[k] for k in a)
    if isinstance(a, list):
        return all(x is y for x, y in zip(a, b))
    return a == b


def _backbone_reference(model: nn.Module) -> nn.Module:
    """A multi-exit model returns (F_1, ..., F_N); its contraction returns the backbone's f_N. The
    reference is the same model with only the exits removed (in eval mode)."""
    gm = _traced_with_records(copy.deepcopy(model).eval())
    return pipelines.exit_removal()(gm).graph_module.eval()


def _traced_with_records(work: nn.Module, **trace_kwargs: Any) -> fx.GraphModule:
    """``trace(work)`` carrying the typed records the model's passes attached (exits, widths)."""
    gm = trace(work, **trace_kwargs)
    for record in persistent_records(work):
        set_record(gm, copy.deepcopy(record))
    return gm


def _unknown_layer_notes(gm: fx.GraphModule) -> list[Note]:
    """A "skipped" note for every layer no pass knows: a module with weights of a type no pass
    rewrites (LayerNorm, PReLU, an RNN, ...) or a module from outside torch.nn kept as a leaf call."""
    rewritten = (*CONV_TYPES.values(), nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 *BN_MODULES, nn.Identity, nn.modules.dropout._DropoutNd, DecayActivation, ExpandedRegion)
    notes, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        m = gm.get_submodule(node.target)
        if isinstance(m, rewritten):
            continue
        has_state = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
        foreign = not type(m).__module__.startswith("torch.nn")
        if has_state or foreign:
            notes.append(Note("contract", "skipped", node.target,
                              f"{type(m).__name__} is a layer type no fxexpand pass rewrites; left unchanged"))
    return notes


def _refuse_nonfinite(model: nn.Module) -> None:
    """NaN/Inf weights would make every fold meaningless and hide any error from verification."""
    bad = nonfinite_tensors(model)
    if bad:
        raise InputError(
            f"the model has NaN or Inf weights: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. Contraction "
            "cannot be verified with non-finite weights; check the training run (did the loss diverge?) or the "
            "model file, and contract a checkpoint with finite weights."
        )


def _refuse_undecayed(model: nn.Module) -> None:
    """Rule 6: a decaying activation inside an expanded region must be at alpha == 1 exactly."""
    regions, decaying = [], []
    for name, m in model.named_modules():  # one walk (find_regions would be a second)
        if isinstance(m, ExpandedRegion):
            regions.append(name)
        elif isinstance(m, DecayActivation) and not m.is_identity:
            decaying.append((name, m))
    bad = [f"{name} (alpha={float(m.alpha):.6g})" for name, m in decaying
           if any(name.startswith(r + ".") for r in regions)]
    if bad:
        raise ContractionError(
            f"cannot contract: {len(bad)} decaying activation(s) are not linear yet: {', '.join(bad[:8])}"
            + (" ..." if len(bad) > 8 else "")
            + ". Finish the decay schedule (LinearDecay) or call fxexpand.set_decay(model, 1.0) first."
        )


def _dedupe(notes: list[Note]) -> list[Note]:
    """Fixed-point rounds repeat skip notes; keep the first of each."""
    seen, out = set(), []
    for n in notes:
        key = (n.pass_name, n.action, n.where, n.reason)
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out
