"""Expansion report: sizes and costs of the original, expanded and contracted models, and which
layers were expanded (and why the others were not)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ..api import contract
from ..core import DecayActivation, as_inputs
from .cost import count_flops, count_parameters

__all__ = ["expansion_report", "report_table"]


def expansion_report(original: nn.Module, expanded: nn.Module, example_inputs: Any, *,
                     contracted: nn.Module | None = None) -> dict:
    """Parameters and FLOPs of the three models plus the expansion notes.

    Without ``contracted``, a copy of ``expanded`` is set to alpha = 1 and contracted (target
    "original") to measure it; neither argument is modified.
    """

    inputs = as_inputs(example_inputs)
    if contracted is None:
        work = copy.deepcopy(expanded).eval()
        with torch.no_grad():  # the end of the decay schedule (what set_decay(work, 1.0) does)
            for m in work.modules():
                if isinstance(m, DecayActivation):
                    m.alpha.fill_(1.0)
        contracted = contract(work, inputs)
    notes = list(getattr(expanded, "fxexpand_notes", []))
    out: dict[str, Any] = {}
    for key, model in (("original", original), ("expanded", expanded), ("contracted", contracted)):
        out[key] = {"parameters": count_parameters(model), "flops": count_flops(model, inputs)}
    out["expanded_layers"] = [n.where for n in notes if n.action == "expanded"]
    out["expansion"] = {n.where: n.reason for n in notes if n.action == "expanded"}
    out["not_expanded"] = {n.where: n.reason for n in notes if n.action == "skipped"}
    return out


def report_table(rep: dict, title: str = "fxexpand expansion"):
    """A rich Table of :func:`expansion_report`'s numbers."""

    t = Table(title=title)
    t.add_column("model")
    t.add_column("parameters", justify="right")
    t.add_column("FLOPs", justify="right")
    t.add_column("x original (params / FLOPs)", justify="right")
    o = rep["original"]
    for key in ("original", "expanded", "contracted"):
        r = rep[key]
        t.add_row(key, f"{r['parameters']:,}", f"{r['flops']:,}",
                  f"{r['parameters'] / max(o['parameters'], 1):.2f} / {r['flops'] / max(o['flops'], 1):.2f}")
    return t
