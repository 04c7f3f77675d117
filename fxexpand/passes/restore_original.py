"""RestoreOriginal: put each contracted expanded region back as its original layer.

Pattern: every node of an expanded region ``R`` (from the trace's region list) has been folded and
fused into a single conv / linear op.

Rewrite: build the original layer from the type and constructor arguments the region recorded,
copy the fused weight (and bias), install it at ``R`` — the original qualified name — and point the
node at it, so the contracted model's state_dict keys and shapes are the original model's.

A fused bias where the original layer has none (it comes from BatchNorms inside the region) is
absorbed into the following BatchNorm: ``BN(y + b) = BN'(y)`` with ``running_mean' = running_mean − b``.
If no such BatchNorm follows, contraction fails with :class:`~fxexpand.core.ContractionError`.

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
    ContractionError,
    Pass,
    PassResult,
    as_int_tuple,
    bias_sink,
    build_layer,
    get_module,
    linear_op_of,
    module_call_counts,
    node_label,
    norm_padding,
    region_of,
    register_pass,
    set_module,
    traced_regions,
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
                    bn = get_module(gm, sink)
                    bn.running_mean.sub_(op.bias.detach().to(bn.running_mean.dtype))
                    notes.append(self.note("absorbed", f"{rname} -> {sink}",
                                           "bias absorbed into the BatchNorm's running_mean"))
            set_module(gm, rname, layer)
            node.target = rname
            notes.append(self.note("restored", rname, f"{type_name} from 1 contracted op"))
        gm.delete_all_unused_submodules()
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
        """The BatchNorm that absorbs the contracted region's bias (the original layer has none)."""
        sink, why = bias_sink(gm, node, calls)
        bn = get_module(gm, sink) if sink is not None else None
        if bn is not None and bn.training:
            why = f"the BatchNorm {sink} is in training mode"
        elif bn is not None and region_of(gm, next(iter(node.users))) is not None:
            why = f"the BatchNorm {sink} lies in another expanded region"
        if bn is None or why:
            raise ContractionError(
                f"the contracted region {rname} has a bias but the original layer was built with bias=False, and "
                f"no BatchNorm can absorb it ({why}); expansion passes do not expand such layers, so this model was "
                "expanded by other means or its graph changed after expansion"
            )
        return sink
