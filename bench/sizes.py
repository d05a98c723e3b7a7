"""How the benchmarks count storage: effective bits per weight of the decoder Linears, split by what they
pay for (codes, scales and zero points, 2:4 metadata, adapters) and by Linear kind, from a plan and what
its run reported. Every row of docs/bench/runs/ carries these (bench.common.run_config)."""

from __future__ import annotations

from worker.linear_compress import adapter_served_bytes
from worker.plan import CompressionPlan, CompressionResult

DENSE_BITS = 16  # an uncompressed weight stored in fp16/bf16 (the fp32 reference is a compute choice)
SCALE_BITS = 16  # one fp16 scale per quantization group
MASK_BITS = 1  # 2:4 metadata: compressed-tensors' sparse-24 bitmask, 1 bit per (dense) weight


def bits_per_weight(plan: CompressionPlan, shapes: dict[str, tuple[int, int]], result: CompressionResult | None) -> dict:
    """Effective storage bits per weight of the decoder Linears, split by what they pay for.

    - codes: `bits` per stored weight of each Linear's quantizer (plan.quant_for: per-module quantizers
      count for their modules); a 2:4 model stores only the kept half (values or codes); dense weights
      without quantization count DENSE_BITS (fp16).
    - scales/zeros: per group of `group_size` input columns (per channel: the whole row), an fp16 scale
      plus, asymmetric, a zero point packed at `bits` bits (GPTQ / compressed-tensors pack-quantized style).
    - sparsity metadata: 2:4 as a 1-bit-per-weight bitmask (compressed-tensors sparse-24-bitmask;
      NVIDIA's 2-bit index per kept weight costs the same).
    - adapters: the adapter file's bytes (fp16: 2 bytes/param; adapter_bits: packed codes and zero
      points plus an fp16 scale per adapter group; the export checks its file holds exactly these);
      "adapters_served" is what vLLM holds in memory (fp16 whatever is stored). Per-module ranks and
      adapter precisions (a size target's module_adapter_bits) count through each module's reported
      adapter bytes, each at its own stored precision.
    """
    weights = sum(d_out * d_in for d_out, d_in in shapes.values())
    by_cost: dict[tuple[float, float], int] = {}  # summed per cost, so one quantizer gives its bits exactly
    for name, (d_out, d_in) in shapes.items():
        cost = weight_bits(plan, name, d_in)
        by_cost[cost] = by_cost.get(cost, 0) + d_out * d_in
    codes = sum(n * c for (c, _), n in by_cost.items()) / weights
    scales = sum(n * s for (_, s), n in by_cost.items()) / weights
    mask = MASK_BITS if plan.sparsity is not None else 0.0
    adapters = 8 * result.adapter_bytes / weights if result is not None else 0.0
    served = 8 * adapter_served_bytes(result.adapter_params) / weights if result is not None else 0.0
    return {
        "codes": codes,
        "scales_zeros": scales,
        "sparsity_metadata": mask,
        "adapters": adapters,  # stored: what the adapter file holds
        "total": codes + scales + mask + adapters,
        "adapters_served": served,  # in an engine's memory: fp16, whatever is stored
        "total_served_adapter": codes + scales + mask + served,
        "linear_weights": weights,
    }


def weight_bits(plan: CompressionPlan, name: str, d_in: int) -> tuple[float, float]:
    """(codes, scales and zero points) in bits per weight of the Linear `name`, d_in wide (see bits_per_weight)."""
    kept = 1.0
    if plan.sparsity is not None:
        if not plan.sparsity.is_nm:
            raise ValueError("bits accounting covers N:M sparsity only")
        kept = plan.sparsity.n / plan.sparsity.m
    quant = plan.quant_for(name)
    if quant is None:
        return kept * DENSE_BITS, 0.0
    group = d_in if quant.group_size == -1 else quant.group_size
    return kept * quant.bits, (SCALE_BITS + (0 if quant.symmetric else quant.bits)) / group


def bits_by_kind(plan: CompressionPlan, shapes: dict[str, tuple[int, int]], result: CompressionResult) -> dict:
    """bits_per_weight's total split by Linear kind (q_proj, ..., down_proj): per kind what its weights
    (codes, scales, zero points, 2:4 mask) and its adapters (stored) add to the total, in bits per weight
    of all decoder Linears, so the kinds' "weights" + "adapters" sum to the total."""
    weights = sum(d_out * d_in for d_out, d_in in shapes.values())
    mask = MASK_BITS if plan.sparsity is not None else 0.0
    kinds: dict[str, dict] = {}
    for name, (d_out, d_in) in shapes.items():
        row = kinds.setdefault(name.rsplit(".", 1)[1], {"linear_weights": 0, "weights": 0.0, "adapters": 0.0})
        row["linear_weights"] += d_out * d_in
        row["weights"] += d_out * d_in * (sum(weight_bits(plan, name, d_in)) + mask) / weights
        row["adapters"] += 8 * result.modules[name].adapter_bytes / weights
    return kinds
