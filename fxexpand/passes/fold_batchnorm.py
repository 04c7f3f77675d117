"""FoldBatchNorm: fold an inference-mode batch norm into the conv / linear before it.

Pattern: ``bn(conv(x))`` or ``bn(linear(x))``, each op as ``call_module`` or ``call_function``
(``F.convNd`` / ``F.linear`` / ``F.batch_norm`` with constant parameters), plus
``nn.ConvTransposeNd`` (groups=1) modules.

Math (per output channel c): ``γ_c (W x + b - μ_c) / sqrt(σ²_c + ε) + β_c`` is ``W' x + b'`` with
``W' = W·γ/√(σ²+ε)``, ``b' = (b - μ)·γ/√(σ²+ε) + β`` — computed by
:func:`torch.nn.utils.fusion.fuse_conv_bn_weights` / ``fuse_linear_bn_weights``.

Preconditions (otherwise the site is skipped and the reason recorded): the BN has running
statistics and is in eval mode (or ``F.batch_norm(training=False)``); the conv's output has no user
but the BN, not counting metadata reads (``y.shape``, ``y.dim()``, ``y.ndim``, ``len(y)``, ...,
:func:`~fxexpand.core.value_users`: timm's ``BatchNormAct2d`` asserts its input's rank), which then
read the folded op's output, of the same shape. A BatchNorm + activation module (timm's
``BatchNormAct2d``, a leaf: :attr:`~fxexpand.core.BNParams.tail`) folds the same way, and its
``drop`` and ``act`` are called on the folded op's output. The conv module (or its functional weights) is used at no other site (rule 7); a
linear feeding a BatchNorm1d produces a 2-D output (BN1d normalises dim 1, linear acts on the
last dim).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..core import (
    LinearOp,
    PassResult,
    ScopedPass,
    attr_use_counts,
    bn_of,
    delete_unused_submodules,
    erase_if_dead,
    fresh_name,
    get_module,
    in_scope,
    linear_op_of,
    module_call_counts,
    node_input,
    node_label,
    out_shape,
    register_pass,
    replace_nodes_with_module,
    set_module,
    shared_use,
    site_name,
    value_users,
)

__all__ = ["FoldBatchNorm"]

_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register_pass("fold_batchnorm")
@dataclass(kw_only=True)
class FoldBatchNorm(ScopedPass):
    """Fold eval-mode BatchNorm into the preceding conv / linear / conv-transpose.

    Args:
        scope: ``"all"`` folds everywhere; ``"expanded"`` only inside expanded regions.
    """

    needs_code = False  # edits the graph only: the manager recompiles once after a run of such passes

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        notes = []
        modified = False
        # counted once per call: folding only removes uses, so stale counts are conservative
        calls, uses = module_call_counts(gm), attr_use_counts(gm)
        live = module_call_counts(gm)  # kept current by replace_nodes_with_module
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:
                continue
            bn, reason = bn_of(gm, node)
            if bn is None:
                if reason and in_scope(gm, [node], self.scope)[0]:
                    notes.append(self.note("skipped", node_label(node), reason))
                continue
            prev = node_input(node)
            if prev is None:
                continue
            ok, _ = in_scope(gm, [prev, node], self.scope)
            if not ok:
                continue
            where = f"{node_label(prev)} <- {node_label(node)}"
            skip = self._check(gm, prev, calls, uses)
            if skip:
                if skip != "-":
                    notes.append(self.note("skipped", where, skip))
                continue
            new_module, name = self._fold(gm, prev, bn)
            if new_module is None:
                notes.append(self.note("skipped", where, name))
                continue
            if prev.op == "call_module" and name == prev.target and live[name] == 1:
                # the conv's own node calls the folded module in its place (one node less to create;
                # a BatchNorm keeps the shape, so the batch norm's users and shape reads read it)
                set_module(gm, name, new_module)
                node.replace_all_uses_with(prev)
                if node.op == "call_module":
                    live[node.target] -= 1
                erase_if_dead(gm, [node])
                new = prev
            else:  # a BatchNorm keeps the shape: the conv's shape reads now read the folded output
                new = replace_nodes_with_module(gm, [prev, node], new_module, node_input(prev), name,
                                                call_counts=live, same_shape=[prev])
            for mod in bn.tail:  # a BatchNorm + activation module: its drop / act follow the folded op
                new = self._call_after(gm, new, mod, f"{node_label(node)}_{type(mod).__name__.lower()}", live)
            notes.append(self.note("folded", where))
            modified = True
        if modified:
            delete_unused_submodules(gm)
        return PassResult(gm, modified, notes)

    @staticmethod
    def _call_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base: str, live) -> fx.Node:
        """Call ``module`` (elementwise: the shape is kept) on ``node``'s output, for all its users."""
        name = fresh_name(gm, base)
        set_module(gm, name, module)
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
        call.meta = dict(node.meta)
        live[name] += 1
        return call

    @staticmethod
    def _check(gm: fx.GraphModule, prev: fx.Node, calls, uses) -> str:
        is_transpose = prev.op == "call_module" and isinstance(get_module(gm, prev.target), _TRANSPOSE)
        op, reason = (None, "") if is_transpose else linear_op_of(gm, prev)
        if op is None and not is_transpose:
            return reason or "-"  # "-": the BN does not follow a conv/linear; nothing to report
        if len(value_users(prev)) != 1:
            return f"the output of {node_label(prev)} has other users besides the batch norm"
        shared = shared_use(prev, calls, uses)
        if shared:
            return shared
        if node_input(prev) is None:
            return "the conv's input is not a graph value"
        if op is not None and op.kind == "linear":
            shape = out_shape(prev)
            if shape is None or len(shape) != 2:
                return "batch norm after a linear whose output is not 2-D normalises a different dimension"
        return ""

    def _fold(self, gm: fx.GraphModule, prev: fx.Node, bn) -> tuple[nn.Module | None, str]:
        mod = get_module(gm, prev.target) if prev.op == "call_module" else None
        name = site_name(gm, prev, "folded")
        weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        if isinstance(mod, _TRANSPOSE):
            if mod.groups != 1:
                return None, "grouped ConvTranspose is not folded"
            if mod.out_channels != bn.running_mean.numel():
                return None, "channel count mismatch"
            new = copy.deepcopy(mod)
            w, b = fuse_conv_bn_weights(mod.weight, mod.bias, bn.running_mean, bn.running_var, bn.eps,
                                        weight, bias, transpose=True)
            new.weight, new.bias = w, b
            return new, name
        op, _ = linear_op_of(gm, prev)
        assert op is not None
        if op.out_channels != bn.running_mean.numel():
            return None, "channel count mismatch between the op and the batch norm"
        with torch.no_grad():
            if op.kind == "conv":
                w, b = fuse_conv_bn_weights(op.weight, op.bias, bn.running_mean, bn.running_var, bn.eps,
                                            weight, bias)
            else:
                w, b = fuse_linear_bn_weights(op.weight, op.bias, bn.running_mean, bn.running_var, bn.eps,
                                              weight, bias)
        folded = LinearOp(op.kind, w.detach(), b.detach(), op.stride, op.padding, op.dilation, op.groups)
        return folded.to_module(), name

