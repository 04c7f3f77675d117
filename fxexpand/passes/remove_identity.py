"""RemoveIdentity: drop ops that compute the identity at inference.

Pattern → rewrite (``y = op(x)`` → uses of ``y`` become uses of ``x``):

* ``nn.Identity`` modules;
* dropout in eval mode: ``nn.Dropout*`` / ``nn.AlphaDropout`` modules with ``training=False`` and
  ``F.dropout*(..., training=False)`` calls (the flag is a constant in a traced graph); torchvision's
  ``StochasticDepth`` in eval mode;
* :class:`~fxexpand.core.DecayActivation` whose ``alpha`` is exactly 1 (rule 6: at alpha < 1 the
  activation is still non-linear and is kept, with a note).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core import (
    DecayActivation,
    PassResult,
    ScopedPass,
    get_module,
    in_scope,
    node_input,
    node_label,
    register_pass,
)

__all__ = ["RemoveIdentity"]

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCS = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
                  F.feature_alpha_dropout: 2}


@register_pass("remove_identity")
@dataclass(kw_only=True)
class RemoveIdentity(ScopedPass):
    """Remove nn.Identity, eval-mode dropout and fully decayed (alpha == 1) activations.

    Args:
        scope: ``"all"`` or ``"expanded"`` (only inside expanded regions).
    """

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
            src = node_input(node)
            if src is None:
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            notes.append(self.note("removed", node_label(node), reason))
            modified = True
        if modified:
            gm.delete_all_unused_submodules()
        return PassResult(gm, modified, notes)

    @staticmethod
    def _identity(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, str] | None:
        """None: not a candidate; (True, what) removable; (False, why not)."""
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

