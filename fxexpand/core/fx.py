"""Graph edits shared by passes: module lookup and installation, fresh names, use counts, node
replacement, shapes and example inputs.

Everything here is rewrite-agnostic. A pass reads an op with :mod:`fxexpand.core.ops`, does its
algebra, and installs the result with :func:`replace_nodes_with_module`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import FxExpandError, InputError
from .provenance import region_of

__all__ = [
    "get_module", "get_attr", "set_module", "fresh_name", "has_module", "module_call_count",
    "module_call_counts", "attr_use_counts", "node_input", "out_shape", "node_label",
    "in_scope", "erase_if_dead", "replace_nodes_with_module", "as_inputs", "propagate_shapes", "unwrap",
]

def get_module(gm: nn.Module, qualname: str) -> nn.Module:
    mod = gm
    for part in qualname.split(".") if qualname else []:
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
    setattr(mod, last, module)


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


def module_call_counts(gm: fx.GraphModule) -> Counter:
    """How many call_module nodes call each submodule (rule 7: shared modules are not rewritten)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def attr_use_counts(gm: fx.GraphModule) -> Counter:
    """How many get_attr nodes (and their users) read each attribute."""
    c: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            c[n.target] += max(1, len(n.users))
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
) -> fx.Node:
    """Replace ``chain`` (its last node's output) by ``module(input_node)`` installed at ``name``.

    If ``name`` already holds a module called only from ``chain``, it is replaced; otherwise a fresh
    name is chosen. Returns the new node (which inherits the last node's meta).

    ``call_counts``: a live :func:`module_call_counts` of ``gm`` that the caller keeps for a whole
    pass; it is read instead of scanning the graph and updated for this rewrite, so a pass making a
    rewrite per node stays linear in the graph size. Without it the graph is scanned (O(graph)).
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
    with gm.graph.inserting_before(last):
        new = gm.graph.call_module(name, (input_node,))
    new.meta = dict(last.meta)
    first_stack = chain[0].meta.get("nn_module_stack")
    if first_stack is not None and "nn_module_stack" not in new.meta:
        new.meta["nn_module_stack"] = first_stack
    last.replace_all_uses_with(new)
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


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Record output shapes on every node (``node.meta['tensor_meta']``) with ShapeProp, in eval mode.

    The modules' training flags are restored afterwards, and no running statistic changes.
    """
    inputs = as_inputs(example_inputs)
    flags = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            gm(*inputs)  # a plain run first: a clean error message for inputs that do not fit
            ShapeProp(gm).propagate(*inputs)
    except FxExpandError:
        raise
    except Exception as e:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                           for t in inputs)
        raise InputError(
            f"the model failed on example inputs of shape/dtype ({shapes}): {type(e).__name__}: {e}. "
            "Pass example inputs (or --input-shape) that the model accepts."
        ) from e
    finally:
        for m, f in flags.items():
            m.training = f


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
