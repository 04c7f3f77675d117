"""Numerical equivalence checks (the pass form is :class:`fxexpand.passes.Verify`).

:func:`verify` runs a reference and a candidate model on the example inputs and on random inputs
shaped like them, in the models' own dtype (float32) *and* on float64 copies. The float64 check
separates algebra errors from float32 rounding: a wrong fusion shows up as a relative error many
orders of magnitude above 1e-12 there, while float32 noise alone stays near 1e-7.

Both models are deep-copied and put in eval mode; neither argument is modified.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import EquivalenceError, InputError
from .fx import as_inputs

__all__ = ["verify", "VerifyReport", "OutputError", "flatten_outputs", "nonfinite_tensors", "to_float64"]

@dataclass
class OutputError:
    """Worst error seen on one output over all trials, for one precision."""

    name: str
    precision: str
    max_abs: float
    max_rel: float
    scale: float
    trials: int
    ok: bool


@dataclass
class VerifyReport:
    """Per-output errors; ``passed`` is False only if verify was told not to raise."""

    outputs: list[OutputError] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.ok for o in self.outputs)

    def max_abs_error(self, precision: str | None = None) -> float:
        vals = [o.max_abs for o in self.outputs if precision is None or o.precision == precision]
        return max(vals) if vals else 0.0

    def max_rel_error(self, precision: str | None = None) -> float:
        vals = [o.max_rel for o in self.outputs if precision is None or o.precision == precision]
        return max(vals) if vals else 0.0

    def __str__(self) -> str:
        lines = ["output              precision  max_abs     max_rel     trials  ok"]
        for o in self.outputs:
            lines.append(f"{o.name:<19} {o.precision:<10} {o.max_abs:<11.3e} {o.max_rel:<11.3e} {o.trials:<7} "
                         f"{'yes' if o.ok else 'NO'}")
        return "\n".join(lines)


def flatten_outputs(out: Any, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Name every tensor in a (nested) output: ``output``, ``output[0]``, ``output['logits']``."""
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, dict):
        res = []
        for k, v in out.items():
            res.extend(flatten_outputs(v, f"{name}[{k!r}]"))
        return res
    if isinstance(out, (tuple, list)):
        res = []
        for i, v in enumerate(out):
            res.extend(flatten_outputs(v, f"{name}[{i}]"))
        return res
    return []


def _random_like(x: Any, gen: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    if x.dtype == torch.bool:
        return torch.randint(0, 2, x.shape, generator=gen).bool().to(x.device)
    lo = int(x.min()) if x.numel() else 0
    hi = int(x.max()) + 1 if x.numel() else 1
    return torch.randint(lo, max(hi, lo + 1), x.shape, generator=gen, dtype=x.dtype).to(x.device)


def to_float64(x: Any) -> Any:
    """A floating tensor in float64; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


def _run(model: nn.Module, inputs: tuple, which: str) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as e:
        shapes = ", ".join(
            f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs
        )
        raise InputError(
            f"the {which} model failed on inputs of shape/dtype ({shapes}): {type(e).__name__}: {e}. "
            "Check that example_inputs (or --input-shape) match what the model expects."
        ) from e


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """``"name (k of n values)"`` for every floating parameter or buffer holding NaN or Inf."""
    tensors = {}
    for m in model.modules():  # one walk, no names: they are built only when a value is bad
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is not None and t.is_floating_point() and t.numel():
                tensors[id(t)] = t
    if not tensors:
        return []
    with torch.no_grad():
        # one fused pass: a NaN or Inf makes its tensor's 2-norm non-finite (so does an overflow of
        # huge finite values, which the exact check below then clears)
        norms = torch._foreach_norm(list(tensors.values()), 2)
        try:
            finite = bool(torch.stack(norms).isfinite().all())
        except RuntimeError:  # mixed dtypes
            finite = bool(torch.stack([n.float() for n in norms]).isfinite().all())
        if finite:
            return []
    return [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
            for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]




def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 0.0,
    rtol64: float | None = None,
    atol64: float = 0.0,
    trials: int = 3,
    float64: bool = True,
    candidate64: nn.Module | None = None,
    seed: int = 0,
    raise_on_mismatch: bool = True,
) -> VerifyReport:
    """Check that ``candidate`` computes the same function as ``reference``.

    Trial 0 uses ``example_inputs``; trials 1.. use random tensors of the same shapes and dtypes.
    An output passes when ``max|ref - cand| <= atol + rtol * max|ref|`` (``rtol64``/``atol64`` on the
    float64 copies); tolerances are relative to the output's own scale by default (``atol=0``), so
    a model with tiny outputs is not waved through. ``max_rel`` in the report is
    ``max_abs / max|ref|``.

    In float32 a deep reference is itself only accurate to its rounding noise
    ``max|ref32 - ref64|`` (measured on the float64 copy); the float32 check also accepts errors up
    to 8x that noise, since the float64 check is the one that judges the algebra.

    The float64 check compares a float64 copy of ``reference`` with ``candidate64`` when given (the
    same rewrite carried out in float64, as :func:`fxexpand.contract` does; default ``rtol64`` 1e-9),
    or else with a float64 copy of ``candidate``. A float32 candidate's weights carry float32
    rounding from the rewrite, so then the default ``rtol64`` is 1e-5: still far below any algebra
    error, which is of the order of the output itself.

    Raises:
        EquivalenceError: naming the outputs that diverged, or reporting NaN/Inf outputs or
            weights (a non-finite value can hide any error, so it never passes).
        InputError: if a model fails on the inputs.
    """
    inputs = as_inputs(example_inputs)
    if trials < 1:
        raise ValueError("trials must be >= 1")
    for which, m in (("reference", reference), ("candidate", candidate)):
        bad = nonfinite_tensors(m)
        if bad:  # e.g. an Inf running_var gives finite outputs, so the outputs alone would not show it
            raise EquivalenceError(
                f"the {which} model has NaN or Inf weights: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; "
                "equivalence cannot be verified with non-finite weights (did training diverge?)"
            )
    ref = copy.deepcopy(reference).eval()
    cand = copy.deepcopy(candidate).eval()
    gen = torch.Generator().manual_seed(seed + 1_000_003)  # not the stream torch.manual_seed(seed) gives
    trial_inputs = [inputs] + [tuple(_random_like(x, gen) for x in inputs) for _ in range(trials - 1)]

    precisions: list[tuple[str, nn.Module, nn.Module, Any, float, float]] = []
    dt = next((p.dtype for p in ref.parameters() if p.is_floating_point()), torch.float32)
    precisions.append((str(dt).replace("torch.", ""), ref, cand, lambda x: x, rtol, atol))
    cand_dt = next((p.dtype for p in cand.parameters() if p.is_floating_point()), dt)
    if rtol64 is None:
        rtol64 = 1e-9 if (candidate64 is not None or cand_dt == torch.float64) else 1e-5
    if dt == torch.float64:
        precisions[0] = (precisions[0][0], ref, cand, lambda x: x, min(rtol, rtol64), min(atol, atol64))
    if float64 and dt != torch.float64:
        c64 = copy.deepcopy(candidate64).eval() if candidate64 is not None else copy.deepcopy(cand)
        precisions.append(("float64", copy.deepcopy(ref).double(), c64.double(), to_float64, rtol64, atol64))

    report = VerifyReport()
    ref64 = precisions[1][1] if len(precisions) > 1 else None
    for pi, (prec, r, c, conv, rt, at) in enumerate(precisions):
        worst: dict[str, list[float]] = {}
        order: list[str] = []
        for ti in trial_inputs:
            xs = tuple(conv(x) for x in ti)
            noise: dict[str, float] = {}
            if pi == 0 and ref64 is not None:
                for name, t in flatten_outputs(_run(ref64, tuple(to_float64(x) for x in ti), "reference")):
                    noise[name] = t
            out_r = flatten_outputs(_run(r, xs, "reference"))
            out_c = flatten_outputs(_run(c, xs, "candidate"))
            if [n for n, _ in out_r] != [n for n, _ in out_c]:
                raise EquivalenceError(
                    f"outputs differ in structure: reference gives {[n for n, _ in out_r]}, "
                    f"candidate gives {[n for n, _ in out_c]}"
                )
            for (name, a), (_, b) in zip(out_r, out_c):
                if a.shape != b.shape:
                    raise EquivalenceError(f"{name}: shape {tuple(a.shape)} (reference) vs {tuple(b.shape)} (candidate)")
                a64, b64 = a.detach().double(), b.detach().double()
                bad = [w for w, t in (("reference", a64), ("candidate", b64)) if not bool(torch.isfinite(t).all())]
                if bad:
                    raise EquivalenceError(
                        f"{name} ({prec}): the {' and '.join(bad)} output contains NaN or Inf, so "
                        "equivalence cannot be checked; look for NaN/Inf weights or overflowing inputs"
                    )
                err = float((a64 - b64).abs().max()) if a.numel() else 0.0
                scale = float(a64.abs().max()) if a.numel() else 0.0
                nz = float((a64 - noise[name]).abs().max()) if name in noise and a.numel() else 0.0
                if name not in worst:
                    worst[name] = [0.0, 0.0, 0, 0.0]
                    order.append(name)
                w = worst[name]
                w[0], w[1], w[2], w[3] = max(w[0], err), max(w[1], scale), w[2] + 1, max(w[3], nz)
        for name in order:
            err, scale, n, nz = worst[name]
            ok = err <= at + rt * scale or (nz > 0 and err <= 8 * nz)
            report.outputs.append(OutputError(name, prec, err, err / scale if scale > 0 else err, scale, n, ok))
    if raise_on_mismatch and not report.passed:
        bad = [o for o in report.outputs if not o.ok]
        detail = "; ".join(f"{o.name} ({o.precision}): max abs {o.max_abs:.3e}, max rel {o.max_rel:.3e}" for o in bad)
        raise EquivalenceError(f"outputs diverged: {detail}", report=report)
    return report
