"""The job spec as the worker's plan: the HTTP JobSpec's quantization, sparsity and compensation mapped
one-to-one onto the compression math's typed specs (compression_plan, the one spec-to-plan mapping), the
checks that a plan fits the model before any work (check_plan_fits), and a size target's plan: the options
it may choose from (size_target) and the plan meeting it (plan_for_job_target).
"""

from __future__ import annotations

import time

from app.jobs.spec import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    Compensation,
    JobSpec,
    Quantization,
    RankBudget,
    Sparsity,
    Target,
)
from app.settings import Settings
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec
from worker.errors import JobFailure
from worker.summaries import planning_summary


def quant_spec(q: Quantization) -> QuantSpec:
    """With a size target the spec has no bits or group size: the defaults stand in until plan_for_target
    chooses them for every Linear."""
    return QuantSpec(method=q.method, bits=q.bits or DEFAULT_BITS, group_size=q.group_size or DEFAULT_GROUP_SIZE,
                     symmetric=q.symmetric, damp=q.damp, act_order=q.act_order)


def sparsity_spec(s: Sparsity) -> SparsitySpec:
    n, m = s.nm or (None, None)
    return SparsitySpec(method=s.method, ratio=s.ratio, n=n, m=m)


def compensation_spec(c: Compensation, max_rank: int) -> CompensationSpec | None:
    """None for method 'none'. max_rank: the server's Settings.max_rank."""
    if c.method == "none":
        return None
    budget = c.rank_budget
    # A size target's spec has neither rank nor budget: rank 1 stands in until plan_for_target chooses each Linear's.
    rank = 1 if c.rank is None and budget is None else c.rank
    return CompensationSpec(
        method=c.method, rank=rank, budget_params=None if budget is None else budget.params,
        budget_fraction=None if budget is None else budget.fraction, max_rank=max_rank, adapter_bits=c.adapter_bits,
        budget_criterion=RankBudget.model_fields["criterion"].default if budget is None else budget.criterion,
        min_rank=0 if budget is None else budget.min_rank, damp=c.damp, sink_tokens=c.sink_tokens,
        refine=c.refine)


def compression_plan(spec: JobSpec, max_rank: int):
    """The job spec as the compression math's plan: the one spec-to-plan mapping (the job spec owns the
    defaults; bench/ and tests build plans through this or say every value). max_rank: Settings.max_rank."""
    from worker.plan import CompressionPlan

    too_high = spec.compensation.above_max_rank(max_rank) if spec.compensation is not None else None
    if too_high is not None:
        raise JobFailure(": ".join(too_high))
    return CompressionPlan(
        quant=None if spec.quantization is None else quant_spec(spec.quantization),
        sparsity=None if spec.sparsity is None else sparsity_spec(spec.sparsity),
        compensation=None if spec.compensation is None else compensation_spec(spec.compensation, max_rank))


def check_plan_fits(model, arch, plan) -> None:
    """Refuse before any work when a group size or N:M block does not divide a layer's input width, or a
    rank budget cannot pay for its min_rank floor."""
    from worker.compression.ranks import rank_cap, resolve_budget
    from worker.models import decoder_linears

    linears = decoder_linears(model, arch)
    widths = sorted({linear.in_features for name, linear in linears.items() if name not in plan.module_quant})
    spec = plan.compensation
    if plan.uses_budget and spec.min_rank:
        shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
        budget = resolve_budget(spec.budget_params, spec.budget_fraction, shapes)
        floor = sum(min(spec.min_rank, spec.max_rank, rank_cap(*shape)) * sum(shape) for shape in shapes.values())
        if floor > budget:
            raise JobFailure(f"compensation.rank_budget.min_rank {spec.min_rank} on all {len(shapes)} Linears takes "
                             f"{floor:,} adapter parameters, more than the budget of {budget:,}")
    if plan.quant is not None and plan.quant.group_size != -1:
        bad = [w for w in widths if w % plan.quant.group_size]
        if bad:
            raise JobFailure(
                f"quantization.group_size {plan.quant.group_size} does not divide the input width {bad[0]} of "
                f"this model's Linear layers (widths: {widths}); choose a common divisor or -1 (per channel)")
    if plan.sparsity is not None and plan.sparsity.m is not None:
        bad = [w for w in widths if w % plan.sparsity.m]
        if bad:
            raise JobFailure(f"sparsity.pattern {plan.sparsity.n}:{plan.sparsity.m} needs input widths divisible "
                             f"by {plan.sparsity.m}; this model has {bad[0]}")


# A size target's options. Group sizes: not 32 (fp16 scales cost 0.5 bits per weight there, and SmolLM2, the
# benchmark model, sits on a 4-bit group-32 grid that would flatter it); RTN measures the error curves (one
# rounding per option; the job then runs its own quantizer on the chosen one). Adapter precisions (None: fp16
# factors) where the job compensates and fixes no compensation.adapter_bits; vLLM holds adapters in fp16, so
# a vLLM target offers fp16 only.
TARGET_BITS = (2, 3, 4, 8)
TARGET_GROUP_SIZES = (64, 128, -1)
TARGET_ADAPTER_BITS = (None, 8, 4)


def size_target(target: Target, plan, max_rank: int):
    """The job's target as the worker's SizeTarget: what the engine loads, ranks up to the server's max_rank,
    the adapter precisions the plan (the job's compression_plan) leaves open."""
    from worker.engines import VLLM_LORA_RANKS, VLLM_WNA16_BITS
    from worker.target import SizeTarget

    compensates = plan.compensates
    ranks = (0, *(r for r in VLLM_LORA_RANKS if r <= max_rank)) if compensates else (0,)
    if not compensates or target.engine == "vllm":
        adapter_bits: tuple[int | None, ...] = (None,)
    elif plan.compensation.adapter_bits is not None:
        adapter_bits = (plan.compensation.adapter_bits,)
    else:
        adapter_bits = TARGET_ADAPTER_BITS
    return SizeTarget(bits_per_weight=target.bits_per_weight, engine=target.engine,
                      bits=VLLM_WNA16_BITS if target.engine == "vllm" else TARGET_BITS,
                      group_sizes=TARGET_GROUP_SIZES, ranks=ranks, adapter_bits=adapter_bits, measure_with="rtn")


def plan_for_job_target(model, calibration, plan, spec: JobSpec, settings: Settings, device, reporter,
                        n_layers: int, placement):
    """(the plan meeting spec.target, what the job shows of it); an impossible target fails the job.
    placement: where the measuring walk keeps its activations (the job's worker.activations.Placement)."""
    from worker.target import TargetError, plan_for_target

    target = size_target(spec.target, plan, settings.max_rank)
    reporter.progress("planning", 6.0, layer=0, layers=n_layers,
                      message=f"measuring every Linear's options for {target.bits_per_weight:g} bits per weight")
    t0 = time.perf_counter()
    try:
        chosen = plan_for_target(model, calibration, plan, target, device, placement=placement)
    except TargetError as exc:
        raise JobFailure(str(exc)) from None
    allocation = chosen.allocation
    info = {**planning_summary(target, chosen), "seconds": round(time.perf_counter() - t0, 3)}
    reporter.event("planning", f"plan for {target.bits_per_weight:g} bits per weight: {allocation.bytes:,} of "
                   f"{chosen.budget:,} bytes ({chosen.bits_per_weight:.4f} bits per weight), "
                   f"{'optimal' if allocation.exact else f'within {allocation.gap:.3g} of the optimum'}",
                   data={k: v for k, v in info.items() if k != "modules"})
    return chosen.plan, info
