"""FuseLinear: merge linear ops that have nothing non-linear between them.

Patterns (every op as ``call_module`` or ``call_function`` with constant parameters):

* sequential: ``B(A(x))`` with A, B convs of the same dimensionality (any kernel, stride, dilation,
  groups, bias) or both linear → one op (``compose`` in :mod:`fxexpand.core.algebra`; padding only on the first conv,
  rule 1; stride grows the kernel to ``k1 + s1·(k2-1)``, rule 2; groups composed per block, rule 3);
* parallel: ``A(x) + B(x)`` → one op whose kernel is the aligned sum (RepVGG-style branches);
* identity residual: ``x + A(x)`` with A stride 1 and ``C_in == C_out`` → A plus the identity
  kernel (rule 4);
* batch-norm branch: ``A(x) + BN(x)`` with BN in inference mode (RepVGG's identity branch) → A plus
  the per-channel affine map ``BN(x) = s·x + (β - μ·s)``, ``s = γ/√(σ²+ε)``, read as a depthwise 1x1
  conv (or a diagonal matrix after a linear), so it joins the parallel sum;
* subtraction: ``A(x) - B(x)``, ``x - A(x)``, ``A(x) - x`` (FastViT's RepMixer subtracts its BN
  branch) → the same sums with the subtracted op negated (``−W``, ``−b``: exact);
* constant scale: ``A(x) * s``, ``s * A(x)``, ``A(x) / s`` with ``s`` a Python number or a constant
  tensor (a ``get_attr``, possibly through ``view`` / ``reshape`` / ``unsqueeze``: a layer-scale
  ``gamma``) that varies along the channel dim only (dim 1 after a conv, the last dim after a
  linear) → a sequential pair ``A`` then the depthwise 1x1 conv / diagonal matrix with weight ``s``
  (``1/s`` for a division); ``s·x`` beside a branch of the same input is a scale branch;
* batch norm first: ``A(BN(x))`` with A a conv or linear → BN read as that per-channel affine first
  op and composed (a padded A after it is refused by rule 1: the BN has a bias);

Uses are counted with :func:`~fxexpand.core.value_users`: a metadata read (``y.shape``,
``y.size()``, ``y.dim()``, ``y.ndim``, ``len(y)``, ...) of an intermediate does not block a fusion. After
the fusion it reads a tensor of the same shape for every input: the fused output for parallel
branches and residuals (every branch has the sum's shape) and for a sequential pair whose second op
keeps the shape (``preserves_shape``), the chain's input when the first op keeps the shape; otherwise
the site is skipped ("the shape of ... is read").

Every fusion is exact or not done; a refused site is recorded with its reason. Outside expanded
regions a fusion is made only if it does not increase multiply-accumulates (MACs, from the shapes
recorded by ShapeProp; without shapes, it is skipped); inside an expanded region it is always made,
because it restores the original layer. Shared modules/parameters are never fused (rule 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from ..core import (
    LinearOp,
    PassResult,
    ScopedPass,
    attr_use_counts,
    bn_as_op,
    bn_of,
    compose,
    delete_unused_submodules,
    identity_like,
    in_scope,
    is_add,
    is_sub,
    linear_op_of,
    metadata_reads,
    module_call_counts,
    move_metadata_reads,
    negate,
    node_input,
    node_label,
    out_shape,
    register_pass,
    replace_nodes_with_module,
    scale_as_op,
    scale_of,
    shared_use,
    site_name,
    sum_parallel,
    value_users,
)

__all__ = ["FuseLinear"]


def _same_meta(a: fx.Node, b: fx.Node) -> bool:
    """Whether two values have the same recorded shape and dtype (a constant scale must not
    broadcast to a new shape or promote the dtype: ``float32_conv(x) * float64_gamma`` is float64)."""
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    return (ma is not None and mb is not None and getattr(ma, "shape", None) is not None
            and tuple(ma.shape) == tuple(getattr(mb, "shape", ())) and ma.dtype == getattr(mb, "dtype", None))


@register_pass("fuse_linear")
@dataclass(kw_only=True)
class FuseLinear(ScopedPass):
    """Fuse sequential / parallel / identity-residual linear ops exactly.

    Args:
        scope: ``"all"`` or ``"expanded"`` (only inside expanded regions).
        allow_flop_increase: also fuse outside expanded regions when it increases MACs.
    """

    needs_code = False  # edits the graph only: the manager recompiles once after a run of such passes

    allow_flop_increase: bool = False

    # -- helpers -------------------------------------------------------------------------------
    def _profitable(self, region, before: list[tuple[LinearOp, fx.Node]], after: LinearOp, out_node: fx.Node) -> str:
        if region is not None or self.allow_flop_increase:
            return ""
        costs = [op.macs(out_shape(n)) for op, n in before]
        new = after.macs(out_shape(out_node))
        if new is None or any(c is None for c in costs):
            return "no shape information to judge the cost (run ShapeProp first)"
        old = sum(costs)
        if new > old:
            return f"would increase MACs from {old} to {new}"
        return ""

    def _cheaply_unprofitable(self, region, first: LinearOp, prev: fx.Node, second: LinearOp, node: fx.Node) -> str:
        """Refuse a sequential fusion that must increase MACs before composing it (composition of
        large or differently grouped kernels is the expensive part of contraction). A lower bound
        of the fused op's MACs: its kernel has at least ``max(k1, k2)`` taps per dim, and its group
        count is at most ``min(g1, g2)`` (a row of the fused connectivity reaches a whole group of
        the first op's inputs, a column a whole group of the second op's outputs)."""
        if region is not None or self.allow_flop_increase:
            return ""
        old = [first.macs(out_shape(prev)), second.macs(out_shape(node))]
        shape = out_shape(node)
        if shape is None or None in old:
            return ""
        if first.kind == "conv":
            if first.nd != second.nd:
                return ""
            groups = min(first.groups, second.groups, math.gcd(second.out_channels, first.in_channels))
            taps = math.prod(max(a, b) for a, b in zip(first.kernel, second.kernel))
        else:
            groups, taps = 1, 1
        bound = math.prod(shape) * (first.in_channels // max(groups, 1)) * taps
        if bound > sum(old):
            return f"would increase MACs from {sum(old)} to at least {bound}"
        return ""

    # -- the pass ------------------------------------------------------------------------------
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        notes = []
        modified = False
        # counted once per call: fusions only remove uses, so stale counts are conservative
        # (a site they block is picked up by the next fixed-point round)
        calls, uses = module_call_counts(gm), attr_use_counts(gm)
        live = module_call_counts(gm)  # kept current by replace_nodes_with_module
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op == "output":
                continue
            if is_add(node) or is_sub(node):
                if self._inside_sum(node):
                    continue  # the sum it feeds merges it (see _try_sum)
                for done, note in self._try_sum(gm, node, calls, uses, live):
                    if note is not None:
                        notes.append(note)
                    modified |= done
                continue
            else:
                done, note = self._try_sequential(gm, node, calls, uses, live)
            if note is not None:
                notes.append(note)
            modified |= done
        if modified:
            delete_unused_submodules(gm)
        return PassResult(gm, modified, notes)

    def _read_pair(self, gm, node, uses):
        """``(prev, first, second)`` for a sequential site ending at ``node``: two linear ops, a linear
        op followed by a constant scale (``conv(x) * gamma``, ``linear(x) / 2``), or an inference-mode
        BatchNorm followed by a linear op (``linear(bn(x))``: the BatchNorm as a per-channel affine
        first op). None when ``node`` ends no such pair."""
        second, _ = linear_op_of(gm, node)
        scale = scale_of(gm, node) if second is None else None
        prev = node_input(node) if scale is None else scale[0]
        if prev is None or (second is None and scale is None):
            return None
        first, _ = linear_op_of(gm, prev)
        if first is not None and second is None:
            second = scale_as_op(scale[1], first, out_shape(node))
            if second is None or not _same_meta(prev, node):
                return None
        elif first is None and second is not None:
            first = self._bn_branch(gm, prev, second, uses, as_input=True)
        if first is None or second is None:
            return None
        return prev, first, second

    def _try_sequential(self, gm, node, calls, uses, live):
        pair = self._read_pair(gm, node, uses)
        if pair is None:
            return False, None
        prev, first, second = pair
        ok, region = in_scope(gm, [prev, node], self.scope)
        if not ok:
            return False, None
        where = f"{node_label(prev)} -> {node_label(node)}"
        if len(value_users(prev)) != 1:
            return False, self.note("skipped", where, f"the output of {node_label(prev)} has other users")
        # metadata reads of the intermediate must read a tensor of the same shape after the fusion
        reads_to = None
        if metadata_reads(prev):
            if second.preserves_shape:
                reads_to = "fused"
            elif first.preserves_shape:
                reads_to = "input"
            else:
                return False, self.note("skipped", where, f"the shape of {node_label(prev)} is read and no tensor "
                                        "left after the fusion has that shape for every input")
        reason = shared_use(prev, calls, uses) or shared_use(node, calls, uses)
        if not reason and node_input(prev) is None:
            reason = "the chain's input is not a graph value"
        if not reason and first.weight.dtype != second.weight.dtype:
            reason = "parameters have different dtypes"
        if reason:
            return False, self.note("skipped", where, reason)
        reason = self._cheaply_unprofitable(region, first, prev, second, node)
        if reason:
            return False, self.note("skipped", where, reason)
        fused, reason = compose(first, second)
        if fused is None:
            return False, self.note("skipped", where, reason)
        reason = self._profitable(region, [(first, prev), (second, node)], fused, node)
        if reason:
            return False, self.note("skipped", where, reason)
        if reads_to == "input":
            move_metadata_reads(prev, node_input(prev))
        replace_nodes_with_module(gm, [prev, node], fused.to_module(), node_input(prev), site_name(gm, node, "fused"),
                                  call_counts=live, same_shape=[prev] if reads_to == "fused" else ())
        return True, self.note("fused", where, "sequential")

    @staticmethod
    def _inside_sum(node: fx.Node) -> bool:
        """Whether ``node`` (an add / sub) is an inner term of a larger sum: its one user is an add or
        a sub, which merges the whole sum at once."""
        if len(node.users) != 1:
            return False
        user = next(iter(node.users))
        return is_add(user) or is_sub(user)

    @staticmethod
    def _sum_terms(root: fx.Node) -> tuple[list[tuple[fx.Node, float]], list[fx.Node]]:
        """``(terms with their signs, inner add / sub nodes in graph order)`` of the sum ending at
        ``root``: ``((s + i) + k1) - k2`` has terms s, i, k1 (+1) and k2 (-1)."""
        terms, inner = [], []

        def walk(n: fx.Node, sign: float) -> None:
            for i, a in enumerate(n.args):
                s = -sign if (i == 1 and is_sub(n)) else sign
                if a is not root and (is_add(a) or is_sub(a)) and len(a.users) == 1:
                    inner.append(a)
                    walk(a, s)
                else:
                    terms.append((a, s))

        walk(root, 1.0)
        return terms, sorted(inner)

    def _try_sum(self, gm, root, calls, uses, live) -> list:
        """A sum of several terms (MobileOne's k branches + scale + BatchNorm identity, RepVGG's three)
        merged at once into one op: one composition and one module instead of one per add. When the
        terms do not all merge, each add is tried on its own, innermost first (:meth:`_try_add`)."""
        terms, inner = self._sum_terms(root)
        if not inner:
            return [self._try_add(gm, root, calls, uses, live)]
        merged = self._merge_sum(gm, root, terms, inner, calls, uses, live)
        if merged is not None:
            return [merged]
        results = []
        for n in inner + [root]:
            if n.graph is gm.graph:
                results.append(self._try_add(gm, n, calls, uses, live))
        return results

    def _merge_sum(self, gm, root, terms, inner, calls, uses, live):
        """``(True, note)`` when every term of the sum is a linear op, a BatchNorm / constant-scale
        branch of one common input x, or x itself, and the merge is exact and allowed; None
        otherwise (the caller then tries each add on its own)."""
        linear = {n: linear_op_of(gm, n)[0] for n, _ in terms}
        inputs = {node_input(n) for n, op in linear.items() if op is not None}
        if len(inputs) != 1 or None in inputs:
            return None
        x = next(iter(inputs))
        like = next(op for op in linear.values() if op is not None)
        ops: dict[fx.Node, LinearOp] = {}
        residual = 0.0
        for n, sign in terms:
            if n is x:
                residual += sign
                continue
            op = linear[n]
            if op is None and node_input(n) is x:
                op = self._bn_branch(gm, n, like, uses)
            if op is None:
                scale = scale_of(gm, n)
                if scale is not None and scale[0] is x and _same_meta(n, x):
                    op = scale_as_op(scale[1], like, out_shape(n))
            if op is None or n in ops:
                return None
            ops[n] = negate(op) if sign < 0 else op
        branches = list(ops)
        ok, region = in_scope(gm, branches + inner + [root], self.scope)
        if not ok:
            return None
        shape = out_shape(root)
        if shape is None or any(out_shape(n) != shape for n in branches) or (residual and out_shape(x) != shape):
            return None
        if any(len(value_users(n)) != 1 or shared_use(n, calls, uses) for n in branches):
            return None
        op_list = list(ops.values())
        if residual:
            if like.kind == "conv" and any(st != 1 for st in like.stride) or like.in_channels != like.out_channels:
                return None
            if residual not in (1.0, -1.0):
                return None
            ident = identity_like(like, like.in_channels)
            op_list.append(ident if residual > 0 else negate(ident))
        if len({o.weight.dtype for o in op_list}) != 1:
            return None
        fused, _ = sum_parallel(op_list)
        if fused is None or self._profitable(region, [(ops[n], n) for n in branches], fused, root):
            return None
        name = site_name(gm, branches[0], "fused")
        replace_nodes_with_module(gm, branches + inner + [root], fused.to_module(), x, name, call_counts=live,
                                  same_shape=branches + inner)
        where = " + ".join(["x"] * bool(residual) + [node_label(n) for n in branches]) + f" -> {root.name}"
        return True, self.note("fused", where, f"sum of {len(op_list)} terms")

    def _try_add(self, gm, node, calls, uses, live):
        """``a + b`` or ``a - b`` whose operands are linear ops (or BatchNorm / constant-scale branches
        of the same input, or the input itself): one op. A subtracted operand is negated."""
        a, b = node.args
        sign = {a: 1.0, b: -1.0 if is_sub(node) else 1.0}
        if a is b:
            return False, None
        ops = {}
        for n in (a, b):
            op, _ = linear_op_of(gm, n)
            if op is not None:
                ops[n] = op
        if not ops:
            return False, None
        if len(ops) == 1:  # A(x) + BN(x) or A(x) + s·x: a per-channel affine branch
            (lin, op), = ops.items()
            other = b if lin is a else a
            branch = self._bn_branch(gm, other, op, uses)
            if branch is not None and node_input(other) is node_input(lin) and node_input(lin) is not None:
                ops[other] = branch
            else:
                scale = scale_of(gm, other)
                if scale is not None and scale[0] is node_input(lin) and scale[0] is not None:
                    branch = scale_as_op(scale[1], op, out_shape(other))
                    if branch is not None and _same_meta(other, lin) and _same_meta(scale[0], lin):
                        ops[other] = branch
        ops = {n: (negate(op) if sign[n] < 0 else op) for n, op in ops.items()}
        shape = out_shape(node)
        # identity residual: x + A(x), x - A(x), A(x) - x
        for lin, other in ((a, b), (b, a)):
            if lin in ops and node_input(lin) is other:
                return self._fuse_branches(gm, node, [lin], other, ops, calls, uses, live, residual=sign[other],
                                           shape=shape)
        if len(ops) == 2 and node_input(a) is not None and node_input(a) is node_input(b):
            return self._fuse_branches(gm, node, [a, b], node_input(a), ops, calls, uses, live, residual=0.0,
                                       shape=shape)
        return False, None

    @staticmethod
    def _bn_branch(gm, node, like: LinearOp, uses, as_input: bool = False) -> LinearOp | None:
        """An inference-mode batch norm as a linear op of ``like``'s kind: a depthwise 1x1 conv with
        weight ``s = γ/√(σ²+ε)`` and bias ``β - μ·s`` (a diagonal matrix for a linear), or None.
        ``as_input``: the batch norm feeds ``like`` (its channels are ``like``'s inputs), else it is a
        branch beside ``like`` (its channels are ``like``'s outputs)."""
        bn, _ = bn_of(gm, node)
        if bn is None or bn.tail:  # a batch norm followed by its own activation is not linear
            return None
        if node.op == "call_function":  # functional batch norm: its tensors must be this site's own
            attrs = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
            if any(uses[t] > 1 for t in attrs):
                return None
        shape = out_shape(node)
        c = bn.running_mean.numel()
        channels = like.in_channels if as_input else like.out_channels
        if shape is None or len(shape) < 2 or shape[1] != c or channels != c:
            return None
        if like.kind == "linear" and len(shape) != 2:
            return None  # BatchNorm1d normalises dim 1, a linear acts on the last dim
        if like.kind == "conv" and len(shape) != like.nd + 2:
            return None
        if as_input:  # the identity of the batch norm's own channel count, in ``like``'s dimensionality
            like = LinearOp(like.kind, like.weight.new_zeros((c, 1) + (1,) * like.nd), None)
        return bn_as_op(bn, like)

    def _fuse_branches(self, gm, node, branches, x, ops, calls, uses, live, *, residual, shape):
        ok, region = in_scope(gm, branches + [node], self.scope)
        if not ok:
            return False, None
        kind = "identity residual" if residual else "parallel branches"
        where = " + ".join(["x"] * bool(residual) + [node_label(n) for n in branches]) + f" -> {node.name}"
        for n in branches:
            if len(value_users(n)) != 1:
                return False, self.note("skipped", where, f"the output of {node_label(n)} has other users")
            reason = shared_use(n, calls, uses)
            if reason:
                return False, self.note("skipped", where, reason)
        if shape is None or any(out_shape(n) != shape for n in branches):
            return False, self.note("skipped", where, "operand shapes unknown or broadcast in the add")
        op_list = [ops[n] for n in branches]
        if residual:
            op = op_list[0]
            xs = out_shape(x)
            if xs != shape:
                return False, self.note("skipped", where, "the residual changes the shape (stride or channels)")
            if op.kind == "conv" and any(s != 1 for s in op.stride):
                return False, self.note("skipped", where, "strided conv in an identity residual")
            if op.in_channels != op.out_channels:
                return False, self.note("skipped", where, "C_in != C_out in an identity residual")
            ident = identity_like(op, op.in_channels)
            op_list = op_list + [ident if residual > 0 else negate(ident)]
        if len({o.weight.dtype for o in op_list}) != 1:
            return False, self.note("skipped", where, "parameters have different dtypes")
        fused, reason = sum_parallel(op_list)
        if fused is None:
            return False, self.note("skipped", where, reason)
        reason = self._profitable(region, [(ops[n], n) for n in branches], fused, node)
        if reason:
            return False, self.note("skipped", where, reason)
        name = site_name(gm, branches[0], "fused")
        # every branch has the sum's shape (checked above): their shape reads read the fused op
        replace_nodes_with_module(gm, list(branches) + [node], fused.to_module(), x, name,
                                  call_counts=live, same_shape=branches)
        return True, self.note("fused", where, kind)

