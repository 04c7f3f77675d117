"""BoostNet's early exits: train, evaluate and deploy a multi-exit model.

A model built by :class:`~fxexpand.passes.InsertEarlyExits` (or the ``early_exits`` recipe) returns
``(F_1, ..., F_N)``. This package has three modules:

* :mod:`fxexpand.exits.model` — in torch: the training :func:`loss`, :func:`segments` (the model
  split at its exits), :func:`exit_costs`, :func:`collect`, :func:`anytime`, :func:`fit`,
  :func:`evaluate`, :func:`budget_curve`;
* :mod:`fxexpand.exits.policy` — the pure math (Newton–Raphson for the exit probability p, the
  confidence thresholds and the flat-curve rule) and the fitted :class:`Policy`;
* :mod:`fxexpand.exits.runtime` — real early exit in onnxruntime: :func:`export` (one ONNX file
  per segment plus ``policy.json``) and :class:`Runner`.

Their public names are importable from ``fxexpand.exits`` itself (docs/exits.md).
"""

from .model import Segment, anytime, budget_curve, collect, evaluate, exit_costs, exit_record, fit, loss, segments
from .policy import Policy
from .runtime import Runner, export

__all__ = ["exit_record", "loss", "segments", "Segment", "exit_costs", "collect", "anytime", "fit", "evaluate",
           "budget_curve", "Policy", "export", "Runner"]
