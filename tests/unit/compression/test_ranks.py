import itertools

import pytest
import torch

from worker.compression.ranks import allocate_ranks, budget_from_fraction, rank_cap, resolve_budget


def removed(sigmas: dict[str, torch.Tensor], ranks: dict[str, int]) -> float:
    """Error removed by an allocation: sum of the top sigma^2 of each module."""
    return sum(float((sigmas[m][:r].double() ** 2).sum()) for m, r in ranks.items())


def cost(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    return sum(r * sum(shapes[m]) for m, r in ranks.items())


def brute_force(sigmas, shapes, budget, max_rank):
    """Best allocation by enumerating every rank combination."""
    names = sorted(shapes)
    limits = [min(max_rank, rank_cap(*shapes[m]), sigmas[m].numel()) for m in names]
    best = None
    for combo in itertools.product(*(range(k + 1) for k in limits)):
        ranks = dict(zip(names, combo))
        if cost(shapes, ranks) <= budget:
            value = removed(sigmas, ranks)
            if best is None or value > best[0]:
                best = (value, ranks)
    return best


def random_sigmas(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        m: torch.sort(torch.rand(min(shape), generator=gen) * (i + 1), descending=True).values
        for i, (m, shape) in enumerate(shapes.items())
    }


def test_equal_costs_match_brute_force():
    # Equal costs: greedy by gain is exactly optimal (the best k units of a concave sequence).
    shapes = {"a": (12, 8), "b": (10, 10), "c": (8, 12)}  # rank caps 4
    sigmas = random_sigmas(shapes, seed=0)
    for budget in range(0, 20 * 14, 14):
        ranks = allocate_ranks(sigmas, shapes, budget, max_rank=3)
        best_value, _ = brute_force(sigmas, shapes, budget, max_rank=3)
        assert removed(sigmas, ranks) == pytest.approx(best_value, rel=1e-12)


def test_mixed_costs_near_brute_force():
    # 0/1 knapsack with unequal costs: greedy by gain per parameter can leave at most one unit's
    # gain on the table (the classic bound); on most budgets it is exactly optimal.
    shapes = {"q": (8, 8), "up": (16, 8), "down": (8, 16), "o": (4, 8)}  # rank caps 3, 5, 5, 2
    sigmas = random_sigmas(shapes, seed=1)
    max_gain = max(float(s[0]) ** 2 for s in sigmas.values())
    exact = 0
    budgets = range(0, 240, 10)
    for budget in budgets:
        ranks = allocate_ranks(sigmas, shapes, budget, max_rank=4)
        best_value, _ = brute_force(sigmas, shapes, budget, max_rank=4)
        assert cost(shapes, ranks) <= budget
        assert best_value - max_gain - 1e-12 <= removed(sigmas, ranks) <= best_value + 1e-12
        exact += removed(sigmas, ranks) == pytest.approx(best_value, rel=1e-12)
    assert exact >= len(budgets) * 2 // 3  # measured 18 of 24; misses are at the budget's edge


def test_budget_and_max_rank_are_respected():
    kinds = (("q", (64, 64)), ("up", (128, 64)), ("down", (64, 128)))
    shapes = {f"layers.{i}.{kind}": shape for i in range(3) for kind, shape in kinds}
    sigmas = random_sigmas(shapes, seed=2)
    for budget in (0, 191, 5000, 40000, 10**9):
        ranks = allocate_ranks(sigmas, shapes, budget, max_rank=16)
        assert set(ranks) == set(shapes)
        assert cost(shapes, ranks) <= budget
        assert max(ranks.values()) <= 16
    assert all(r == 16 for r in allocate_ranks(sigmas, shapes, 10**9, max_rank=16).values())


def test_rank_bounded_by_given_singular_values_and_zero_gains_skipped():
    shapes = {"a": (8, 8), "b": (8, 8)}
    sigmas = {"a": torch.tensor([3.0, 1.0, 0.0, 0.0]), "b": torch.tensor([2.0])}
    assert allocate_ranks(sigmas, shapes, 10**6, max_rank=512) == {"a": 2, "b": 1}


def test_deterministic_tie_break_by_name():
    shapes = {"z.proj": (8, 8), "a.proj": (8, 8)}
    sigmas = {"z.proj": torch.tensor([1.0, 0.5]), "a.proj": torch.tensor([1.0, 0.5])}
    ranks = allocate_ranks(sigmas, shapes, budget_params=16 * 3, max_rank=512)  # three units for four equal ones
    reordered = allocate_ranks(dict(reversed(sigmas.items())), dict(reversed(shapes.items())), 16 * 3, max_rank=512)
    assert ranks == reordered == {"z.proj": 1, "a.proj": 2}


def test_budget_from_fraction():
    shapes = {"a": (10, 20), "b": (30, 10)}
    assert budget_from_fraction(0.1, shapes) == 50
    with pytest.raises(ValueError):
        budget_from_fraction(-0.1, shapes)
    with pytest.raises(ValueError):
        allocate_ranks({}, shapes, -1, max_rank=512)


def test_floor_then_greedy_is_optimal_among_allocations_above_the_floor():
    # Equal costs: after the floor, greedy is again the best choice of the remaining units.
    shapes = {"a": (12, 8), "b": (10, 10), "c": (8, 12)}  # rank caps 4
    sigmas = random_sigmas(shapes, seed=3)
    for budget in range(3 * 20, 20 * 14, 14):
        ranks = allocate_ranks(sigmas, shapes, budget, max_rank=4, min_rank=1)
        assert min(ranks.values()) >= 1 and cost(shapes, ranks) <= budget
        names = sorted(shapes)
        best = max(
            removed(sigmas, dict(zip(names, combo)))
            for combo in itertools.product(range(1, 5), repeat=3)  # max_rank 4 = the rank caps
            if cost(shapes, dict(zip(names, combo))) <= budget
        )
        assert removed(sigmas, ranks) == pytest.approx(best, rel=1e-12)


def test_floor_changes_a_skewed_allocation_and_is_capped_by_the_spectrum():
    shapes = {"loud": (16, 16), "quiet": (16, 16), "empty": (16, 16)}
    sigmas = {"loud": torch.tensor([9.0, 8.0, 7.0, 6.0]), "quiet": torch.tensor([1.0, 0.5, 0.2, 0.1]),
              "empty": torch.tensor([0.0, 0.0])}
    assert allocate_ranks(sigmas, shapes, 32 * 4, max_rank=512) == {"loud": 4, "quiet": 0, "empty": 0}
    # the floor buys 2 units each where there is error to remove (none for "empty"), greedy the rest
    assert allocate_ranks(sigmas, shapes, 32 * 4, min_rank=2, max_rank=512) == {"loud": 2, "quiet": 2, "empty": 0}
    assert allocate_ranks(sigmas, shapes, 32 * 5, min_rank=2, max_rank=512) == {"loud": 3, "quiet": 2, "empty": 0}


def test_budget_below_the_floor_is_refused():
    shapes = {"a": (8, 8), "b": (8, 8)}
    sigmas = {"a": torch.ones(4), "b": torch.ones(4)}
    with pytest.raises(ValueError, match="cannot give every module min_rank 2"):
        allocate_ranks(sigmas, shapes, 16 * 3, min_rank=2, max_rank=512)
    with pytest.raises(ValueError, match="min_rank must be >= 0"):
        allocate_ranks(sigmas, shapes, 100, min_rank=-1, max_rank=512)


def test_rank_cap_is_the_largest_rank_cheaper_than_the_dense_delta():
    # 64x64: crossover 32 exactly; rank 32 costs 4096 = the dense delta, so 31
    assert rank_cap(64, 64) == 31 and 31 * 128 < 64 * 64 <= 32 * 128
    assert rank_cap(128, 64) == rank_cap(64, 128) == 42  # crossover 42.67
    assert rank_cap(576, 1536) == 418  # SmolLM2 down_proj: crossover 418.9
    for d_out, d_in in ((1, 1), (1, 7), (3, 5), (576, 576), (192, 576)):
        r = rank_cap(d_out, d_in)
        assert r * (d_out + d_in) < d_out * d_in <= (r + 1) * (d_out + d_in)


def test_a_budget_beyond_the_caps_stops_at_the_caps():
    shapes = {"q": (64, 64), "up": (128, 64)}
    sigmas = {"q": torch.linspace(2, 1, 64), "up": torch.linspace(2, 1, 64)}
    assert allocate_ranks(sigmas, shapes, 10**15, max_rank=512) == {"q": 31, "up": 42}


def test_resolve_budget_takes_params_or_a_fraction_and_refuses_neither():
    shapes = {"a": (64, 32), "b": (16, 48)}  # 2048 + 768 = 2816 weights
    assert resolve_budget(1000, None, shapes) == 1000
    assert resolve_budget(None, 0.5, shapes) == budget_from_fraction(0.5, shapes) == 1408
    with pytest.raises(ValueError, match="needs budget_params or budget_fraction, got neither"):
        resolve_budget(None, None, shapes)
