"""Early-exit inference policies: the pure math of budgeted-batch and anytime evaluation.

A model with ``N`` exits ``n = 1..N`` (BoostNet, Yu et al. AAAI 2023; MSDNet's evaluation protocol)
produces logits ``F_n`` at every exit; exit ``n``'s *confidence* on a sample is ``max softmax(F_n)``.
``step_costs[n-1] = c_n`` is the cost (FLOPs) of going from exit ``n-1`` to exit ``n``, head ``n``
included, so exiting at ``n`` costs ``C_n = c_1 + ... + c_n`` in total.

**Budgeted batch.** A fraction ``p`` of the samples still running exits at each classifier, so the
fraction of all samples exiting at ``n`` is ``q_n = p (1-p)^(n-1)`` (``n < N``) and
``q_N = (1-p)^(N-1)``; the mean cost is ``C_avg(p) = sum_n (1-p)^(n-1) c_n``. For a budget ``B``,
:func:`solve_exit_probability` solves ``C_avg(p) = B`` by Newton-Raphson; :func:`fit_thresholds`
turns the fractions into confidence thresholds on a held-out split; :func:`exit_indices` and
:func:`evaluate_policy` apply them (a sample leaves at the first exit whose confidence reaches the
threshold). :func:`budget_curve` sweeps budgets (or the official code's ``p`` grid); the exits demo draws
the curves (:func:`fxexpand.demo.early_exits.plot_curves`). :class:`Policy` is the fitted policy,
with the model's side (temperatures, boosting, costs) once :func:`fxexpand.exits.fit` fills it in.

**Anytime prediction.** Every sample runs to exit ``n``: :func:`anytime_table`.

Everything here is plain arithmetic on tensors of confidences and correctness flags; nothing
imports the rest of :mod:`fxexpand`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "Policy",
    "ExitPolicy",
    "anytime_table",
    "average_cost",
    "budget_curve",
    "confidences",
    "cumulative_costs",
    "evaluate_policy",
    "exit_fractions",
    "exit_indices",
    "fit_policy",
    "fit_thresholds",
    "p_grid",
    "solve_exit_probability",
]

_INF = math.inf

#: A sequence of plain numbers.
FloatSeq = list[float] | tuple[float, ...]
#: Per-exit step costs ``c_1..c_N``: a sequence of numbers or a 1-D tensor / array.
CostsLike = list[float] | tuple[float, ...] | torch.Tensor | np.ndarray


# --------------------------------------------------------------------------- validation helpers


def _costs(step_costs: CostsLike) -> list[float]:
    """``step_costs`` as a list of floats; ValueError unless non-empty, finite and positive."""
    if isinstance(step_costs, (torch.Tensor, np.ndarray)):
        step_costs = step_costs.reshape(-1).tolist()
    costs = [float(c) for c in step_costs]
    if not costs:
        raise ValueError("step_costs is empty: an early-exit model needs at least one exit")
    bad = [c for c in costs if not (math.isfinite(c) and c > 0)]
    if bad:
        raise ValueError(f"step costs must be finite and positive, got {costs}")
    return costs


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also refuses NaN
        raise ValueError(f"exit probability p must lie in [0, 1], got {p}")
    return p


def _scores(scores: torch.Tensor) -> torch.Tensor:
    """Confidences as a finite float64 tensor of shape [N_exits, S]."""
    t = torch.as_tensor(scores).detach()
    if t.dim() != 2 or t.shape[0] < 1:
        raise ValueError(f"scores must have shape [N_exits, S], got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"scores must be real numbers, got dtype {t.dtype}")
    t = t.to(dtype=torch.float64, device="cpu")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("scores must be finite (no NaN or infinity)")
    return t


def _correct(correct: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Correctness flags as a bool tensor of ``shape``; integer 0/1 tensors are accepted too."""
    t = torch.as_tensor(correct).detach().cpu()
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"correct has shape {tuple(t.shape)}, scores {tuple(shape)}: they must match")
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or bool(((t != 0) & (t != 1)).any()):
            raise ValueError("correct must be a bool tensor (or integers 0/1)")
        t = t.bool()
    return t


def _thresholds(thresholds: FloatSeq, n_exits: int) -> torch.Tensor:
    thr = [float(t) for t in thresholds]
    if len(thr) != n_exits:
        raise ValueError(f"{len(thr)} thresholds for {n_exits} exits")
    if any(math.isnan(t) for t in thr):
        raise ValueError(f"thresholds contain NaN: {thr}")
    return torch.tensor(thr, dtype=torch.float64)


def _round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (``round()`` would round halves to even)."""
    return math.floor(x + 0.5)


# --------------------------------------------------------------------------- costs and p


def cumulative_costs(step_costs: CostsLike) -> list[float]:
    """Cumulative costs ``[C_1, ..., C_N]`` with ``C_n = c_1 + ... + c_n``.

    Raises ValueError for an empty list or a cost that is not finite and positive.
    """
    costs = _costs(step_costs)
    out, total = [], 0.0
    for c in costs:
        total += c
        out.append(total)
    return out


def average_cost(p: float, step_costs: CostsLike) -> float:
    """Mean cost per sample ``C_avg(p) = sum_{n=1..N} (1-p)^(n-1) c_n`` in budgeted-batch mode.

    ``C_avg(0) = C_N`` (everything runs to the end) and ``C_avg(1) = c_1`` (everything leaves at the
    first exit); in between it decreases strictly (for ``N >= 2``) and is convex in ``p``.
    """
    p = _check_p(p)
    costs = _costs(step_costs)
    x = 1.0 - p
    return math.fsum(c * x**i for i, c in enumerate(costs))


def _average_cost_slope(p: float, costs: list[float]) -> float:
    """``d C_avg / d p = -sum_{n>=2} (n-1) (1-p)^(n-2) c_n`` (negative for N >= 2)."""
    x = 1.0 - p
    return -math.fsum(i * c * x ** (i - 1) for i, c in enumerate(costs) if i >= 1)


def solve_exit_probability(
    budget: float, step_costs: CostsLike, *, tol: float = 1e-12, max_iter: int = 100
) -> float:
    """The exit probability ``p`` in [0, 1] with ``average_cost(p, step_costs) == budget``.

    ``budget`` is an absolute mean cost per sample (same unit as ``step_costs``). It is clamped to
    the feasible range ``[c_1, C_N]``: ``budget >= C_N`` gives ``p = 0`` (no early exits) and
    ``budget <= c_1`` gives ``p = 1`` (everything leaves at the first exit); a single-exit model
    therefore always gives 0 or 1.

    Inside the range the root is found by Newton-Raphson started at ``p = 0``. ``C_avg`` is
    decreasing and convex in ``p``, so from the left every Newton step stays below the root and the
    iteration converges monotonically (quadratically near the root); a bracket ``[lo, hi]`` is kept
    anyway and a step that leaves it is replaced by bisection. Iteration stops when a step moves
    ``p`` by at most ``tol`` or the residual is exactly zero; after ``max_iter`` steps the last
    iterate is returned.

    Raises ValueError for an empty ``step_costs``, a cost that is not finite and positive, a NaN
    budget, ``tol <= 0`` or ``max_iter < 1``.
    """
    costs = _costs(step_costs)
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget is NaN")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if budget >= math.fsum(costs):
        return 0.0
    if budget <= costs[0]:
        return 1.0
    # here N >= 2 and c_1 < budget < C_N: f(0) > 0 > f(1) with f(p) = C_avg(p) - budget
    lo, hi, p = 0.0, 1.0, 0.0
    for _ in range(max_iter):
        f = average_cost(p, costs) - budget
        if f == 0.0:
            return p
        if f > 0:
            lo = p
        else:
            hi = p
        slope = _average_cost_slope(p, costs)
        new = p - f / slope if slope < 0 else math.nan
        if not lo < new < hi:  # also catches NaN
            new = 0.5 * (lo + hi)
        if abs(new - p) <= tol:
            return new
        p = new
    return p


def exit_fractions(p: float, n_exits: int) -> list[float]:
    """Fractions of all samples leaving at each exit: ``q_n = p (1-p)^(n-1)`` for ``n < N`` and
    ``q_N = (1-p)^(N-1)``; they sum to 1 (up to rounding)."""
    p = _check_p(p)
    if int(n_exits) != n_exits or n_exits < 1:
        raise ValueError(f"n_exits must be a positive integer, got {n_exits}")
    n_exits = int(n_exits)
    x = 1.0 - p
    return [p * x**i for i in range(n_exits - 1)] + [x ** (n_exits - 1)]


def p_grid(steps: int = 20) -> list[float]:
    """The official code's grid of exit probabilities ``[k / steps for k in 0..steps]``."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    steps = int(steps)
    return [k / steps for k in range(steps + 1)]


def confidences(logits_per_exit: list[torch.Tensor] | tuple[torch.Tensor, ...] | torch.Tensor) -> torch.Tensor:
    """Max-softmax confidence of every exit on every sample.

    ``logits_per_exit`` is a list of ``[S, K]`` logits, one per exit (or one ``[N, S, K]`` tensor).
    Returns a detached ``[N, S]`` tensor (float32, or float64 for float64 logits).
    """
    if isinstance(logits_per_exit, torch.Tensor):
        logits_per_exit = list(logits_per_exit.unbind(0)) if logits_per_exit.dim() == 3 else [logits_per_exit]
    logits = [torch.as_tensor(t).detach() for t in logits_per_exit]
    if not logits:
        raise ValueError("logits_per_exit is empty")
    shapes = {tuple(t.shape) for t in logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every exit's logits must have the same shape [S, K], got {sorted(shapes)}")
    out = []
    for t in logits:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        out.append(torch.softmax(t.to(dtype), dim=-1).amax(dim=-1))
    return torch.stack(out)


# --------------------------------------------------------------------------- policies


@dataclass
class Policy:
    """A fitted budgeted-batch early-exit policy: what :func:`fit_policy` (the math) and
    :func:`fxexpand.exits.fit` (on a model) return, what :func:`fxexpand.exits.export` writes into
    ``policy.json`` and what :class:`fxexpand.exits.Runner` applies.

    ``thresholds[n]``: a sample leaves at exit ``n`` (0-based) when its confidence there is
    ``>= thresholds[n]`` (first such exit); ``+inf`` closes an exit, the last one is ``-inf``.
    ``p``: the exit probability; ``budget``: the absolute budget it was solved from (None when the
    policy was made from ``p`` directly); ``fractions``: the target fractions ``q_n``.

    The model's side, filled in by :func:`fxexpand.exits.fit` (empty for a policy fitted on plain
    scores): ``temperatures`` (``t_n`` of ``F_n = t_n · F_{n-1} + f_n``), ``boost`` (whether the
    model boosts, i.e. adds the previous exit's logits) and ``step_costs`` (``c_n``, the per-exit
    costs the policy was fitted with).
    """

    thresholds: list[float]
    p: float
    budget: float | None = None
    fractions: list[float] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    boost: bool = False
    step_costs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain, strictly JSON-safe values: a ``-inf`` threshold is written as ``None`` and a
        ``+inf`` one (a closed exit) as the string ``"inf"``; :meth:`from_dict` reads both back."""

        def enc(t: float) -> float | str | None:
            t = float(t)
            if t == -_INF:
                return None
            if t == _INF:
                return "inf"
            return t

        return {
            "thresholds": [enc(t) for t in self.thresholds],
            "p": float(self.p),
            "budget": None if self.budget is None else float(self.budget),
            "fractions": [float(q) for q in self.fractions],
            "temperatures": [float(t) for t in self.temperatures],
            "boost": bool(self.boost),
            "step_costs": [float(c) for c in self.step_costs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        """Inverse of :meth:`to_dict` (also accepts raw floats, including infinities); a missing
        ``fractions``, ``temperatures``, ``boost`` or ``step_costs`` takes its default."""

        def dec(t: Any) -> float:
            return -_INF if t is None else float(t)  # float("inf") / float("-inf") parse the strings

        budget = data.get("budget")
        return cls(
            thresholds=[dec(t) for t in data["thresholds"]],
            p=float(data["p"]),
            budget=None if budget is None else float(budget),
            fractions=[float(q) for q in data.get("fractions", [])],
            temperatures=[float(t) for t in data.get("temperatures", [])],
            boost=bool(data.get("boost", False)),
            step_costs=[float(c) for c in data.get("step_costs", [])],
        )


#: The name this type had in ``fxexpand.exit_policy`` (one type: :class:`Policy`).
ExitPolicy = Policy


def exit_indices(scores: torch.Tensor, thresholds: FloatSeq) -> torch.Tensor:
    """0-based exit index of every sample: the first ``n`` with ``scores[n, s] >= thresholds[n]``.

    The last exit takes every sample that reaches it, whatever its threshold. Comparisons are made
    in float64, so a threshold read from a float32 confidence selects exactly the samples it should.
    Returns an int64 tensor of shape ``[S]``.
    """
    sc = _scores(scores)
    thr = _thresholds(thresholds, sc.shape[0])
    passes = sc >= thr[:, None]
    passes[-1] = True
    return passes.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximum


def _correct_at(corr: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return corr.gather(0, idx[None]).squeeze(0)


def _flat_rule(sc: torch.Tensor, corr: torch.Tensor, thresholds: list[float]) -> list[float]:
    """The flat-curve post-pass of :func:`fit_thresholds` (see there for the exact rule)."""
    n_exits = sc.shape[0]
    thr = list(thresholds)
    for n in range(n_exits - 1):
        t = torch.tensor(thr, dtype=torch.float64)
        passes = sc >= t[:, None]
        reach = ~passes[:n].any(dim=0) if n > 0 else torch.ones(sc.shape[1], dtype=torch.bool)
        if not bool(reach.any()):
            continue
        # where each sample would leave if exit n let nobody out (exits after n keep their thresholds)
        later = passes[n + 1 :].clone()
        later[-1] = True
        later_idx = later.to(torch.uint8).argmax(dim=0) + (n + 1)
        later_ok = _correct_at(corr, later_idx)
        r_sc = sc[n][reach]
        delta = corr[n][reach].to(torch.int64) - later_ok[reach].to(torch.int64)
        order = torch.sort(r_sc, descending=True, stable=True).indices
        s_sorted = r_sc[order]
        gain = torch.cumsum(delta[order], dim=0)  # gain[i]: extra correct if the top i+1 leave at n
        n_now = int((r_sc >= thr[n]).sum())
        current = int(gain[n_now - 1]) if n_now > 0 else 0
        # a candidate threshold is a value v = s_sorted[i] at the end of its tie group (all samples
        # with confidence >= v leave), strictly below the current threshold
        end_of_group = torch.ones_like(s_sorted, dtype=torch.bool)
        end_of_group[:-1] = s_sorted[1:] < s_sorted[:-1]
        ok = end_of_group & (s_sorted < thr[n]) & (gain >= current)
        if bool(ok.any()):
            i = int(torch.nonzero(ok).max())  # the lowest qualifying value
            thr[n] = float(s_sorted[i])
    return thr


def fit_thresholds(
    scores: torch.Tensor, correct: torch.Tensor, fractions: FloatSeq, *, flat_rule: bool = True
) -> list[float]:
    """Confidence thresholds that make ``fractions`` of the held-out samples leave at each exit.

    ``scores``: ``[N, S]`` held-out confidences; ``correct``: ``[N, S]`` bool, whether exit ``n``
    classifies sample ``s`` correctly (only used by the flat rule); ``fractions``: ``q_1..q_N``
    (non-negative, summing to 1), e.g. from :func:`exit_fractions`.

    **Fraction fit.** Exits are processed in order. For exit ``n < N`` the target count is
    ``k_n = min(round_half_up(q_n * S), R)``, with ``R`` the number of held-out samples that have
    not left yet. If ``k_n == 0`` the threshold is ``+inf`` (nobody leaves there). Otherwise the
    threshold is the ``k_n``-th highest confidence at exit ``n`` among the ``R`` remaining samples,
    and every remaining sample with confidence ``>=`` it leaves. Without ties at that value exactly
    ``k_n`` samples leave; **ties**: all remaining samples tied with the ``k_n``-th highest
    confidence leave too (more than ``k_n``), consistently with the ``>=`` rule of
    :func:`exit_indices`, and the following exits work on what is really left. The last exit's
    threshold is ``-inf``: it takes everything left. On the held-out data, :func:`exit_indices`
    with these thresholds reproduces exactly this assignment.

    **Flat rule** (``flat_rule=True``): a threshold is not raised where that does not improve
    held-out accuracy. After the fraction fit, for each exit ``n = 1..N-1`` in order (exits before
    ``n`` already post-processed, exits after ``n`` still at their fitted values), let ``R_n`` be the
    held-out samples that reach exit ``n`` under the current thresholds. The candidates are the
    distinct confidences at exit ``n`` of the samples in ``R_n`` that are strictly below the current
    ``threshold_n``. ``threshold_n`` is replaced by the *smallest* candidate ``v`` for which the
    number of correctly classified held-out samples of the whole policy with ``threshold_n = v``
    (all other thresholds unchanged) is ``>=`` that with the current ``threshold_n``; if no candidate
    qualifies it stays. Each step never lowers held-out accuracy, and lowering a threshold only
    moves samples from later exits to exit ``n``, so held-out mean cost never rises: the result is
    at least as accurate and at most as costly on the held-out data as the pure fraction fit, and
    each threshold is ``<=`` its fraction-fit value.

    Returns ``N`` floats.
    """
    sc = _scores(scores)
    corr = _correct(correct, sc.shape)
    n_exits, n_samples = sc.shape
    q = [float(f) for f in fractions]
    if len(q) != n_exits:
        raise ValueError(f"{len(q)} fractions for {n_exits} exits")
    if any(not (math.isfinite(f) and f >= 0) for f in q) or abs(math.fsum(q) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {q}")
    remaining = torch.ones(n_samples, dtype=torch.bool)
    thresholds: list[float] = []
    for n in range(n_exits - 1):
        left = int(remaining.sum())
        k = min(_round_half_up(q[n] * n_samples), left)
        if k <= 0:
            thresholds.append(_INF)
            continue
        t = float(torch.topk(sc[n][remaining], k).values[-1])
        thresholds.append(t)
        remaining &= ~(sc[n] >= t)
    thresholds.append(-_INF)
    if flat_rule:
        thresholds = _flat_rule(sc, corr, thresholds)
    return thresholds


def fit_policy(
    scores: torch.Tensor, correct: torch.Tensor, step_costs: CostsLike, budget: float, *, flat_rule: bool = True
) -> Policy:
    """Solve ``p`` for the absolute ``budget`` (:func:`solve_exit_probability`), turn it into exit
    fractions and fit thresholds on the held-out ``scores`` / ``correct`` (:func:`fit_thresholds`)."""
    costs = _costs(step_costs)
    n_exits = _scores(scores).shape[0]
    if len(costs) != n_exits:
        raise ValueError(f"{len(costs)} step costs for {n_exits} exits")
    p = solve_exit_probability(budget, costs)
    fractions = exit_fractions(p, n_exits)
    thresholds = fit_thresholds(scores, correct, fractions, flat_rule=flat_rule)
    return Policy(thresholds=thresholds, p=p, budget=float(budget), fractions=fractions)


def evaluate_policy(
    scores: torch.Tensor, correct: torch.Tensor, thresholds: FloatSeq, step_costs: CostsLike
) -> dict[str, Any]:
    """Apply ``thresholds`` to ``scores`` and measure the result.

    Returns ``{"accuracy", "mean_cost", "mean_cost_fraction", "histogram"}``: the fraction of samples
    classified correctly at the exit they leave from, their mean cumulative cost ``C_n``, that mean
    divided by ``C_N``, and the number of samples leaving at each exit (a list of ``N`` ints summing
    to ``S``). Raises ValueError when there are no samples.
    """
    sc = _scores(scores)
    corr = _correct(correct, sc.shape)
    n_exits, n_samples = sc.shape
    cum = cumulative_costs(step_costs)
    if len(cum) != n_exits:
        raise ValueError(f"{len(cum)} step costs for {n_exits} exits")
    if n_samples == 0:
        raise ValueError("no samples to evaluate")
    idx = exit_indices(sc, thresholds)
    ok = _correct_at(corr, idx)
    cost = torch.tensor(cum, dtype=torch.float64)[idx]
    mean_cost = float(cost.mean())
    return {
        "accuracy": float(ok.to(torch.float64).mean()),
        "mean_cost": mean_cost,
        "mean_cost_fraction": mean_cost / cum[-1],
        "histogram": [int(c) for c in torch.bincount(idx, minlength=n_exits).tolist()],
    }


def anytime_table(correct: torch.Tensor, step_costs: CostsLike) -> list[dict[str, Any]]:
    """Anytime prediction: every sample evaluated at every exit.

    One row per exit: ``{"exit": n (1-based), "cost": C_n, "cost_fraction": C_n / C_N,
    "accuracy": fraction of samples exit n classifies correctly}``.
    """
    t = torch.as_tensor(correct).detach().cpu()
    if t.dim() != 2:
        raise ValueError(f"correct must have shape [N_exits, S], got {tuple(t.shape)}")
    corr = _correct(t, t.shape)
    cum = cumulative_costs(step_costs)
    if len(cum) != corr.shape[0]:
        raise ValueError(f"{len(cum)} step costs for {corr.shape[0]} exits")
    if corr.shape[1] == 0:
        raise ValueError("no samples to evaluate")
    acc = corr.to(torch.float64).mean(dim=1).tolist()
    return [
        {"exit": n + 1, "cost": cum[n], "cost_fraction": cum[n] / cum[-1], "accuracy": float(acc[n])}
        for n in range(len(cum))
    ]


def budget_curve(
    val_scores: torch.Tensor,
    val_correct: torch.Tensor,
    test_scores: torch.Tensor,
    test_correct: torch.Tensor,
    step_costs: CostsLike,
    *,
    budgets: FloatSeq | None = None,
    ps: FloatSeq | None = None,
    flat_rule: bool = True,
) -> list[dict[str, Any]]:
    """Budgeted-batch accuracy against cost: fit thresholds on the validation split, evaluate on test.

    With ``budgets`` (absolute mean costs), each row solves ``p`` from its budget
    (:func:`fit_policy`) and reports that budget. Otherwise each ``p`` of ``ps`` (default
    :func:`p_grid`, the official code's sweep) is used directly and the row's ``"budget"`` is the
    model's expected mean cost ``average_cost(p)``. Giving both is an error. Rows:
    ``{"p", "budget", "accuracy", "mean_cost", "mean_cost_fraction"}`` (the last three measured on
    the test split).
    """
    if budgets is not None and ps is not None:
        raise ValueError("give budgets or ps, not both")
    costs = _costs(step_costs)
    vs = _scores(val_scores)
    vc = _correct(val_correct, vs.shape)
    ts = _scores(test_scores)
    tc = _correct(test_correct, ts.shape)
    n_exits = vs.shape[0]
    if ts.shape[0] != n_exits or len(costs) != n_exits:
        raise ValueError(f"exit counts differ: val {n_exits}, test {ts.shape[0]}, step costs {len(costs)}")
    settings: list[tuple[float, float]] = []  # (p, budget)
    if budgets is not None:
        settings = [(solve_exit_probability(b, costs), float(b)) for b in budgets]
    else:
        settings = [(float(p), average_cost(p, costs)) for p in (p_grid() if ps is None else ps)]
    rows = []
    for p, budget in settings:
        thresholds = fit_thresholds(vs, vc, exit_fractions(p, n_exits), flat_rule=flat_rule)
        res = evaluate_policy(ts, tc, thresholds, costs)
        rows.append(
            {
                "p": p,
                "budget": budget,
                "accuracy": res["accuracy"],
                "mean_cost": res["mean_cost"],
                "mean_cost_fraction": res["mean_cost_fraction"],
            }
        )
    return rows
