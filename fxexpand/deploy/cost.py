"""Parameter and FLOP counts (FLOPs from :class:`torch.utils.flop_counter.FlopCounterMode`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "count_flops"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass in eval mode, as counted by torch's FlopCounterMode.

    (FlopCounterMode counts a multiply-accumulate as 2 FLOPs and covers matmul/conv ops.)
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    m = copy.deepcopy(model).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        m(*inputs)
    return int(counter.get_total_flops())
