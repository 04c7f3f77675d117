"""Op tables and readers: recognise convs, linears, batch norms and adds in both graph forms.

DESIGN rule 8: every op is matched as ``call_module`` (``nn.Conv2d``, ``nn.BatchNorm2d``, ...) *and*
as ``call_function`` (``F.conv2d``, ``F.batch_norm``, ``F.linear``, ``operator.add``, ...).
:func:`linear_op_of` and :func:`bn_of` read either form into one description (:class:`LinearOp`,
:class:`BNParams`) that the algebra (:mod:`fxexpand.core.algebra`) works on.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .dynamic import norm_act_parts
from .fx import fresh_name, get_attr, get_module, shallow_copy_module, value_users

__all__ = [
    "CONV_MODULES", "CONV_FUNCS", "CONV_TYPES", "LINEAR_FUNCS", "BN_MODULES", "BN_FUNCS", "BN_TYPES",
    "ADD_FUNCS", "node_arg", "as_int_tuple", "norm_padding", "is_add", "bias_sink", "site_name",
    "LinearOp", "linear_op_of", "linear_param_names", "shared_use", "BNParams", "bn_of", "is_sub",
    "scale_of", "constant_of",
]


CONV_MODULES: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONV_FUNCS: dict[Any, int] = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
}
LINEAR_FUNCS = {F.linear, torch.nn.functional.linear}
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BN_FUNCS = {F.batch_norm, torch.batch_norm}
ADD_FUNCS = {operator.add, operator.iadd, torch.add}
SUB_FUNCS = {operator.sub, operator.isub, torch.sub}
MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
DIV_FUNCS = {operator.truediv, operator.itruediv, torch.div}
#: shape-only methods a constant may go through on its way to a scale (``gamma.view(1, -1, 1, 1)``)
_VIEW_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten"}
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def node_arg(node: fx.Node, idx: int, name: str, default: Any = None) -> Any:
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(name, default)


def as_int_tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    if len(v) == 1 and n > 1:
        return v * n
    return v


def is_add(node: fx.Node) -> bool:
    """``a + b`` in any traced form with both operands nodes and no ``alpha``."""
    if node.op == "call_function" and node.target in ADD_FUNCS:
        pass
    elif node.op == "call_method" and node.target in ("add", "add_"):
        pass
    else:
        return False
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    alpha = node.kwargs.get("alpha", 1)
    return alpha == 1 and set(node.kwargs) <= {"alpha"}


def is_sub(node: fx.Node) -> bool:
    """``a - b`` in any traced form with both operands nodes and no ``alpha``."""
    if node.op == "call_function" and node.target in SUB_FUNCS:
        pass
    elif node.op == "call_method" and node.target in ("sub", "sub_"):
        pass
    else:
        return False
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    return node.kwargs.get("alpha", 1) == 1 and set(node.kwargs) <= {"alpha"}


def constant_of(gm: fx.GraphModule, node: Any) -> Any:
    """The value of ``node`` if it is a constant: a Python number, a ``get_attr`` tensor, or such a
    tensor through shape-only methods (``gamma.view(1, -1, 1, 1)``, ``.reshape``, ``.unsqueeze``);
    None otherwise."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        v = get_attr(gm, node.target)
        return v if isinstance(v, torch.Tensor) else None
    if node.op == "call_method" and node.target in _VIEW_METHODS and node.args:
        base = constant_of(gm, node.args[0])
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if isinstance(base, torch.Tensor) and not any(isinstance(a, fx.Node) for a in rest):
            return getattr(base, node.target)(*node.args[1:], **node.kwargs)
    return None


def scale_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``(y, s)`` if ``node`` is ``y * s``, ``s * y`` or ``y / s`` with ``s`` a constant
    (:func:`constant_of`: a number, or a tensor such as a layer-scale ``gamma``) and ``y`` a graph
    value; ``s`` is returned as the multiplier (``1 / s`` for a division). None otherwise. Whether
    ``s`` broadcasts as a per-channel scale is decided by :func:`fxexpand.core.scale_as_op`."""
    if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    name = node.target if node.op == "call_method" else None
    mul = node.target in MUL_FUNCS or name in ("mul", "mul_")
    div = node.target in DIV_FUNCS or name in ("div", "div_")
    if not (mul or div):
        return None
    pairs = [(a, b)] + ([(b, a)] if mul and node.op == "call_function" else [])
    for y, s in pairs:
        if not isinstance(y, fx.Node) or (isinstance(s, fx.Node) and s is y):
            continue
        v = constant_of(gm, s)
        if v is None:
            continue
        if div:
            if isinstance(v, float):
                return (y, 1.0 / v) if v != 0 else None
            return y, v.detach().double().reciprocal()
        return y, v
    return None


@dataclass
class LinearOp:
    """A conv or linear op with constant parameters, in a form the algebra can work on.

    For ``kind == "conv"`` the weight is ``[C_out, C_in / groups, *kernel]`` and ``padding`` is
    symmetric per spatial dim (asymmetric "same" padding is not representable and is refused).
    """

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2 if self.kind == "conv" else 0

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * (self.groups if self.kind == "conv" else 1)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def preserves_shape(self) -> bool:
        """Whether the output has the input's shape for *every* input: as many outputs as inputs
        and, for a conv, stride 1 with ``2·padding == dilation·(kernel − 1)`` per dim."""
        if self.in_channels != self.out_channels:
            return False
        if self.kind == "linear":
            return True
        return all(s == 1 and 2 * p == d * (k - 1)
                   for s, p, d, k in zip(self.stride, self.padding, self.dilation, self.kernel))

    def macs(self, output_shape: tuple[int, ...] | None) -> int | None:
        """Multiply-accumulates for one call producing ``output_shape``."""
        if output_shape is None:
            return None
        n = math.prod(output_shape)
        if self.kind == "conv":
            return n * self.weight.shape[1] * math.prod(self.kernel)
        return n * self.weight.shape[1]

    def to_module(self) -> nn.Module:
        """A fresh ``nn.ConvNd`` / ``nn.Linear`` holding these parameters."""
        w = self.weight.detach()
        b = None if self.bias is None else self.bias.detach()
        m = _module_like(self, b is not None, w.dtype)
        m._parameters["weight"] = nn.Parameter(w.clone().contiguous())
        m._parameters["bias"] = nn.Parameter(b.clone().contiguous()) if b is not None else None
        return m


_NO_INIT: dict[type, type] = {}
_TEMPLATES: dict[tuple, nn.Module] = {}


def _module_like(op: LinearOp, bias: bool, dtype: torch.dtype) -> nn.Module:
    """A new ``nn.ConvNd`` / ``nn.Linear`` of ``op``'s geometry whose parameters the caller sets.

    The first module of each geometry is built on the meta device without initialisation (even on
    the meta device, kaiming_uniform_ runs torch's Python decompositions, ~20 % of contraction) and
    kept as a template; every module is a shallow copy of it with its own registries (dicts and
    sets: parameters, buffers, children, hooks), which is a fifth of a constructor call. The module
    is a plain nn.ConvNd / nn.Linear; its parameters are the meta template's until set."""
    if op.kind == "linear":
        key: tuple = (nn.Linear, op.weight.shape[1], op.weight.shape[0], bias, dtype)
    else:
        key = (CONV_TYPES[op.nd], op.in_channels, op.out_channels, op.kernel, op.stride, op.padding, op.dilation,
               op.groups, bias, dtype)
    template = _TEMPLATES.get(key)
    if template is None:
        cls = key[0]
        if op.kind == "linear":
            template = _without_init(cls)(key[1], key[2], bias=bias, device="meta", dtype=dtype)
        else:
            template = _without_init(cls)(op.in_channels, op.out_channels, op.kernel, stride=op.stride,
                                          padding=op.padding, dilation=op.dilation, groups=op.groups, bias=bias,
                                          device="meta", dtype=dtype)
        template.__class__ = cls
        if len(_TEMPLATES) > 512:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
    return shallow_copy_module(template)


def _without_init(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose constructor skips ``reset_parameters`` (its every other step, and
    so every attribute of the module, is ``cls``'s own); the caller sets ``__class__`` back to ``cls``."""
    sub = _NO_INIT.get(cls)
    if sub is None:
        sub = _NO_INIT[cls] = type(f"_{cls.__name__}WithoutInit", (cls,), {"reset_parameters": lambda self: None})
    return sub


def norm_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    nd = len(kernel)
    if padding == "valid":
        return (0,) * nd
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return tuple(out)
    return as_int_tuple(padding, nd)


def linear_op_of(gm: fx.GraphModule, node: fx.Node) -> tuple[LinearOp | None, str]:
    """Read ``node`` as a :class:`LinearOp`; on failure return ``(None, reason)``.

    A reason is returned only for nodes that *are* convs/linears but cannot be handled
    (an empty reason means "not a linear op at all").
    """
    if node.op == "call_module":
        mod = get_module(gm, node.target)
        if type(mod) in CONV_MODULES:
            nd = CONV_MODULES[type(mod)]
            if mod.padding_mode != "zeros":
                return None, f"padding_mode={mod.padding_mode!r} (only zero padding composes)"
            pad = norm_padding(mod.padding, tuple(mod.kernel_size), tuple(mod.dilation))
            if pad is None:
                return None, "asymmetric 'same' padding (even kernel)"
            return LinearOp("conv", mod.weight, mod.bias, as_int_tuple(mod.stride, nd), pad,
                            as_int_tuple(mod.dilation, nd), mod.groups), ""
        if type(mod) is nn.Linear:
            return LinearOp("linear", mod.weight, mod.bias), ""
        return None, ""
    if node.op != "call_function":
        return None, ""
    if node.target in CONV_FUNCS:
        nd = CONV_FUNCS[node.target]
        w, b = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
        params = [node_arg(node, 3, "stride", 1), node_arg(node, 4, "padding", 0), node_arg(node, 5, "dilation", 1),
                  node_arg(node, 6, "groups", 1)]
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or not (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
            return None, "weight/bias are not constant attributes"
        if any(isinstance(p, fx.Node) for p in params):
            return None, "stride/padding/dilation/groups are not constants"
        weight = get_attr(gm, w.target)
        bias = None if b is None else get_attr(gm, b.target)
        stride, dilation = as_int_tuple(params[0], nd), as_int_tuple(params[2], nd)
        pad = norm_padding(params[1], tuple(weight.shape[2:]), dilation)
        if pad is None:
            return None, "asymmetric 'same' padding (even kernel)"
        return LinearOp("conv", weight, bias, stride, pad, dilation, int(params[3])), ""
    if node.target in LINEAR_FUNCS:
        w, b = node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or not (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
            return None, "weight/bias are not constant attributes"
        return LinearOp("linear", get_attr(gm, w.target), None if b is None else get_attr(gm, b.target)), ""
    return None, ""


def linear_param_names(node: fx.Node) -> tuple[str, ...]:
    """The attribute names a functional linear op reads (to detect shared parameters)."""
    if node.op != "call_function":
        return ()
    out = []
    for idx, name in ((1, "weight"), (2, "bias")):
        a = node_arg(node, idx, name)
        if isinstance(a, fx.Node) and a.op == "get_attr":
            out.append(a.target)
    return tuple(out)


@dataclass
class BNParams:
    """An inference-mode batch norm ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    ``tail``: modules the batch norm's own module applies after it, in order (a BatchNorm +
    activation leaf such as timm's ``BatchNormAct2d``: its ``drop`` and ``act`` unless they are
    ``nn.Identity``). A rewrite that replaces the batch norm must call them after its result; one
    that cannot (merging the batch norm as a linear branch) must refuse a non-empty tail."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    tail: tuple[nn.Module, ...] = ()


def bn_of(gm: fx.GraphModule, node: fx.Node) -> tuple[BNParams | None, str]:
    """Read an inference-mode batch norm (module or ``F.batch_norm``); ``(None, reason)`` otherwise."""
    if node.op == "call_module":
        mod = get_module(gm, node.target)
        if not isinstance(mod, BN_MODULES):
            return None, ""
        if mod.training:
            return None, "batch norm is in training mode (call .eval() first)"
        if not mod.track_running_stats or mod.running_mean is None:
            return None, "batch norm has no running statistics (track_running_stats=False)"
        parts = norm_act_parts(mod)
        tail = tuple(m for m in parts if not isinstance(m, nn.Identity)) if parts is not None else ()
        return BNParams(mod.running_mean, mod.running_var, mod.weight, mod.bias, float(mod.eps), tail), ""
    if node.op == "call_function" and node.target in BN_FUNCS:
        if node.target is torch.batch_norm:
            names = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"]
        else:
            names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        vals = {n: node_arg(node, i, n, defaults.get(n)) for i, n in enumerate(names)}
        if vals["training"] is not False:
            return None, "F.batch_norm is called with training=True (or a non-constant flag)"
        if not isinstance(vals["eps"], (int, float)):
            return None, "eps is not a constant"
        tensors = {}
        for k in ("running_mean", "running_var", "weight", "bias"):
            v = vals[k]
            if v is None:
                if k.startswith("running"):
                    return None, "batch norm has no running statistics"
                tensors[k] = None
            elif isinstance(v, fx.Node) and v.op == "get_attr":
                tensors[k] = get_attr(gm, v.target)
            else:
                return None, f"{k} is not a constant attribute"
        return BNParams(tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"],
                        float(vals["eps"])), ""
    return None, ""


def shared_use(node: fx.Node, calls: Counter, uses: Counter) -> str:
    """DESIGN rule 7: why ``node``'s module or parameters are used at another site ("" if private).

    ``calls`` is :func:`module_call_counts` and ``uses`` :func:`attr_use_counts` of the graph; a
    module called from several places (or a weight read by several functional ops) must never be
    rewritten in place for one site.
    """
    if node.op == "call_module" and calls[node.target] > 1:
        return f"module {node.target} is called from {calls[node.target]} places (rule 7)"
    if node.op == "call_function":
        shared = [a for a in linear_param_names(node) if uses[a] > 1]
        if shared:
            return f"parameters {shared} are shared with other ops (rule 7)"
    return ""


def bias_sink(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> tuple[str | None, str]:
    """Where a bias can go that contraction creates for a layer built with ``bias=False``.

    Folding the BatchNorms inside an expanded region gives the contracted layer a bias; if the
    original layer has none, the bias is absorbed into the BatchNorm that follows it
    (``BN(y + b) = BN'(y)`` with ``running_mean' = running_mean − b``). That needs ``node``'s output
    to feed only a BatchNorm *module* with running statistics, called from this one place.
    Returns ``(that BatchNorm's qualified name, "")`` or ``(None, reason)``.
    """
    users = value_users(node)  # a shape read does not keep the bias out of the BatchNorm
    if len(users) != 1:
        return None, f"its output has {len(users)} users, not one BatchNorm"
    user = users[0]
    mod = get_module(gm, user.target) if user.op == "call_module" else None
    if not isinstance(mod, BN_MODULES):
        return None, "no BatchNorm module follows it"
    if not mod.track_running_stats or mod.running_mean is None:
        return None, f"the BatchNorm {user.target} has no running statistics"
    if calls[user.target] > 1:
        return None, f"the BatchNorm {user.target} is called from {calls[user.target]} places (rule 7)"
    return str(user.target), ""


def site_name(gm: fx.GraphModule, node: fx.Node, suffix: str) -> str:
    """Where a rewrite installs the module that replaces the op at ``node``: a module call's own
    name, or for a functional op a fresh name after its weight's owner (``fc.weight`` ->
    ``fc_<suffix>``)."""
    if node.op == "call_module":
        return str(node.target)
    names = linear_param_names(node)
    base = names[0].rsplit(".", 1)[0] if names and "." in names[0] else (names[0] if names else "op")
    return fresh_name(gm, f"{base}_{suffix}")
