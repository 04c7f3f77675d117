"""fxexpand.exits.policy: budgeted-batch and anytime early-exit math (BoostNet / MSDNet protocol)."""

import itertools
import json
import math
import os
import random

import pytest
import torch

from fxexpand.demo.early_exits import plot_curves
from fxexpand.exits.policy import (
    Policy,
    anytime_table,
    average_cost,
    budget_curve,
    confidences,
    cumulative_costs,
    evaluate_policy,
    exit_fractions,
    exit_indices,
    fit_policy,
    fit_thresholds,
    p_grid,
    solve_exit_probability,
)


def _random_split(seed: int, n_exits: int = 4, n_samples: int = 400):
    """Continuous (tie-free) confidences and correctness that grows with depth and confidence."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_exits, n_samples, generator=g, dtype=torch.float64)
    skill = torch.linspace(0.3, 0.8, n_exits, dtype=torch.float64)[:, None]
    correct = torch.rand(n_exits, n_samples, generator=g, dtype=torch.float64) < skill * 0.5 + scores * 0.5
    return scores, correct


def _expected_counts(fractions, n_samples):
    counts, left = [], n_samples
    for q in fractions[:-1]:
        k = min(math.floor(q * n_samples + 0.5), left)
        counts.append(k)
        left -= k
    return counts + [left]


# ----------------------------------------------------------------------------- costs and p


def test_cumulative_costs():
    assert cumulative_costs([1.0, 2.0, 3.5]) == [1.0, 3.0, 6.5]
    assert cumulative_costs(torch.tensor([2.0, 2.0])) == [2.0, 4.0]


def test_average_cost_endpoints_and_value():
    costs = [1.0, 2.0, 4.0]
    assert average_cost(0.0, costs) == 7.0
    assert average_cost(1.0, costs) == 1.0
    # p = 0.5: 1 + 0.5 * 2 + 0.25 * 4
    assert average_cost(0.5, costs) == pytest.approx(3.0, abs=1e-15)


def test_average_cost_is_strictly_decreasing():
    costs = [3.0, 1.0, 2.0, 5.0, 0.5]
    values = [average_cost(p, costs) for p in p_grid(200)]
    assert all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("c1,c2", [(1.0, 1.0), (1.0, 3.0), (2.5, 0.7)])
def test_solve_two_exits_closed_form(c1, c2):
    for frac in (0.05, 0.3, 0.5, 0.77, 0.99):
        budget = c1 + frac * c2
        want = 1.0 - (budget - c1) / c2
        assert solve_exit_probability(budget, [c1, c2]) == pytest.approx(want, abs=1e-12)


def test_solve_three_equal_costs_quadratic():
    c = 2.0
    for budget in (2.1, 3.0, 4.5, 5.9):
        # c (1 + x + x^2) = B with x = 1 - p
        x = (-1.0 + math.sqrt(1.0 - 4.0 * (1.0 - budget / c))) / 2.0
        assert solve_exit_probability(budget, [c, c, c]) == pytest.approx(1.0 - x, abs=1e-12)


def test_solve_clamps_both_ends():
    costs = [1.0, 2.0, 3.0]
    assert solve_exit_probability(6.0, costs) == 0.0
    assert solve_exit_probability(100.0, costs) == 0.0
    assert solve_exit_probability(math.inf, costs) == 0.0
    assert solve_exit_probability(1.0, costs) == 1.0
    assert solve_exit_probability(0.5, costs) == 1.0
    assert solve_exit_probability(-3.0, costs) == 1.0
    # a single exit: any budget is either everything at the end or everything at exit 1
    assert solve_exit_probability(5.0, [5.0]) == 0.0
    assert solve_exit_probability(4.0, [5.0]) == 1.0


def test_solve_round_trip_random_costs():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 10)
        costs = [rng.uniform(0.01, 10.0) for _ in range(n)]
        total = sum(costs)
        budget = rng.uniform(costs[0], total)
        p = solve_exit_probability(budget, costs)
        assert 0.0 <= p <= 1.0
        assert average_cost(p, costs) == pytest.approx(budget, abs=1e-9 * total)


def test_solve_is_monotone_in_budget():
    costs = [1.0, 0.5, 2.0, 1.5]
    ps = [solve_exit_probability(b, costs) for b in (1.2, 2.0, 3.0, 4.0, 4.9)]
    assert all(a > b for a, b in itertools.pairwise(ps))


@pytest.mark.parametrize(
    "budget,costs",
    [(1.0, []), (1.0, [1.0, 0.0]), (1.0, [1.0, -2.0]), (1.0, [1.0, math.nan]), (math.nan, [1.0, 2.0])],
)
def test_solve_rejects_bad_input(budget, costs):
    with pytest.raises(ValueError):
        solve_exit_probability(budget, costs)


def test_exit_fractions():
    assert exit_fractions(0.5, 3) == [0.5, 0.25, 0.25]
    assert exit_fractions(0.0, 4) == [0.0, 0.0, 0.0, 1.0]
    assert exit_fractions(1.0, 4) == [1.0, 0.0, 0.0, 0.0]
    assert exit_fractions(0.3, 1) == [1.0]
    for p in p_grid(37):
        for n in (1, 2, 5, 12):
            q = exit_fractions(p, n)
            assert len(q) == n and min(q) >= 0.0
            assert sum(q) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        exit_fractions(1.5, 3)
    with pytest.raises(ValueError):
        exit_fractions(0.5, 0)


def test_p_grid():
    grid = p_grid()
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0
    assert grid[1] == pytest.approx(0.05) and grid[10] == 0.5
    assert p_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_average_cost_matches_expected_cost_of_fractions():
    """C_avg(p) is the mean of C_n under the exit fractions q_n."""
    costs = [1.0, 2.0, 0.5, 4.0]
    cum = cumulative_costs(costs)
    for p in (0.0, 0.1, 0.45, 0.9, 1.0):
        q = exit_fractions(p, len(costs))
        assert average_cost(p, costs) == pytest.approx(sum(a * b for a, b in zip(q, cum)), abs=1e-12)


def test_confidences():
    uniform = torch.zeros(3, 4)
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    conf = confidences([uniform, peaked])
    assert conf.shape == (2, 3)
    assert torch.allclose(conf[0], torch.full((3,), 0.25))
    assert conf[1, 0] == pytest.approx(math.exp(10) / (math.exp(10) + 3), rel=1e-6)
    assert conf[1, 1] == pytest.approx(0.25)
    assert conf[1, 2] == pytest.approx(math.exp(4) / sum(math.exp(k) for k in (1, 2, 3, 4)), rel=1e-6)
    assert torch.equal(confidences(torch.stack([uniform, peaked])), conf)


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("p", [0.05, 0.2, 0.35, 0.6])
def test_fit_thresholds_exact_counts_without_ties(p):
    scores, correct = _random_split(1, n_exits=5, n_samples=1000)
    fractions = exit_fractions(p, 5)
    thr = fit_thresholds(scores, correct, fractions, flat_rule=False)
    assert thr[-1] == -math.inf
    hist = torch.bincount(exit_indices(scores, thr), minlength=5).tolist()
    want = _expected_counts(fractions, 1000)
    assert hist == want
    assert hist[:-1] == [round(q * 1000) for q in fractions[:-1]]  # no half-way cases here
    # each threshold is the smallest confidence among the samples taken there
    idx = exit_indices(scores, thr)
    for n in range(4):
        assert thr[n] == float(scores[n][idx == n].min())


def test_fit_thresholds_rounds_each_exit():
    scores, correct = _random_split(2, n_exits=3, n_samples=10)
    # q = [0.25, 0.35, 0.4]: 2.5 -> 3 (half up), 3.5 -> 4, last takes the 3 left
    thr = fit_thresholds(scores, correct, [0.25, 0.35, 0.4], flat_rule=False)
    assert torch.bincount(exit_indices(scores, thr), minlength=3).tolist() == [3, 4, 3]


def test_fit_thresholds_ties_all_leave_together():
    # exit 1 confidences: 0.9, 0.8, 0.8, 0.8, 0.1 ...; two samples wanted -> the 0.8 tie leaves whole
    s0 = [0.9, 0.8, 0.8, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    s1 = [0.5] * 10
    s2 = [0.5] * 10
    scores = torch.tensor([s0, s1, s2], dtype=torch.float64)
    correct = torch.ones(3, 10, dtype=torch.bool)
    thr = fit_thresholds(scores, correct, [0.2, 0.3, 0.5], flat_rule=False)
    assert thr[0] == 0.8
    idx = exit_indices(scores, thr)
    hist = torch.bincount(idx, minlength=3).tolist()
    assert hist[0] == 4  # target 2, plus the two samples tied at 0.8
    # exit 2 is all ties: its target of 3 takes every remaining sample at 0.5
    assert thr[1] == 0.5 and hist == [4, 6, 0]


def test_fit_thresholds_zero_count_closes_the_exit():
    scores, correct = _random_split(3, n_exits=3, n_samples=50)
    thr = fit_thresholds(scores, correct, [0.0, 0.5, 0.5], flat_rule=False)
    assert thr[0] == math.inf
    assert torch.bincount(exit_indices(scores, thr), minlength=3).tolist() == [0, 25, 25]
    thr = fit_thresholds(scores, correct, exit_fractions(0.0, 3), flat_rule=False)
    assert thr == [math.inf, math.inf, -math.inf]


def test_fit_thresholds_rejects_bad_fractions():
    scores, correct = _random_split(4, n_exits=3, n_samples=20)
    with pytest.raises(ValueError):
        fit_thresholds(scores, correct, [0.5, 0.5])
    with pytest.raises(ValueError):
        fit_thresholds(scores, correct, [0.5, 0.4, 0.4])
    with pytest.raises(ValueError):
        fit_thresholds(scores, correct[:, :5], [0.5, 0.25, 0.25])


def _brute_force_flat(scores, correct, thresholds, costs):
    thr = list(thresholds)
    for n in range(len(thr) - 1):
        base = evaluate_policy(scores, correct, thr, costs)["accuracy"]
        reach = exit_indices(scores, thr) >= n
        cands = sorted({float(v) for v in scores[n][reach] if float(v) < thr[n]})
        for v in cands:  # lowest first
            trial = thr[:n] + [v] + thr[n + 1 :]
            if evaluate_policy(scores, correct, trial, costs)["accuracy"] >= base - 1e-15:
                thr[n] = v
                break
    return thr


@pytest.mark.parametrize("seed", range(6))
def test_flat_rule_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    # quantized scores (ties) on a small split
    scores = torch.randint(0, 8, (3, 30), generator=g).double() / 8
    correct = torch.rand(3, 30, generator=g) < 0.6
    costs = [1.0, 1.0, 1.0]
    fractions = exit_fractions(0.3, 3)
    plain = fit_thresholds(scores, correct, fractions, flat_rule=False)
    assert fit_thresholds(scores, correct, fractions, flat_rule=True) == _brute_force_flat(
        scores, correct, plain, costs
    )


@pytest.mark.parametrize("seed", range(8))
def test_flat_rule_never_hurts_held_out_accuracy_or_cost(seed):
    scores, correct = _random_split(10 + seed, n_exits=5, n_samples=300)
    costs = [1.0, 1.5, 0.7, 2.0, 1.0]
    for p in (0.1, 0.3, 0.6):
        fractions = exit_fractions(p, 5)
        plain = fit_thresholds(scores, correct, fractions, flat_rule=False)
        flat = fit_thresholds(scores, correct, fractions, flat_rule=True)
        a = evaluate_policy(scores, correct, plain, costs)
        b = evaluate_policy(scores, correct, flat, costs)
        assert b["accuracy"] >= a["accuracy"]
        assert b["mean_cost"] <= a["mean_cost"] + 1e-12
        assert all(f <= t for f, t in zip(flat, plain))


def test_flat_rule_lowers_threshold_when_early_exit_is_always_right():
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(3, 200, generator=g, dtype=torch.float64)
    correct = torch.ones(3, 200, dtype=torch.bool)  # exit 1 is always right: no reason to wait
    costs = [1.0, 1.0, 1.0]
    fractions = exit_fractions(0.2, 3)
    plain = fit_thresholds(scores, correct, fractions, flat_rule=False)
    flat = fit_thresholds(scores, correct, fractions, flat_rule=True)
    assert flat[0] < plain[0]
    assert flat[0] == float(scores[0].min())
    res = evaluate_policy(scores, correct, flat, costs)
    assert res["histogram"] == [200, 0, 0]
    assert res["accuracy"] == 1.0 and res["mean_cost"] == 1.0
    assert evaluate_policy(scores, correct, plain, costs)["mean_cost"] > 1.0


def test_flat_rule_keeps_threshold_when_lowering_hurts():
    # exit 1 right exactly on its confident samples, exit 2 always right: lowering exit 1 loses accuracy
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [0.5] * 6], dtype=torch.float64)
    correct = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    fractions = [0.5, 0.5]
    plain = fit_thresholds(scores, correct, fractions, flat_rule=False)
    assert plain == [0.7, -math.inf]
    assert fit_thresholds(scores, correct, fractions, flat_rule=True) == plain
    # ... but a wrong sample that exit 2 also gets wrong may be let out early at no loss
    correct2 = correct.clone()
    correct2[1, 3] = False
    assert fit_thresholds(scores, correct2, fractions, flat_rule=True) == [0.3, -math.inf]


# ----------------------------------------------------------------------------- evaluation


def test_exit_indices_and_evaluate_policy_toy():
    scores = torch.tensor(
        [[0.9, 0.2, 0.6, 0.1], [0.3, 0.8, 0.4, 0.2], [0.1, 0.1, 0.1, 0.1]], dtype=torch.float32
    )
    correct = torch.tensor([[True, False, False, False], [False, True, True, False], [True, True, True, True]])
    thr = [0.6, 0.5, -math.inf]
    assert exit_indices(scores, thr).tolist() == [0, 1, 0, 2]
    res = evaluate_policy(scores, correct, thr, [1.0, 2.0, 1.0])
    # sample 0 right at exit 1 (cost 1), 1 right at exit 2 (3), 2 wrong at exit 1 (1), 3 right at exit 3 (4)
    assert res["accuracy"] == 0.75
    assert res["mean_cost"] == pytest.approx(9.0 / 4)
    assert res["mean_cost_fraction"] == pytest.approx(9.0 / 16)
    assert res["histogram"] == [2, 1, 1] and sum(res["histogram"]) == 4
    # the last exit takes the rest even with a finite threshold
    assert exit_indices(scores, [0.95, 0.95, 0.95]).tolist() == [2, 2, 2, 2]


def test_float32_threshold_selects_exactly():
    scores = torch.tensor([[0.1, 0.7, 0.3, 0.9, 0.5], [0.5] * 5], dtype=torch.float32)
    correct = torch.ones(2, 5, dtype=torch.bool)
    thr = fit_thresholds(scores, correct, [0.4, 0.6], flat_rule=False)
    assert exit_indices(scores, thr).tolist() == [1, 0, 1, 0, 1]


def test_evaluate_policy_histogram_sums_to_samples():
    scores, correct = _random_split(20, n_exits=4, n_samples=333)
    pol = fit_policy(scores, correct, [1.0, 1.0, 1.0, 1.0], 2.2)
    res = evaluate_policy(scores, correct, pol.thresholds, [1.0, 1.0, 1.0, 1.0])
    assert sum(res["histogram"]) == 333 and len(res["histogram"]) == 4


def test_anytime_table_toy():
    correct = torch.tensor([[True, False, False, False], [True, True, False, False], [True, True, True, False]])
    rows = anytime_table(correct, [2.0, 1.0, 1.0])
    assert rows == [
        {"exit": 1, "cost": 2.0, "cost_fraction": 0.5, "accuracy": 0.25},
        {"exit": 2, "cost": 3.0, "cost_fraction": 0.75, "accuracy": 0.5},
        {"exit": 3, "cost": 4.0, "cost_fraction": 1.0, "accuracy": 0.75},
    ]


def test_fit_policy_composes_the_pieces():
    scores, correct = _random_split(21, n_exits=4, n_samples=400)
    costs = [1.0, 2.0, 2.0, 3.0]
    pol = fit_policy(scores, correct, costs, 4.0, flat_rule=False)
    p = solve_exit_probability(4.0, costs)
    assert pol.p == p and pol.budget == 4.0
    assert pol.fractions == exit_fractions(p, 4)
    assert pol.thresholds == fit_thresholds(scores, correct, pol.fractions, flat_rule=False)
    # on the held-out data the realised mean cost is close to the budget (counts are rounded)
    assert evaluate_policy(scores, correct, pol.thresholds, costs)["mean_cost"] == pytest.approx(4.0, abs=0.05)


def test_exit_policy_dict_round_trip_json():
    pol = Policy(thresholds=[0.91, math.inf, 0.5, -math.inf], p=0.25, budget=3.5, fractions=[0.25, 0.1, 0.2, 0.45])
    d = pol.to_dict()
    assert d["thresholds"] == [0.91, "inf", 0.5, None]
    text = json.dumps(d, allow_nan=False)  # strict JSON: no Infinity / NaN tokens
    back = Policy.from_dict(json.loads(text))
    assert back == pol
    assert back.thresholds[-1] == -math.inf and back.thresholds[1] == math.inf
    no_budget = Policy(thresholds=[0.3, -math.inf], p=0.5, budget=None, fractions=[0.5, 0.5])
    assert Policy.from_dict(json.loads(json.dumps(no_budget.to_dict(), allow_nan=False))) == no_budget


def test_budget_curve_rows():
    val_s, val_c = _random_split(30, n_exits=3, n_samples=300)
    test_s, test_c = _random_split(31, n_exits=3, n_samples=200)
    costs = [1.0, 1.0, 2.0]
    rows = budget_curve(val_s, val_c, test_s, test_c, costs, flat_rule=False)
    assert [r["p"] for r in rows] == p_grid()
    assert all(r["budget"] == pytest.approx(average_cost(r["p"], costs)) for r in rows)
    # p = 0: every exit but the last is closed -> full cost and the last exit's accuracy
    assert rows[0]["mean_cost_fraction"] == 1.0 and rows[0]["mean_cost"] == 4.0
    assert rows[0]["accuracy"] == pytest.approx(float(test_c[2].double().mean()))
    for r in rows:
        assert r["mean_cost_fraction"] == pytest.approx(r["mean_cost"] / 4.0)
    budgets = [1.5, 2.5, 3.5]
    rows_b = budget_curve(val_s, val_c, test_s, test_c, costs, budgets=budgets)
    assert [r["budget"] for r in rows_b] == budgets
    assert [r["p"] for r in rows_b] == [solve_exit_probability(b, costs) for b in budgets]
    costs_b = [r["mean_cost"] for r in rows_b]
    assert costs_b == sorted(costs_b)
    with pytest.raises(ValueError):
        budget_curve(val_s, val_c, test_s, test_c, costs, budgets=[2.0], ps=[0.5])


def test_budget_curve_on_the_validation_split_hits_the_budget():
    s, c = _random_split(32, n_exits=3, n_samples=1000)
    costs = [1.0, 1.0, 2.0]
    rows = budget_curve(s, c, s, c, costs, budgets=[1.5, 2.0, 3.0], flat_rule=False)
    for r in rows:
        assert r["mean_cost"] == pytest.approx(r["budget"], abs=0.01)


def test_plot_curves_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    curves = {
        "boosted": [{"mean_cost_fraction": x, "accuracy": 0.5 + 0.4 * x} for x in (0.2, 0.5, 1.0)],
        "baseline": [{"mean_cost_fraction": x, "accuracy": 0.4 + 0.4 * x} for x in (0.2, 0.5, 1.0)],
    }
    anytime = {"boosted": anytime_table(torch.tensor([[True, False], [True, True]]), [1.0, 1.0])}
    out = tmp_path / "curve.png"
    plot_curves(curves, out, anytime=anytime, title="budgeted batch")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert os.listdir(tmp_path) == ["curve.png"]  # no temporary file left behind
