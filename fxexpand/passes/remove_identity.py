"""RemoveIdentity: drop ops that compute the identity at inference.

Pattern → rewrite (``y = op(x)`` → uses of ``y`` become uses of ``x``):

* ``nn.Identity`` modules;
* dropout in eval mode: ``nn.Dropout*`` / ``nn.AlphaDropout`` modules with ``training=False`` and
  ``F.dropout*(..., training=False)`` calls (the flag is a constant in a traced graph); torchvision's
  ``StochasticDepth`` in eval mode;
* :class:`~fxexpand.core.DecayActivation` whose ``alpha`` is exactly 1 (rule 6: at alpha < 1 the
  activation is still non-linear and is kept, with a note);
* adding or subtracting the constant 0: ``x + 0``, ``0 + x``, ``x - 0`` (``operator.add`` /
  ``torch.add`` / ``x.add(0)``, ``operator.sub`` / ``torch.sub`` / ``x.sub(0)``, a Python ``0`` or
  ``0.0``, no ``alpha``). timm's MobileOne block starts its branch sum at ``0`` when a branch is
  absent (``out = scale_out + identity_out`` with ``identity_out = 0``), which hides the branches
  from :class:`FuseLinear`. Math: ``x + 0 = x`` in IEEE arithmetic except for the sign of a zero
  (``-0.0 + 0 = +0.0``), which no later op can tell apart numerically except through division by
  zero. Preconditions (else skipped with the reason): ``x``'s dtype is known (``propagate_shapes``)
  and floating point (so the result has ``x``'s dtype), and no user of the result writes to it in
  place (after the rewrite it would write to ``x``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core import (
    DecayActivation,
    PassResult,
    ScopedPass,
    delete_unused_submodules,
    get_module,
    in_scope,
    node_input,
    node_label,
    register_pass,
)

__all__ = ["RemoveIdentity"]

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ADD_ZERO = {operator.add, torch.add, "add"}
_SUB_ZERO = {operator.sub, torch.sub, "sub"}
_IN_PLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_DROPOUT_FUNCS = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
                  F.feature_alpha_dropout: 2}


@register_pass("remove_identity")
@dataclass(kw_only=True)
class RemoveIdentity(ScopedPass):
    """Remove nn.Identity, eval-mode dropout and fully decayed (alpha == 1) activations.

    Args:
        scope: ``"all"`` or ``"expanded"`` (only inside expanded regions).
    """

    needs_code = False  # edits the graph only: the manager recompiles once after a run of such passes

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        notes = []
        modified = False
        for node in list(gm.graph.nodes):
            verdict = self._identity(gm, node)
            if verdict is None:
                continue
            if not in_scope(gm, [node], self.scope)[0]:
                continue
            ok, reason = verdict
            if not ok:
                notes.append(self.note("skipped", node_label(node), reason))
                continue
            src = self._zero_operand(node) or node_input(node)
            if src is None:
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            notes.append(self.note("removed", node_label(node), reason))
            modified = True
        if modified:
            delete_unused_submodules(gm)
        return PassResult(gm, modified, notes)

    @staticmethod
    def _zero_operand(node: fx.Node) -> fx.Node | None:
        """``x`` if ``node`` is ``x + 0``, ``0 + x`` or ``x - 0`` with a Python zero; else None."""
        if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
            return None
        a, b = node.args

        def zero(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0

        if node.target in _ADD_ZERO or node.target in _SUB_ZERO:
            if isinstance(a, fx.Node) and zero(b):
                return a
            if node.target in _ADD_ZERO and isinstance(b, fx.Node) and zero(a) and node.op == "call_function":
                return b
        return None

    @classmethod
    def _add_zero(cls, gm: fx.GraphModule, node: fx.Node) -> tuple[bool, str] | None:
        x = cls._zero_operand(node)
        if x is None:
            return None
        meta = x.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "dtype"):
            return False, "adding 0 to a value of unknown dtype (run propagate_shapes)"
        if not meta.dtype.is_floating_point:
            return False, f"adding 0 to a {meta.dtype} tensor may change its dtype"
        for user in node.users:
            module = get_module(gm, user.target) if user.op == "call_module" else None
            in_place = ((user.op == "call_method" and str(user.target).endswith("_"))
                        or (user.op == "call_function" and user.target in _IN_PLACE_OPS))
            if in_place or getattr(module, "inplace", False):
                return False, f"{node_label(user)} writes to the result of adding 0 in place"
        return True, "adding 0"

    @classmethod
    def _identity(cls, gm: fx.GraphModule, node: fx.Node) -> tuple[bool, str] | None:
        """None: not a candidate; (True, what) removable; (False, why not)."""
        verdict = cls._add_zero(gm, node)
        if verdict is not None:
            return verdict
        if node.op == "call_module":
            mod = get_module(gm, node.target)
            if type(mod) is nn.Identity:
                return True, "nn.Identity"
            if isinstance(mod, _DROPOUT_MODULES):
                return (False, "dropout in training mode") if mod.training else (True, "eval-mode dropout")
            if type(mod).__name__ == "StochasticDepth" and type(mod).__module__.startswith("torchvision"):
                if mod.training and mod.p > 0:
                    return False, "stochastic depth in training mode"
                return True, "eval-mode stochastic depth"
            if isinstance(mod, DecayActivation):
                a = float(mod.alpha)
                if mod.is_identity:
                    return True, "decayed activation at alpha=1"
                return False, f"decayed activation at alpha={a:.6g} < 1 is not linear yet"
            return None
        if node.op == "call_function" and node.target in _DROPOUT_FUNCS:
            idx = _DROPOUT_FUNCS[node.target]
            training = node.args[idx] if len(node.args) > idx else node.kwargs.get("training", True)
            if training is False:
                return True, "dropout with training=False"
            return False, "dropout with training=True (or a non-constant flag)"
        return None

