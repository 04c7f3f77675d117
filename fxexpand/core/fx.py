"""Graph edits shared by passes: module lookup and installation, fresh names, use counts, node
replacement, shapes and example inputs.

Everything here is rewrite-agnostic. A pass reads an op with :mod:`fxexpand.core.ops`, does its
algebra, and installs the result with :func:`replace_nodes_with_module`.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import copy
import io
from collections import Counter
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import FxExpandError, InputError, PreconditionError, ShapePropagationError
from .provenance import region_of

__all__ = [
    "get_module", "get_attr", "set_module", "fresh_name", "has_module", "module_call_count",
    "module_call_counts", "attr_use_counts", "is_metadata_read", "value_users", "metadata_reads",
    "move_metadata_reads", "node_input", "out_shape", "node_label",
    "in_scope", "erase_if_dead", "replace_nodes_with_module", "delete_unused_submodules", "shallow_copy_module", "as_inputs", "propagate_shapes", "shapes_known", "require_shapes", "unwrap",
]

def get_module(gm: nn.Module, qualname: str) -> nn.Module:
    if not qualname:
        return gm
    mod = gm
    for part in qualname.split("."):
        # a submodule straight from ``_modules`` (nn.Module.__getattr__ reaches it only after a failed
        # normal lookup, which made this walk a visible share of a pass; nn.Module never keeps a
        # name both there and in ``__dict__``); anything else via getattr
        try:
            mod = mod._modules[part]
        except (AttributeError, KeyError, TypeError):
            mod = getattr(mod, part)
    return mod


def get_attr(gm: nn.Module, qualname: str) -> Any:
    *parent, last = qualname.split(".")
    return getattr(get_module(gm, ".".join(parent)), last)


def set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    """Install ``module`` at ``qualname``, creating empty parents as needed."""
    *parent, last = qualname.split(".")
    mod = gm
    for part in parent:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if last in mod._modules:  # replacing a child: the registry entry is all nn.Module.__setattr__ would change
        mod._modules[last] = module
    else:
        setattr(mod, last, module)


def shallow_copy_module(m: nn.Module) -> nn.Module:
    """A copy of module ``m`` that shares its tensors, children and attribute values but has its own
    containers (parameter / buffer / child registries, hook dicts, sets): registering, replacing or
    deleting anything on the copy leaves ``m`` as it is."""
    new = copy.copy(m)
    state = new.__dict__
    for k, v in state.items():
        if type(v) in (dict, set, collections.OrderedDict):
            state[k] = v.copy()
    return new


def replace_tensor(gm: nn.Module, qualname: str, value: torch.Tensor) -> None:
    """Make the parameter or buffer at ``qualname`` ``value`` without changing any module in place:
    each module on the path is replaced by its :func:`shallow_copy_module` (the tensors and the
    other children stay shared). A GraphModule that shares its modules with the model it was traced
    from (:func:`fxexpand.contract` does not copy the user's model) never writes into it."""
    *path, name = qualname.split(".")
    mod = gm
    for part in path:
        clone = shallow_copy_module(mod._modules[part])
        mod._modules[part] = clone
        mod = clone
    if name in mod._parameters:
        mod._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, value.requires_grad)
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        raise AttributeError(f"{qualname} is not a parameter or buffer")


def delete_unused_submodules(gm: fx.GraphModule) -> None:
    """Delete every submodule of ``gm`` that no ``call_module`` / ``get_attr`` node reaches (what
    :meth:`torch.fx.GraphModule.delete_all_unused_submodules` does) in one walk of the module tree:
    torch's walks a called module's subtree per call site and deletes each module by its path,
    a tenth of a contraction's time on a timm model. A called module is kept whole; a module is kept
    if a node's target lies under it; nothing is visited inside a kept module's own children."""
    called: set[str] = set()
    prefixes: set[str] = set()
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr") and isinstance(n.target, str):
            parts = n.target.split(".")
            prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
            called.add(n.target)  # a tensor attribute is no module; a module attribute stays whole
    stack = [("", gm)]
    while stack:
        path, mod = stack.pop()
        for name in list(mod._modules):
            sub = f"{path}{name}"
            if sub in called:
                continue
            if sub in prefixes:
                stack.append((sub + ".", mod._modules[name]))
            else:
                del mod._modules[name]


def fresh_name(gm: nn.Module, base: str) -> str:
    """A qualified name not used yet in ``gm`` (``base``, ``base_1``, ...)."""
    base = base.replace(".", "_") if base else "fused"
    name, i = base, 0
    # ``name`` has no dots, so it can only clash with a direct attribute of ``gm`` (a child module,
    # parameter, buffer or plain attribute): hasattr is the whole check, O(1) instead of a walk over
    # every submodule (which made a rewrite per node quadratic in the graph size)
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def has_module(gm: nn.Module, qualname: str) -> bool:
    """Whether ``qualname`` names a submodule of ``gm`` (``""`` is ``gm`` itself); O(depth)."""
    mod = gm
    for part in qualname.split(".") if qualname else []:
        mod = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if mod is None:
            return False
    return True


def module_call_count(gm: fx.GraphModule, target: str) -> int:
    """How many call_module nodes call ``target`` (indexed lookup where torch.fx has one)."""
    find = getattr(gm.graph, "find_nodes", None)
    if find is not None:
        return len(find(op="call_module", target=target))
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def node_input(node: fx.Node) -> fx.Node | None:
    a = node.args[0] if node.args else node.kwargs.get("input")
    return a if isinstance(a, fx.Node) else None


def out_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(shape) if shape is not None else None


def node_label(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    return node.name


#: tensor attributes that describe a tensor without reading its values (``x.shape``, ``x.ndim``, ...)
METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized",
                            "is_meta"})
#: tensor methods that return metadata only (``x.size()``, ``x.dim()``, ``x.numel()``, ...)
METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device",
                              "is_floating_point", "is_complex"})
#: functions of one tensor that return metadata only (``len(x)`` once ``torch.fx.wrap("len")``, ``torch.numel``)
METADATA_FUNCS = frozenset({builtins.len, torch.numel, torch.is_floating_point, torch.is_complex,
                            torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel})


def is_metadata_read(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` reads only metadata of ``value`` (shape, rank, dtype, device, element
    count), never its values: ``x.shape``, ``x.size()``, ``x.size(1)``, ``x.dim()``, ``x.ndim``,
    ``x.numel()``, ``len(x)``, ``torch.numel(x)``, ``x.dtype``, ``x.device``. An assertion on such a
    read (``torch._assert(x.dim() == 4, ...)``) consumes the read, not ``value``, so it is no use of
    ``value`` either. ``value`` must be the read's first argument and appear nowhere else in it."""
    if not user.args or user.args[0] is not value or any(a is value for a in user.args[1:]):
        return False
    if any(a is value for a in user.kwargs.values()):
        return False
    if user.op == "call_method":
        return user.target in METADATA_METHODS
    if user.op != "call_function":
        return False
    if user.target is builtins.getattr:
        return len(user.args) == 2 and user.args[1] in METADATA_ATTRS
    return user.target in METADATA_FUNCS


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values: every user except metadata reads
    (:func:`is_metadata_read`). This, not ``node.users``, decides whether a rewrite that removes
    ``node`` as a value is allowed ("the conv's output has no user but the batch norm")."""
    return [u for u in node.users if not is_metadata_read(u, node)]


def metadata_reads(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read only its metadata (the complement of :func:`value_users`)."""
    return [u for u in node.users if is_metadata_read(u, node)]


def move_metadata_reads(node: fx.Node, to: fx.Node) -> int:
    """Make the metadata reads of ``node`` read ``to`` instead; returns how many moved. The caller
    guarantees that ``to`` has ``node``'s shape, dtype and device *for every input* (a folded
    BatchNorm's output for its conv's, a fused sum for its branches'), so every read gives the same
    answer and ``node`` can be erased."""
    reads = metadata_reads(node)
    for u in reads:
        u.replace_input_with(node, to)
    return len(reads)


def module_call_counts(gm: fx.GraphModule) -> Counter:
    """How many call_module nodes call each submodule (rule 7: shared modules are not rewritten)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def attr_use_counts(gm: fx.GraphModule) -> Counter:
    """How many get_attr nodes (and their users) read each attribute (metadata reads such as
    ``self.weight.shape`` do not count: they do not depend on the values a rewrite changes)."""
    c: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            c[n.target] += max(1, len(value_users(n)))
    return c


def in_scope(gm: fx.GraphModule, nodes: Iterable[fx.Node], scope: str) -> tuple[bool, str | None]:
    """Whether a group of nodes may be rewritten under ``scope`` ("all" or "expanded").

    Returns ``(ok, region)``: for "expanded" every node must lie in the same expanded region.
    """
    nodes = list(nodes)
    regions = {region_of(gm, n) for n in nodes}
    region = next(iter(regions)) if len(regions) == 1 else None
    if scope == "all":
        return True, region
    return (len(regions) == 1 and region is not None), region


def erase_if_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes (last first) if nothing uses them, then any get_attr left unused."""
    for n in reversed(list(nodes)):
        if n.graph is gm.graph and not n.users:
            inputs = [a for a in n.all_input_nodes if a.op == "get_attr"]
            gm.graph.erase_node(n)
            for a in inputs:
                if not a.users:
                    gm.graph.erase_node(a)


def replace_nodes_with_module(
    gm: fx.GraphModule,
    chain: list[fx.Node],
    module: nn.Module,
    input_node: fx.Node,
    name: str,
    call_counts: Counter | None = None,
    same_shape: Iterable[fx.Node] = (),
) -> fx.Node:
    """Replace ``chain`` (its last node's output) by ``module(input_node)`` installed at ``name``.

    If ``name`` already holds a module called only from ``chain``, it is replaced; otherwise a fresh
    name is chosen. Returns the new node (which inherits the last node's meta).

    ``call_counts``: a live :func:`module_call_counts` of ``gm`` that the caller keeps for a whole
    pass; it is read instead of scanning the graph and updated for this rewrite, so a pass making a
    rewrite per node stays linear in the graph size. Without it the graph is scanned (O(graph)).

    ``same_shape``: nodes of ``chain`` whose output has the new node's shape, dtype and device for
    every input (the caller's guarantee); their metadata reads (``x.shape``, ``x.dim()``, ...) move
    onto the new node (:func:`move_metadata_reads`), so they do not keep the old op alive. The last
    node's reads always move with its other uses.
    """
    chain_targets = Counter(n.target for n in chain if n.op == "call_module")
    exists = has_module(gm, name)  # a path walk, not a walk over every submodule
    calls_now = call_counts.get(name, 0) if call_counts is not None else (module_call_count(gm, name) if exists else 0)
    if exists and calls_now > chain_targets.get(name, 0):
        name = fresh_name(gm, name)
    elif not exists and hasattr(gm, name):
        name = fresh_name(gm, name)
    set_module(gm, name, module)
    last = chain[-1]
    same_shape = [n for n in same_shape if n is not last and metadata_reads(n)]
    # a metadata read sits after the node it reads and may come before ``last``: the new node then
    # goes before the chain's first node (its input is defined before the whole chain)
    where = min(chain) if same_shape else last
    with gm.graph.inserting_before(where):  # (graph.call_module would look the module up again)
        new = gm.graph.create_node("call_module", name, (input_node,))
    new.meta = dict(last.meta)
    first_stack = chain[0].meta.get("nn_module_stack")
    if first_stack is not None and "nn_module_stack" not in new.meta:
        new.meta["nn_module_stack"] = first_stack
    last.replace_all_uses_with(new)
    for n in same_shape:
        move_metadata_reads(n, new)
    erase_if_dead(gm, chain)
    if call_counts is not None:
        for n in chain:
            if n.op == "call_module" and getattr(n, "_erased", n.graph is not gm.graph):
                call_counts[n.target] -= 1
        call_counts[name] += 1
    return new


def as_inputs(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional arguments: a tensor becomes ``(tensor,)``; a tuple or
    a list is the argument list itself. Anything else is an :class:`InputError`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


class _ShapeProp(ShapeProp):
    """torch.fx's ShapeProp (real tensors, no fake mode) recording the same ``TensorMetadata`` with
    what fxexpand reads (shape, dtype, requires_grad, stride) and without ShapeProp's per-node
    memory-format probes and quantisation parameters (a fifth of a contraction's shape pass).
    ``failed``: the node whose run raised (None while every node ran)."""

    failed: fx.Node | None = None

    def fetch_attr(self, target: str) -> Any:
        # torch's walks the path with hasattr + getattr per atom (nn.Module.__getattr__, twice);
        # the module registry first (the same object), a third of the interpreter's overhead
        return get_module(self.module, target)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
            found = False

            def meta(obj: Any) -> Any:
                nonlocal found
                if isinstance(obj, torch.Tensor):
                    found = True
                    return TensorMetadata(obj.shape, obj.dtype, obj.requires_grad, obj.stride(), None, False, {})
                return obj

            tm = map_aggregate(result, meta)
        except Exception:
            if self.failed is None:  # (the innermost node: a failing node is reported once)
                self.failed = n
            raise
        if found:
            n.meta["tensor_meta"] = tm
        # every node ShapeProp ran has its value's type (also a placeholder whose value is None or a
        # flag, such as timm ViT's ``attn_mask=None`` / ``is_causal=False``): see :func:`shapes_known`
        n.meta["type"] = type(result)
        return result


def _message(e: BaseException) -> str:
    """An exception's message without the "While executing %node ..." trailer fx's Interpreter adds."""
    return str(e).split("\n\nWhile executing", 1)[0]


def _node_text(n: fx.Node) -> str:
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target))
    return f"node {n.name!r} ({n.op} {target})"


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Record output shapes on every node (``node.meta['tensor_meta']``) with ShapeProp, in eval mode.

    The modules' training flags are restored afterwards, and no running statistic changes. Every
    node that ran also gets ``node.meta['type']`` (the type of its value: a placeholder whose value
    is a default such as ``None`` or ``False`` has a type but no tensor shape); :func:`shapes_known`
    reads it.

    Errors (never swallowed): :class:`InputError` when the model itself fails on the inputs (the
    message names the node and the exception); :class:`ShapePropagationError` when the model runs
    but shape propagation fails on a node (the error names the node, its op and the exception).
    """
    inputs = as_inputs(example_inputs)
    flags = {m: m.training for m in gm.modules()}
    if any(flags.values()):  # (a walk of every module: skipped when they are all in eval mode already)
        gm.eval()
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            try:
                # one run; what the interpreter may print about a failing node is replaced by the
                # error below, which names the node
                with contextlib.redirect_stderr(io.StringIO()):
                    prop.propagate(*inputs)
            except FxExpandError:
                raise
            except Exception as e:
                where = f" at {_node_text(prop.failed)}" if prop.failed is not None else ""
                try:
                    gm(*inputs)  # a plain run: do the inputs fit the model at all?
                except FxExpandError:
                    raise
                except Exception as plain:
                    shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
                                       else type(t).__name__ for t in inputs)
                    raise InputError(
                        f"the model failed on example inputs of shape/dtype ({shapes}){where}: "
                        f"{type(plain).__name__}: {_message(plain)}. Pass example inputs (or --input-shape) that the model accepts."
                    ) from plain
                raise ShapePropagationError(
                    f"shape propagation failed{where} although the model runs on these example inputs: "
                    f"{type(e).__name__}: {_message(e)}",
                    node=prop.failed.name if prop.failed is not None else None, cause=e,
                ) from e
    finally:
        for m, f in flags.items():
            if m.training != f:
                m.training = f


def shapes_known(gm: fx.GraphModule) -> bool:
    """Whether :func:`propagate_shapes` has run on ``gm``'s inputs: every placeholder has the type of
    its value, and a tensor placeholder its shape. A placeholder whose value is not a tensor (a
    defaulted ``attn_mask=None`` or ``is_causal=False`` of timm's ViTs) has no shape to record and does
    not count as missing."""
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        t = n.meta.get("type")
        if "tensor_meta" not in n.meta and (t is None or issubclass(t, torch.Tensor)):
            return False
    return True


def require_shapes(gm: fx.GraphModule, who: str) -> None:
    """Raise :class:`~fxexpand.core.PreconditionError` naming ``who`` unless :func:`shapes_known`."""
    if not shapes_known(gm):
        missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "tensor_meta" not in n.meta
                   and (n.meta.get("type") is None or issubclass(n.meta["type"], torch.Tensor))]
        raise PreconditionError(
            f"{who} needs tensor shapes and the graph's inputs {missing} have none: pass example_inputs to "
            "fxexpand.compile (or run fxexpand.core.propagate_shapes(gm, example_inputs) first)")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
