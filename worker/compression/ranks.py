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


def budget_from_fraction(fraction: float, shapes: dict[str, tuple[int, int]]) -> int:
    """Parameter budget as a fraction of the compensated Linears' own parameter count (floor)."""
    if fraction < 0:
        raise ValueError(f"budget fraction must be >= 0, got {fraction}")
    return int(fraction * sum(d_out * d_in for d_out, d_in in shapes.values()))


def resolve_budget(budget_params: int | None, budget_fraction: float | None,
                   shapes: dict[str, tuple[int, int]]) -> int:
    """The budget in parameters: given as such, or as a fraction of the Linears' own parameters."""
    return budget_params if budget_params is not None else budget_from_fraction(budget_fraction, shapes)


def allocate_ranks(
    singular_values: dict[str, Tensor],
    shapes: dict[str, tuple[int, int]],
    budget_params: int,
    max_rank: int = 512,
    min_rank: int = 0,
) -> dict[str, int]:
    """Rank per module (every module in shapes, 0 when it gets none) within budget_params.

    Candidates are sorted by (gain per parameter descending, module name, index), so the result
    is deterministic; a unit that no longer fits is skipped and cheaper units may still be taken.
    Units with zero gain are never bought. Ranks never exceed max_rank, min(d_out, d_in) or the
    number of singular values given. Every module first gets min(min_rank, its positive singular
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
    for name, sigmas in singular_values.items():
        d_out, d_in = shapes[name]
        cost = d_out + d_in
        limit = min(max_rank, d_out, d_in, sigmas.numel())
        values = [s for s in sorted((float(s) for s in sigmas.flatten()), reverse=True)[:limit] if s > 0]
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
