"""The budget allocator against brute force over every combination, on random small instances."""

from __future__ import annotations

import itertools
import random

import pytest

from worker.compression.allocate import Candidate, InfeasibleBudget, allocate, lower_hull


def random_instance(seed: int, modules: int, most: int) -> tuple[dict, dict]:
    """Error curves of the shape a real module has (more bytes, mostly less error) plus noise: some
    candidates dominated, some off the convex hull, a few with equal bytes."""
    rng = random.Random(seed)
    candidates, weights = {}, {}
    for m in range(modules):
        count = rng.randint(1, most)
        options = []
        for _ in range(count):
            size = rng.randint(1, 40)
            options.append(Candidate(bytes=size, error=rng.uniform(0, 2) / size + rng.uniform(0, 0.05)))
        candidates[f"m{m}"] = options
        weights[f"m{m}"] = rng.choice([0.0, rng.uniform(0.1, 3.0), rng.uniform(0.1, 3.0)])
    return candidates, weights


def brute_force(candidates: dict, weights: dict, budget: int) -> float | None:
    best = None
    names = list(candidates)
    for picks in itertools.product(*(range(len(candidates[n])) for n in names)):
        spent = sum(candidates[n][i].bytes for n, i in zip(names, picks, strict=True))
        if spent <= budget:
            error = sum(weights[n] * candidates[n][i].error for n, i in zip(names, picks, strict=True))
            best = error if best is None else min(best, error)
    return best


def budgets(candidates: dict) -> list[int]:
    low = sum(min(c.bytes for c in options) for options in candidates.values())
    high = sum(max(c.bytes for c in options) for options in candidates.values())
    return sorted({low, high, *range(low, high + 1, max(1, (high - low) // 7))})


@pytest.mark.parametrize("seed", range(12))
def test_the_allocation_is_the_brute_force_optimum(seed):
    candidates, weights = random_instance(seed, modules=4 + seed % 3, most=5)
    for budget in budgets(candidates):
        allocation = allocate(candidates, weights, budget)
        optimum = brute_force(candidates, weights, budget)
        spent = sum(candidates[n][i].bytes for n, i in allocation.choice.items())
        error = sum(weights[n] * candidates[n][i].error for n, i in allocation.choice.items())
        assert allocation.exact and allocation.gap == 0.0
        assert spent == allocation.bytes <= budget
        assert error == pytest.approx(optimum, rel=1e-12, abs=1e-15) and allocation.error == pytest.approx(error)
        assert allocation.lower_bound <= optimum + 1e-12


@pytest.mark.parametrize("seed", range(12))
def test_the_lagrangian_plan_alone_is_feasible_and_its_gap_is_certified(seed):
    """With the exact search cut off (max_states=0): the LP plan fits, and lower_bound <= optimum <= its
    error, so gap bounds its excess over the optimum. It is exact only where every hull step fitted."""
    candidates, weights = random_instance(100 + seed, modules=5, most=6)
    excess = []
    for budget in budgets(candidates):
        allocation = allocate(candidates, weights, budget, max_states=0)
        optimum = brute_force(candidates, weights, budget)
        assert allocation.bytes <= budget
        assert not allocation.exact or allocation.error == allocation.lower_bound  # every step fitted
        assert allocation.lower_bound <= optimum + 1e-12 <= allocation.error + 2e-12
        assert allocation.error - optimum <= allocation.gap + 1e-12
        excess.append(allocation.error - optimum)
    assert min(excess) <= 1e-12  # at the largest budget every module takes its least error: the LP plan is optimal


def test_the_lagrangian_plan_needs_the_exact_search_somewhere():
    """Over these instances the LP plan is sometimes not optimal (so the exact search does real work)
    and the exact search always is."""
    worse = 0
    for seed in range(30):
        candidates, weights = random_instance(200 + seed, modules=4, most=5)
        for budget in budgets(candidates):
            greedy = allocate(candidates, weights, budget, max_states=0).error
            worse += greedy > brute_force(candidates, weights, budget) + 1e-12
    assert worse > 0


def test_an_infeasible_budget_names_the_smallest_plan():
    candidates = {"a": [Candidate(10, 1.0), Candidate(4, 3.0)], "b": [Candidate(7, 0.5), Candidate(20, 0.1)]}
    weights = {"a": 1.0, "b": 1.0}
    with pytest.raises(InfeasibleBudget, match="a budget of 10 bytes cannot be met: the smallest plan takes 11 bytes") \
            as raised:
        allocate(candidates, weights, 10)
    assert raised.value.smallest == 11
    assert allocate(candidates, weights, 11).choice == {"a": 1, "b": 0}


def test_ties_are_broken_the_same_way_every_time():
    candidates = {f"m{i}": [Candidate(1, 1.0), Candidate(2, 0.0)] for i in range(4)}
    weights = dict.fromkeys(candidates, 1.0)
    choices = {tuple(allocate(candidates, weights, 6).choice.values()) for _ in range(3)}
    assert choices == {(0, 0, 1, 1)}  # equal error and bytes: the smallest indices in module order


def test_the_lower_hull_drops_dominated_and_concave_points():
    options = [(1, 10.0), (2, 9.5), (3, 4.0), (3, 5.0), (4, 4.0), (6, 1.0), (8, 0.9), (9, 0.0)]
    # (2, 9.5) lies above the chord from (1, 10) to (3, 4); (3, 5) and (4, 4) are dominated;
    # (8, 0.9) lies above the chord from (6, 1) to (9, 0).
    assert lower_hull(options) == [0, 2, 5, 7]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="m: no candidate"):
        allocate({"m": []}, {"m": 1.0}, 10)
    with pytest.raises(ValueError, match="must be >= 0"):
        allocate({"m": [Candidate(1, float("nan"))]}, {"m": 1.0}, 10)


def test_a_model_sized_instance_is_solved_exactly():
    """210 modules of 60 candidates (a SmolLM2-sized choice, too large for brute force): the Lagrangian
    bounds keep the exact search small enough to finish, and its plan is no worse than the LP plan's."""
    candidates, weights = random_instance(7, modules=210, most=60)
    low = sum(min(c.bytes for c in options) for options in candidates.values())
    high = sum(max(c.bytes for c in options) for options in candidates.values())
    for budget in (low + (high - low) // 5, low + (high - low) // 2):
        exact = allocate(candidates, weights, budget)
        lp_plan = allocate(candidates, weights, budget, max_states=0)
        assert exact.exact and exact.bytes <= budget
        assert exact.lower_bound - 1e-9 <= exact.error <= lp_plan.error + 1e-12
