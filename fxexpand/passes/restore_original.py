"""RestoreOriginalPass: put each contracted expanded region back as its original layer.

Pattern: every node of an expanded region ``R`` (from the trace's region list) has been folded and
fused into a single conv / linear op.

Rewrite: build the original layer from the type and constructor arguments the region recorded,
copy the fused weight (and bias), install it at ``R`` — the original qualified name — and point the
node at it, so the contracted model's state_dict keys and shapes are the original model's.

A fused bias where the original layer has none (it comes from BatchNorms inside the region) is
absorbed into the following BatchNorm: ``BN(y + b) = BN'(y)`` with ``running_mean' = running_mean − b``.
If no such BatchNorm follows, contraction fails with :class:`~fxexpand.errors.ContractionError`.
Run it after RemoveIdentity / FoldBatchNorm / FuseLinear have reached a fixed point with
``scope="expanded"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import ContractionError
from ..graph import BN_MODULES, _norm_padding, _tup, get_module, linear_op_of, module_call_counts, node_label, set_module
from ..infra import Pass, PassResult, register_pass
from ..provenance import build_layer, region_of

__all__ = ["RestoreOriginalPass", "RestoreOriginal"]


@register_pass("restore_original")
@dataclass(kw_only=True)
class RestoreOriginalPass(Pass):
    """Replace each fully contracted expanded region by its original layer type at its original name."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        regions: dict = gm.meta.get("fxexpand_regions") or {}
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
            with torch.no_grad():
                layer.weight.copy_(op.weight.detach())
                if layer.bias is not None:
                    layer.bias.copy_(op.bias.detach() if op.bias is not None else torch.zeros_like(layer.bias))
                elif op.bias is not None and bool(op.bias.detach().abs().max() > 0):
                    notes.append(self._absorb_bias(gm, rname, node, op.bias.detach(), calls))
            set_module(gm, rname, layer)
            node.target = rname
            notes.append(self.note("restored", rname, f"{type_name} from {len(nodes)} contracted op"))
        gm.delete_all_unused_submodules()
        return PassResult(gm, True, notes)

    def _check_geometry(self, rname, layer, op) -> None:
        want_w = tuple(layer.weight.shape)
        if tuple(op.weight.shape) != want_w:
            raise ContractionError(f"region {rname} contracted to a weight of shape {tuple(op.weight.shape)}, "
                                   f"but the original layer's is {want_w}")
        if op.kind == "conv":
            nd = op.nd
            k, d = tuple(layer.kernel_size), _tup(layer.dilation, nd)
            # dilation is irrelevant along a kernel-1 dimension (the fused op normalises it to 1)
            geom = (_tup(layer.stride, nd), _norm_padding(layer.padding, k, d),
                    tuple(dd if kk > 1 else 1 for dd, kk in zip(d, k)), layer.groups)
            got = (op.stride, op.padding, tuple(dd if kk > 1 else 1 for dd, kk in zip(op.dilation, k)), op.groups)
            if geom != got:
                raise ContractionError(f"region {rname} contracted to stride/padding/dilation/groups {got}, "
                                       f"but the original layer has {geom}")

    def _absorb_bias(self, gm, rname, node, bias, calls):
        users = list(node.users)
        bn_node = users[0] if len(users) == 1 else None
        bn = get_module(gm, bn_node.target) if bn_node is not None and bn_node.op == "call_module" else None
        if (bn is None or not isinstance(bn, BN_MODULES) or bn.running_mean is None or bn.training
                or calls[bn_node.target] > 1 or region_of(gm, bn_node) is not None):
            raise ContractionError(
                f"the contracted region {rname} has a bias but the original layer was built with bias=False, and "
                "no BatchNorm (eval mode, with running statistics, used once) follows it to absorb the bias; "
                "expand layers that have a bias or are followed by a BatchNorm"
            )
        with torch.no_grad():
            bn.running_mean.sub_(bias.to(bn.running_mean.dtype))
        return self.note("absorbed", f"{rname} -> {bn_node.target}", "bias absorbed into the BatchNorm's running_mean")


RestoreOriginal = RestoreOriginalPass
