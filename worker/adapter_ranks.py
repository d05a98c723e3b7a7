"""The adapter ranks a compression run settles on, beyond each Linear's own decomposition: a global rank
budget spent across every Linear from the first walk's spectra (allocate_budget; the greedy allocation
itself is worker.compression.ranks), and what the job's notes say about ranks that differ from the
request (rank_notes). worker.sequential calls both between and after its walks.
"""

from __future__ import annotations

from torch import Tensor

from worker.compression.ranks import allocate_ranks, rank_limits, resolve_budget
from worker.compression.specs import CompensationSpec
from worker.plan import CompressionPlan, CompressionResult


def allocate_budget(spec: CompensationSpec, spectra: dict[str, Tensor], objective_norms: dict[str, float],
                    shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, int], int, list[str]]:
    """(each Linear's rank, the budget in parameters, notes for the job) of a rank-budget plan, from each
    Linear's projected singular values and objective_norm(W) (walk 1), by full name."""
    budget = resolve_budget(spec.budget_params, spec.budget_fraction, shapes)
    if spec.budget_criterion == "relative":
        spectra = normalised_spectra(spectra, objective_norms)
    ranks = allocate_ranks(spectra, shapes, budget, max_rank=spec.max_rank, min_rank=spec.min_rank)
    spent = sum(rank * sum(shapes[name]) for name, rank in ranks.items())
    notes = []
    if spent == 0:
        cheapest = min(sum(shape) for shape in shapes.values())
        notes.append(f"compensation.rank_budget: {budget:,} parameters do not pay for one rank of "
                     f"any Linear (the cheapest costs {cheapest:,}): no adapter was made")
    elif ranks == rank_limits(spectra, shapes, spec.max_rank) and spent < budget:
        notes.append(f"compensation.rank_budget: {budget:,} parameters are more than the adapters "
                     f"can use: every Linear got its largest useful rank (below the dense-delta "
                     f"crossover d_out*d_in/(d_out+d_in), at most {spec.max_rank}); "
                     f"{spent:,} spent")
    return ranks, budget, notes


def normalised_spectra(spectra: dict[str, Tensor], objective_norms: dict[str, float]) -> dict[str, Tensor]:
    """sigma_i -> sigma_i / ||W|| (walk 1, in the norm the decomposition minimises the error in; for
    exact EoRA ||W X||): the allocator then buys relative error reduced per parameter."""
    normalised = dict(spectra)
    for name, sigmas in spectra.items():
        norm = objective_norms[name]
        if norm > 0:
            normalised[name] = sigmas / norm
    return normalised


def rank_notes(plan: CompressionPlan, result: CompressionResult, capped: dict[str, int],
               short: dict[str, int]) -> list[str]:
    """What the job's notes say about ranks that differ from the request. capped: fixed ranks at or above
    the dense-delta crossover, name -> the cap given instead; short: adapters with fewer independent error
    directions than their rank, name -> their true rank."""
    notes = []
    if capped:
        caps = sorted({(result.modules[name].shape, cap) for name, cap in capped.items()})
        listed = ", ".join(f"{d_out}x{d_in}: {cap}" for (d_out, d_in), cap in caps)
        notes.append(f"compensation.rank {plan.compensation.rank} is at or above the dense-delta crossover "
                     f"d_out*d_in/(d_out+d_in) of {len(capped)} of {len(result.modules)} Linears, where "
                     f"an adapter holds more numbers than the dense delta itself; capped at the largest rank below "
                     f"it ({listed})")
    if short:
        first = min(short)
        notes.append(f"{len(short)} Linears have fewer independent error directions than the rank given "
                     f"them; their adapters have the true rank (e.g. {first}: {short[first]})")
    if result.max_rank == 0 and not plan.uses_budget:  # budgets say so when allocating
        notes.append("no Linear got an adapter rank: no adapter was made")
    return notes
