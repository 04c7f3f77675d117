"""Verify: check the graph against a reference model; never changes it.

Pattern: the whole graph. Rewrite: none (``modified`` is always False). Check: the graph computes
the reference's function on the example inputs and random inputs shaped like them, in float32 and
on float64 copies (:func:`fxexpand.core.verify`); an :class:`~fxexpand.core.EquivalenceError`
names the outputs that diverged. Not buildable by name: it needs ``reference`` and
``example_inputs``.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from ..core import Pass, PassResult, register_pass, verify

__all__ = ["Verify"]


@register_pass("verify")
class Verify(Pass):
    """Checks the graph against a reference model; never modifies it.

    Args:
        reference: the model the graph must be equivalent to.
        example_inputs: tuple of example tensors.
        rtol, atol, trials: see :func:`verify`.
    """

    def __init__(self, *, reference: nn.Module, example_inputs: Any, rtol: float = 1e-4, atol: float = 0.0,
                 trials: int = 3):
        if not isinstance(reference, nn.Module):
            raise TypeError("Verify(reference=...) must be an nn.Module")
        self.reference = reference
        self.example_inputs = example_inputs
        self.rtol, self.atol, self.trials = float(rtol), float(atol), int(trials)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        rep = verify(self.reference, graph_module, self.example_inputs, rtol=self.rtol, atol=self.atol,
                     trials=self.trials)
        note = self.note("info", "verified", f"max abs error {rep.max_abs_error():.3e}")
        return PassResult(graph_module, False, [note])
