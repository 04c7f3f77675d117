"""RestoreOriginal: put each contracted expanded region back as its original layer.

Pattern: every node of an expanded region ``R`` (from the trace's region list) has been folded and
fused into a single conv / linear op.

Rewrite: build the original layer from the type and constructor arguments the region recorded,
copy the fused weight (and bias), install it at ``R`` — the original qualified name — and point the
node at it, so the contracted model's state_dict keys and shapes are the original model's.

A fused bias where the original layer has none (it comes from BatchNorms inside the region) is
absorbed into the following BatchNorm: ``BN(y + b) = BN'(y)`` with ``running_mean' = running_mean − b``.
That BatchNorm is a module, or an inference-mode ``F.batch_norm`` whose running mean is an attribute
read nowhere else (a BatchNorm subclass traced through in eval mode, such as timm's
``BatchNormAct2d``: its ``running_mean`` buffer absorbs the bias). If no such BatchNorm follows,
contraction fails with :class:`~fxexpand.core.ContractionError`.

Preconditions (all regions are checked before any is rewritten, so a refusal leaves the graph
unchanged): each region contracted to a single conv/linear whose weight shape, stride, padding,
dilation and groups are the original layer's, and a bias the original layer cannot hold has a
BatchNorm to go to.
Run it after RemoveIdentity / FoldBatchNorm / FuseLinear have reached a fixed point with
``scope="expanded"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..core import (
    BN_FUNCS,
    ContractionError,
    Pass,
    PassResult,
    as_int_tuple,
    attr_use_counts,
    bias_sink,
    bn_of,
    build_layer,
    delete_unused_submodules,
    get_attr,
    get_module,
    linear_op_of,
    module_call_counts,
    node_label,
    norm_padding,
    region_of,
    register_pass,
    replace_tensor,
    set_module,
    traced_regions,
    value_users,
)

__all__ = ["RestoreOriginal"]


@register_pass("restore_original")
@dataclass(kw_only=True)
class RestoreOriginal(Pass):
    """Replace each fully contracted expanded region by its original layer type at its original name."""

    after = ("remove_identity", "fold_batchnorm", "fuse_linear")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        regions = traced_regions(gm)
        notes = []
        if not regions:
            return PassResult(gm, False, notes)
        members: dict[str, list[fx.Node]] = {r: [] for r in regions}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            r = region_of(gm, node)
            if r is not None and r in members:
                members[r].append(node)
        calls = module_call_counts(gm)
        # 1. check every region (nothing changes yet): a refused region leaves the graph as it was
        plan = []
        for rname, (type_name, config) in regions.items():
            nodes = members[rname]
            op = linear_op_of(gm, nodes[0])[0] if len(nodes) == 1 else None
            if op is None:
                left = ", ".join(f"{n.op} {node_label(n)}" for n in nodes) or "nothing"
                raise ContractionError(
                    f"expanded region {rname} did not contract to a single layer; it still contains: {left}. "
                    "Every activation inside it must be a DecayActivation at alpha=1 (run DecayActivations and "
                    "a decay schedule to the end) and its BatchNorms must have running statistics."
                )
            node = nodes[0]
            layer = build_layer(type_name, config).to(device=op.weight.device, dtype=op.weight.dtype)
            self._check_geometry(rname, layer, op)
            absorb = layer.bias is None and op.bias is not None and bool(op.bias.detach().abs().max() > 0)
            sink = self._bias_sink(gm, rname, node, calls) if absorb else None
            plan.append((rname, type_name, node, layer, op, sink))
        # 2. rewrite
        for rname, type_name, node, layer, op, sink in plan:
            with torch.no_grad():
                layer.weight.copy_(op.weight.detach())
                if layer.bias is not None:
                    layer.bias.copy_(op.bias.detach() if op.bias is not None else torch.zeros_like(layer.bias))
                if sink is not None:  # BN(y + b) = BN'(y) with running_mean' = running_mean - b
                    mean = get_attr(gm, sink)  # a new tensor: the user's BatchNorm is never written
                    replace_tensor(gm, sink, mean - op.bias.detach().to(mean.dtype))
                    notes.append(self.note("absorbed", f"{rname} -> {sink.removesuffix('.running_mean')}",
                                           "bias absorbed into the BatchNorm's running_mean"))
            set_module(gm, rname, layer)
            node.target = rname
            notes.append(self.note("restored", rname, f"{type_name} from 1 contracted op"))
        delete_unused_submodules(gm)
        return PassResult(gm, True, notes)

    def _check_geometry(self, rname, layer, op) -> None:
        want_w = tuple(layer.weight.shape)
        if tuple(op.weight.shape) != want_w:
            raise ContractionError(f"region {rname} contracted to a weight of shape {tuple(op.weight.shape)}, "
                                   f"but the original layer's is {want_w}")
        if op.kind == "conv":
            nd = op.nd
            k, d = tuple(layer.kernel_size), as_int_tuple(layer.dilation, nd)
            # dilation is irrelevant along a kernel-1 dimension (the fused op normalises it to 1)
            geom = (as_int_tuple(layer.stride, nd), norm_padding(layer.padding, k, d),
                    tuple(dd if kk > 1 else 1 for dd, kk in zip(d, k)), layer.groups)
            got = (op.stride, op.padding, tuple(dd if kk > 1 else 1 for dd, kk in zip(op.dilation, k)), op.groups)
            if geom != got:
                raise ContractionError(f"region {rname} contracted to stride/padding/dilation/groups {got}, "
                                       f"but the original layer has {geom}")

    @staticmethod
    def _bias_sink(gm, rname, node, calls) -> str:
        """The running mean (its attribute path) of the BatchNorm that absorbs the contracted region's
        bias (the original layer has none)."""
        sink, why = bias_sink(gm, node, calls)
        bn = get_module(gm, sink) if sink is not None else None
        if bn is None:
            mean, functional_why = RestoreOriginal._functional_sink(gm, node)
            if mean is not None:
                return mean
            why = functional_why or why
        elif bn.training:
            why = f"the BatchNorm {sink} is in training mode"
        elif region_of(gm, value_users(node)[0]) is not None:
            why = f"the BatchNorm {sink} lies in another expanded region"
        if bn is None or why:
            raise ContractionError(
                f"the contracted region {rname} has a bias but the original layer was built with bias=False, and "
                f"no BatchNorm can absorb it ({why}); expansion passes do not expand such layers, so this model was "
                "expanded by other means or its graph changed after expansion"
            )
        return f"{sink}.running_mean"

    @staticmethod
    def _functional_sink(gm, node) -> tuple[str | None, str]:
        """``(running mean's attribute path, "")`` when ``node``'s one value user is an inference-mode
        functional batch norm of ``node`` whose running mean is an attribute read only there (a
        BatchNorm subclass traced through in eval mode); ``(None, reason)`` otherwise."""
        users = value_users(node)  # shape reads (timm's `_assert(x.ndim == 4)`) are not uses
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in BN_FUNCS:
            return None, ""
        user = users[0]
        if not user.args or user.args[0] is not node:
            return None, "the functional batch norm does not normalise its output"
        bn, why = bn_of(gm, user)
        if bn is None:
            return None, f"the functional batch norm after it cannot absorb a bias: {why}"
        means = [a for a in user.all_input_nodes if a.op == "get_attr" and get_attr(gm, a.target) is bn.running_mean]
        if len(means) != 1:
            return None, "the functional batch norm's running mean is not an attribute"
        if attr_use_counts(gm)[means[0].target] != 1:
            return None, f"the running mean {means[0].target} is read elsewhere (rule 7)"
        if region_of(gm, user) is not None:
            return None, "the functional batch norm lies in another expanded region"
        return str(means[0].target), ""
