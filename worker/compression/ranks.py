"""Global rank allocation: spend a parameter budget on the adapter ranks that remove the most error.

Rank unit i of module m costs d_out + d_in parameters (one column of B, one row of A) and removes
sigma_i^2 of m's error, where sigma are the singular values of the decomposition its adapter is cut
from (worker.linear_compress.compensation_spectrum): for exact EoRA exactly the drop in
calibration-weighted output error, for damped EoRA the drop under the damped Gram it minimises. Per module the sigma are
descending, so gains per parameter fall monotonically and a greedy pass in global order of
gain per parameter gives each module a contiguous prefix of ranks.

An optional floor (min_rank) is bought first for every module, uniformly; the greedy pass then
spends what is left. The greedy criterion is local (each module's own error), so a floor trades some
of its optimum for robustness against modules whose local error understates their effect downstream.
"""

from __future__ import annotations

from torch import Tensor


def rank_cap(d_out: int, d_in: int) -> int:
    """Largest useful adapter rank of a (d_out, d_in) Linear: the largest r with r (d_out + d_in) <
    d_out d_in parameters, i.e. strictly below the dense-delta crossover d_out d_in / (d_out + d_in).

    At or above the crossover the factors B, A hold at least as many numbers as the dense delta
    dW itself (which would be exact): a rank there is wasted bytes. Strictly below, not floor: at an
    integer crossover (square d x d, r = d/2) the two cost the same and the dense delta wins. Counted
    in parameters, as stored in the same dtype; quantized adapters (adapter_bits) keep the same cap.
    """
    return (d_out * d_in - 1) // (d_out + d_in)


def budget_from_fraction(fraction: float, shapes: dict[str, tuple[int, int]]) -> int:
    """Parameter budget as a fraction of the compensated Linears' own parameter count (floor)."""
    if fraction < 0:
        raise ValueError(f"budget fraction must be >= 0, got {fraction}")
    return int(fraction * sum(d_out * d_in for d_out, d_in in shapes.values()))


def resolve_budget(budget_params: int | None, budget_fraction: float | None,
                   shapes: dict[str, tuple[int, int]]) -> int:
    """The budget in parameters: given as such, or as a fraction of the Linears' own parameters."""
    if budget_params is not None:
        return budget_params
    if budget_fraction is None:
        raise ValueError("a rank budget needs budget_params or budget_fraction, got neither")
    return budget_from_fraction(budget_fraction, shapes)


def rank_limits(singular_values: dict[str, Tensor], shapes: dict[str, tuple[int, int]],
                max_rank: int) -> dict[str, int]:
    """The most rank each module can usefully take: min(max_rank, rank_cap, its positive sigmas)."""
    return {name: min(max_rank, rank_cap(*shapes[name]), int((sigmas > 0).sum()))
            for name, sigmas in singular_values.items()}


def allocate_ranks(
    singular_values: dict[str, Tensor],
    shapes: dict[str, tuple[int, int]],
    budget_params: int,
    max_rank: int,
    min_rank: int = 0,
) -> dict[str, int]:
    """Rank per module (every module in shapes, 0 when it gets none) within budget_params.

    Candidates are sorted by (gain per parameter descending, module name, index), so the result
    is deterministic; a unit that no longer fits is skipped and cheaper units may still be taken.
    Units with zero gain are never bought. Ranks never exceed max_rank, rank_cap(d_out, d_in) or
    the number of singular values given. Every module first gets min(min_rank, its positive singular
    values, its limit); a budget that cannot pay for that floor is refused (ValueError).
    """
    if budget_params < 0:
        raise ValueError(f"budget must be >= 0 parameters, got {budget_params}")
    missing = set(singular_values) - set(shapes)
    if missing:
        raise ValueError(f"singular values given for modules without a shape: {sorted(missing)}")
    if min_rank < 0:
        raise ValueError(f"min_rank must be >= 0, got {min_rank}")
    candidates: list[tuple[float, str, int]] = []
    ranks = dict.fromkeys(shapes, 0)
    limits = rank_limits(singular_values, shapes, max_rank)
    for name, sigmas in singular_values.items():
        cost = sum(shapes[name])
        values = sorted((float(s) for s in sigmas.flatten() if s > 0), reverse=True)[: limits[name]]
        ranks[name] = min(min_rank, len(values))
        candidates.extend((-(s * s) / cost, name, i) for i, s in enumerate(values) if i >= ranks[name])
    floor_cost = sum(r * sum(shapes[name]) for name, r in ranks.items())
    if floor_cost > budget_params:
        raise ValueError(f"a budget of {budget_params:,} parameters cannot give every module min_rank "
                         f"{min_rank} (that takes {floor_cost:,})")
    candidates.sort()
    left = budget_params - floor_cost
    for _, name, _ in candidates:
        cost = sum(shapes[name])
        if cost <= left:
            ranks[name] += 1
            left -= cost
    return ranks
