"""Symbolic tracing with clear errors.

:func:`trace` wraps :class:`torch.fx.Tracer`. When tracing fails (data-dependent control flow,
unsupported Python, ...) it raises :class:`~fxexpand.core.TraceError` naming the innermost module
being traced, the source line in *your* code where tracing stopped, and the two remedies torch.fx
offers: mark the module as a leaf (``leaf_modules=``) or fix the offending argument
(``concrete_args=``).

Optional arguments are traced at their defaults: a ``forward()`` parameter whose default is ``None``
or a bool (timm ViTs' ``attn_mask=None, is_causal=False``, a ``return_features=False`` flag) and that
neither ``concrete_args`` nor the example inputs give (``num_inputs``) is specialised to its default
(:func:`specialised_defaults`). Traced as a placeholder instead, such an argument takes the branch
the *non*-default value would take (``if attn_mask is not None`` is true for a proxy) and is read by
every layer it is passed to. The traced ``forward()`` then takes only the real inputs (passing
``attn_mask=`` to it is a ``TypeError``).

When timm is loaded (a timm model always loads it), the tracer also uses timm's own FX
registrations (:func:`timm_fx_registrations`): the modules timm registers as not traceable stay
leaf calls and the functions it registers are autowrapped (one ``call_function`` node each), as in
timm's own FX feature extraction. timm's BatchNorm + activation modules (``BatchNormAct2d``:
``act(drop(batch_norm(x)))``, :func:`~fxexpand.core.norm_act_parts`) stay leaves in both modes: a
compiled graph follows ``.train()`` / ``.eval()``, and contraction reads the leaf as a batch norm
followed by its ``drop`` and ``act`` (:func:`~fxexpand.core.bn_of`). Traced through, each would be
eleven nodes (its rank assertion, four attribute reads, the batch norm, two identities): three
quarters of mobileone_s0's graph, and of the time to trace, record shapes and rewrite it. Other
BatchNorm subclasses timm registers are leaves in training mode only (they read
``self.training``) and are traced through in eval mode.

The returned GraphModule shares parameters with ``model`` (as ``torch.fx.symbolic_trace`` does);
:func:`fxexpand.compile` traces a deep copy; :func:`fxexpand.contract` traces ``model`` itself,
restores its state afterwards and copies whatever its result still shares with it.
"""

from __future__ import annotations

import inspect
import operator
import os
import sys
import traceback
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from .dynamic import DynamicLayer, norm_act_parts
from .errors import TraceError
from .modules import DecayActivation, GradientScale
from .provenance import ExpandedRegion, find_regions, set_traced_regions

try:  # torch.fx's GraphModule that generates its code at first use (torch >= 2.3)
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - older torch: the code is generated at once
    _LazyGraphModule = None

__all__ = ["trace", "trace_with_calls", "ModuleCall", "specialised_defaults", "timm_fx_registrations"]


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(__file__) + os.sep


# where timm keeps its FX registrations, newest layout first: timm >= 1.0 (getters in timm.layers),
# 0.9 (timm.models._features_fx), <= 0.8 (timm.models.fx_features, module-level sets only)
_TIMM_FX_MODULES = ("timm.layers._fx", "timm.models._features_fx", "timm.models.fx_features")


def timm_fx_registrations() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's FX registrations: ``(leaf module classes, functions to autowrap)``.

    Read from the installed timm at each call (timm modules register themselves when imported), and
    only when timm is already loaded: a model that contains timm code has loaded it, and a model
    that does not needs none of timm's registrations, so fxexpand never imports timm (about 4 s)
    itself. ``((), ())`` when timm is not loaded or exposes none of the known layouts.
    """
    if "timm" not in sys.modules:
        return (), ()
    for name in _TIMM_FX_MODULES:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        if hasattr(mod, "get_notrace_modules") and hasattr(mod, "get_notrace_functions"):
            modules, functions = mod.get_notrace_modules(), mod.get_notrace_functions()
        elif hasattr(mod, "_leaf_modules") and hasattr(mod, "_autowrap_functions"):
            modules, functions = mod._leaf_modules, mod._autowrap_functions
        else:
            continue
        leaves = tuple(m for m in modules if isinstance(m, type) and issubclass(m, nn.Module))
        # timm also accepts names here; torch.fx autowraps function objects only
        wrapped = tuple(f for f in functions if callable(f) and hasattr(f, "__globals__"))
        return leaves, wrapped
    return (), ()


def _timm_leaves() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """timm's leaf classes split into ``(always leaves, leaves in training mode only)``: the second
    are its BatchNorm subclasses (BatchNormAct2d, ...), opaque to timm only because they read
    ``self.training``."""
    leaves, _ = timm_fx_registrations()
    bn = nn.modules.batchnorm._BatchNorm
    return (tuple(t for t in leaves if not issubclass(t, bn)), tuple(t for t in leaves if issubclass(t, bn)))


def _is_norm_act(m: nn.Module) -> bool:
    """A BatchNorm + activation leaf that :func:`~fxexpand.core.bn_of` reads in eval mode: a
    ``BatchNorm1d/2d/3d`` subclass made of the batch norm, ``drop`` and ``act``."""
    return isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and norm_act_parts(m) is not None


class _FxExpandTracer(fx.Tracer):
    # defaults: torch.fx rebuilds a pickled GraphModule by tracing with ``tracer_cls()`` (no arguments)
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__(autowrap_functions=timm_fx_registrations()[1])
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self._timm_leaf_types, self._timm_train_leaf_types = _timm_leaves()
        self.failed_module: tuple[str, str] | None = None
        # every module call seen while tracing: (qualified name, module, first input node, output
        # node, index of the first node created by the call, index after the last one)
        self.module_calls: list[tuple[str, nn.Module, fx.Node | None, fx.Node | None, int, int]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        if self._timm_leaf_types and isinstance(m, self._timm_leaf_types):
            return True
        if self._timm_train_leaf_types and isinstance(m, self._timm_train_leaf_types) and (
                m.training or _is_norm_act(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        self._tensor_names = None  # the root's tensors by identity, built at the first lookup
        return super().trace(root, concrete_args)

    def _tensor_name(self, t: torch.Tensor) -> str | None:
        """The qualified name of a parameter or buffer of the root, through an index: torch.fx finds it
        by walking every parameter / buffer of the root, once per attribute read (``getattr``) and once
        per tensor argument (``create_arg``), which made tracing quadratic in the model's size (timm's
        ``BatchNormAct2d`` reads its four tensors as attributes and passes them to ``F.batch_norm``:
        6 of the 7 s of tracing mobileone_s0). Same answer: the first name ``named_parameters()`` /
        ``named_buffers()`` gives for that tensor object."""
        if not isinstance(getattr(self, "root", None), nn.Module):
            return None
        names = getattr(self, "_tensor_names", None)
        if names is None:
            names = {}
            for n, p in self.root.named_parameters():
                names.setdefault(("p", id(p)), n)
            for n, b in self.root.named_buffers():
                names.setdefault(("b", id(b)), n)
            self._tensor_names = names
        return names.get(("p" if isinstance(t, nn.Parameter) else "b", id(t)))

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if isinstance(attr_val, torch.Tensor) and (isinstance(attr_val, nn.Parameter) or self.proxy_buffer_attributes):
            name = self._tensor_name(attr_val)
            if name is not None:
                if name not in parameter_proxy_cache:
                    factory = None
                    if self.param_shapes_constant:
                        factory = lambda node, n=name, v=attr_val: fx.proxy.ParameterProxy(self, node, n, v)  # noqa: E731
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {},
                                                                    proxy_factory_fn=factory)
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):
            name = self._tensor_name(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    #: skip ``nn.Identity`` modules and eval-mode dropout modules: their output is their input, so
    #: they get no node (set by :func:`trace` with ``drop_identities=True``)
    drop_identities: bool = False

    def call_module(self, m, forward, args, kwargs):
        if (self.drop_identities and len(args) == 1 and not kwargs and isinstance(args[0], fx.Proxy)
                and (isinstance(m, nn.Identity) or (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training))):
            return args[0]
        try:
            start = len(self.graph.nodes)
            out = super().call_module(m, forward, args, kwargs)
            first = args[0] if args else None
            others = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, fx.Proxy)]
            self.module_calls.append((
                self.path_of_module(m), m,
                first.node if isinstance(first, fx.Proxy) and not others else None,
                out.node if isinstance(out, fx.Proxy) else None,
                start, len(self.graph.nodes),
            ))
            return out
        except Exception:
            if self.failed_module is None:
                try:
                    path = self.path_of_module(m)
                except Exception:
                    path = "?"
                self.failed_module = (path, type(m).__name__)
            raise


def _mode_dependent_types() -> tuple[type, ...]:
    """Modules whose forward reads ``self.training`` inside a *functional* call.

    Traced through, torch.fx would bake the training flag of the moment into the graph (e.g.
    ``stochastic_depth(x, p, mode, True)``), so a compiled model would keep dropping paths in eval
    mode. Kept as leaf calls they follow ``.train()`` / ``.eval()``.
    """
    try:
        from torchvision.ops import (
            StochasticDepth,  # lazy: torchvision is optional for the engine
        )
    except Exception:  # torchvision missing or broken
        return ()
    return (StochasticDepth,)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The last traceback frame outside torch and fxexpand: the line of user code that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    candidate = None
    for fr in frames:
        fn = os.path.abspath(fr.filename)
        if fn.startswith(_TORCH_DIR) or fn.startswith(_OWN_DIR):
            continue
        candidate = fr
    return candidate


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """``model.forward``'s parameters (without ``self``); None if its signature cannot be read."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def specialised_defaults(model: nn.Module, *, concrete_args: dict[str, Any] | None = None,
                         num_inputs: int | None = None) -> dict[str, Any]:
    """The ``forward()`` arguments :func:`trace` specialises to their defaults: each parameter whose
    default is ``None`` or a bool, that is not named in ``concrete_args`` and not one of the first
    ``num_inputs`` positional parameters (the example inputs; None: no positional input is given
    beyond the parameters without defaults). A ``forward(*args, **kwargs)`` gets none."""
    params = _forward_parameters(model)
    if params is None or any(p.kind in _VARIADIC for p in params):
        return {}
    given = set(concrete_args or ())
    out = {}
    for i, p in enumerate(params):
        positional = p.kind != inspect.Parameter.KEYWORD_ONLY
        if p.name in given or (positional and num_inputs is not None and i < num_inputs):
            continue
        if p.default is None or isinstance(p.default, bool):
            out[p.name] = p.default
    return out


#: what torch.fx computes from a specialised argument: ``_assert_is_none(arg)``, ``torch._assert(arg == value)``
_SPECIALISATION_CHECKS = (operator.eq, torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None))


def _finish_specialised(graph: fx.Graph, params: list[inspect.Parameter] | None, dropped: set[str]) -> None:
    """After torch.fx specialised ``concrete_args``: the arguments in ``dropped`` (those fxexpand
    specialised at their defaults) leave the graph, with the assertions torch.fx made on them, so the
    traced ``forward()`` takes only the real inputs (and every placeholder is one, which the exit
    segments and ONNX export count on). A specialised argument the caller named stays a parameter,
    under its own name (torch.fx names its placeholder ``<name>_<k>``, a suffix more per retrace)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if params is None or len(placeholders) != len(params):
        return

    def readers(node: fx.Node) -> list[fx.Node]:  # every node computed from ``node``, users first
        out = []
        for user in node.users:
            out += readers(user) + [user]
        return out

    for node, p in zip(placeholders, params):
        if p.name in dropped:
            tree = readers(node)
            if all(n.op == "call_function" and n.target in _SPECIALISATION_CHECKS for n in tree):
                for n in tree + [node]:
                    if n.graph is graph and not n.users:
                        graph.erase_node(n)
                continue
        if node.target != p.name:
            node.target = p.name


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    num_inputs: int | None = None,
    inline_regions: bool = False,
    lazy: bool = False,
    drop_identities: bool = False,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a :class:`torch.fx.GraphModule`.

    Args:
        model: the module to trace (not modified).
        leaf_modules: module classes or qualified names to keep as opaque calls (use this for
            submodules with data-dependent control flow).
        concrete_args: values for forward() arguments that should be specialised (e.g. flags
            that select a code path), passed to ``torch.fx.Tracer.trace``. Arguments with a ``None``
            or bool default that are not given here are specialised to their default
            (:func:`specialised_defaults`).
        num_inputs: how many positional arguments the model will be called with (the example
            inputs; :func:`fxexpand.compile` and :func:`fxexpand.contract` pass it): those are never
            specialised. None: only the parameters without a default are inputs.
        inline_regions: trace *through* :class:`~fxexpand.provenance.ExpandedRegion` containers
            (contraction does this); by default each region stays one opaque call, so the traced
            module keeps the region objects and their provenance.
        lazy: return torch.fx's lazy GraphModule, whose Python code is generated when it is first
            needed (a call, ``.code``) instead of at once: for a caller that rewrites the graph
            before running it (:func:`fxexpand.contract`); ``recompile()`` then only marks it.
        drop_identities: give ``nn.Identity`` modules and dropout modules in eval mode no node (their
            output is their input): what :class:`~fxexpand.passes.RemoveIdentity` would remove
            anyway, never traced (``contract(target="deploy")``).

    :class:`~fxexpand.modules.DecayActivation` and :class:`~fxexpand.core.DynamicLayer` are always
    kept as single calls. When ``model`` is
    itself a GraphModule, its ``call_module`` calls stay single calls (they were leaves when it was
    traced), except that ``inline_regions=True`` traces through everything traceable.

    Raises:
        TraceError: if torch.fx cannot trace the model; the message names the module and the line.
    """
    return trace_with_calls(model, leaf_modules=leaf_modules, concrete_args=concrete_args, num_inputs=num_inputs,
                            inline_regions=inline_regions, lazy=lazy, drop_identities=drop_identities)[0]


ModuleCall = tuple  # (qualified name, module, first input node, output node, first node index, end index)


def trace_with_calls(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    num_inputs: int | None = None,
    inline_regions: bool = False,
    lazy: bool = False,
    drop_identities: bool = False,
) -> tuple[fx.GraphModule, list[ModuleCall]]:
    """:func:`trace`, also returning every module call seen while tracing, in the order the calls
    returned: ``(qualified name, module, input node, output node, start, end)`` where the call
    created the graph's nodes ``start .. end-1`` (positions in ``gm.graph.nodes``). The input node is
    None unless the call's only traced argument is its first one."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxexpand.trace expects a torch.nn.Module, got {type(model).__name__}")
    leaf_modules = tuple(leaf_modules)
    bad = [x for x in leaf_modules if not (isinstance(x, str) or (isinstance(x, type) and issubclass(x, nn.Module)))]
    if bad:
        raise TypeError(f"leaf_modules must be nn.Module subclasses or qualified names, got {bad!r}")
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type)) + (DecayActivation, GradientScale, DynamicLayer) + _mode_dependent_types()
    if not inline_regions:
        leaf_types += (ExpandedRegion,)
    leaf_names = frozenset(x for x in leaf_modules if isinstance(x, str))
    if isinstance(model, fx.GraphModule) and not inline_regions:
        leaf_names |= {str(n.target) for n in model.graph.nodes if n.op == "call_module"}
    tracer = _FxExpandTracer(leaf_types, leaf_names)
    tracer.drop_identities = drop_identities
    if num_inputs is not None and not (isinstance(num_inputs, int) and num_inputs >= 0):
        raise TypeError(f"num_inputs must be an integer >= 0 or None, got {num_inputs!r}")
    defaults = specialised_defaults(model, concrete_args=concrete_args, num_inputs=num_inputs)
    if defaults:
        concrete_args = {**defaults, **(concrete_args or {})}
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        where = ""
        if tracer.failed_module is not None:
            path, cls = tracer.failed_module
            where = f" inside module '{path or '<root>'}' ({cls})"
        frame = _user_frame(e)
        line = ""
        if frame is not None:
            line = f" at {frame.filename}:{frame.lineno}"
            if frame.line:
                line += f" (`{frame.line.strip()}`)"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{where}{line}: "
            f"{type(e).__name__}: {e}. "
            "If that module has data-dependent control flow or other untraceable Python, pass "
            "leaf_modules=[<its class or qualified name>] to keep it as an opaque call; if a "
            "forward() argument selects the code path, fix it with concrete_args={name: value}."
        ) from e
    if concrete_args:
        _finish_specialised(graph, _forward_parameters(model), set(defaults))
    name = type(model).__name__
    gm = ((_LazyGraphModule if lazy else None) or fx.GraphModule)(tracer.root, graph, name)
    # a cache (gm.meta is not pickled): regions traced through, for scope="expanded" passes
    set_traced_regions(gm, {name: (r.original_type, dict(r.original_config)) for name, r in find_regions(model).items()}
                       if inline_regions else {})
    return gm, tracer.module_calls
