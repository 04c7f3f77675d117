"""Helpers shared by fxexpand's tests and benchmarks (and usable in yours): BatchNorm randomisation,
relative error, snapshots that prove a model was not modified, and a Before/Expected graph check."""

from __future__ import annotations

import difflib

import torch
import torch.fx as fx
from torch import nn

from ..core import RESTORABLE_TYPES, DynamicLayer, get_module, layer_config, trace

__all__ = ["randomize_bn", "rel_error", "snapshot", "assert_unchanged", "graph_signature", "assert_graph_matches"]


def require(condition: bool, message: str) -> None:
    """Like ``assert``, but not stripped by ``python -O``."""
    if not condition:
        raise AssertionError(message)


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0, *, generator: torch.Generator | None = None) -> nn.Module:
    """Random BatchNorm running statistics (mean in [-1, 1], variance in [0.5, 2]) and affine
    parameters (γ in [0.5, 1.5], β in [-0.5, 0.5]), in place; returns ``model``.

    Default statistics (mean 0, variance 1, γ 1, β 0) make folding the identity and hide folding
    bugs (DESIGN rule 5). ``generator`` (if given) is used instead of a fresh one seeded by ``seed``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.track_running_stats and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|a|`` in float64 (0 when both are all zero; the absolute error when ``a`` is)."""
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    return err / scale if scale > 0 else err


def snapshot(model: nn.Module) -> tuple[dict, str, dict]:
    """What :func:`assert_unchanged` compares: a copy of the state_dict, the module tree's repr and
    every module's training flag."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model),
            {n: m.training for n, m in model.named_modules()})


def assert_unchanged(model: nn.Module, snap: tuple[dict, str, dict], what: str = "the call") -> None:
    """Raise AssertionError unless ``model`` is exactly as :func:`snapshot` saw it: the same keys,
    bit-identical tensors of the same dtype, the same structure and training flags."""
    state, text, flags = snap
    now = model.state_dict()
    require(set(now) == set(state), f"{what} changed the input model's state_dict keys")
    for k, v in state.items():
        require(now[k].dtype == v.dtype and torch.equal(now[k], v), f"{what} modified the input model's {k}")
    require(repr(model) == text, f"{what} changed the input model's structure")
    require({n: m.training for n, m in model.named_modules()} == flags, f"{what} changed training flags")


def _describe_module(m: nn.Module) -> str:
    if isinstance(m, DynamicLayer):
        shape = tuple(m.weight.shape) if getattr(m, "weight", None) is not None else ()
        return f"{type(m).__name__}[{m.original_cls.__name__}]{shape}"
    if type(m).__name__ in RESTORABLE_TYPES and type(m) in RESTORABLE_TYPES.values():
        cfg = layer_config(m)
        cfg.pop("padding_mode", None)
        return f"{type(m).__name__}({', '.join(f'{k}={v}' for k, v in cfg.items())})"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"{type(m).__name__}({m.num_features})"
    return type(m).__name__


def graph_signature(model: nn.Module | fx.GraphModule) -> list[str]:
    """One line per node of ``model``'s graph (traced if it is not a GraphModule): the op, what it
    calls (a module's type and constructor arguments, a function's or method's name) and which
    earlier lines it reads. Names and constants are left out, so two graphs with the same structure
    have the same signature."""
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    index: dict[fx.Node, int] = {}
    lines = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "call_module":
            what = _describe_module(get_module(gm, node.target))
        elif node.op == "call_function":
            what = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            what = f".{node.target}"
        elif node.op == "get_attr":
            what = "attr"
        else:
            what = ""
        reads = ",".join(str(index[a]) for a in node.all_input_nodes)
        lines.append(f"{i}: {node.op} {what} <- [{reads}]".replace("  ", " "))
    return lines


def assert_graph_matches(actual: nn.Module, expected: nn.Module | list[str]) -> None:
    """Before/Expected structural check: ``actual``'s :func:`graph_signature` must equal
    ``expected``'s (a module, traced if needed, or a signature list). The error shows a diff."""
    got = graph_signature(actual)
    want = expected if isinstance(expected, list) else graph_signature(expected)
    if got != want:
        diff = "\n".join(difflib.unified_diff(want, got, "expected", "actual", lineterm=""))
        raise AssertionError(f"graph does not match the expected structure:\n{diff}")
