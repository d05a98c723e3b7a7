"""What a job shows of its work, as plain numbers for the event log, the metrics and benchmark rows (no
tensors): each layer's and module's errors, ranks and sparsity (layer_summary, module_summary), the whole
compression (compression_summary), and a size target's plan (planning_summary).
"""

from __future__ import annotations

from typing import Any


def planning_summary(target, chosen) -> dict[str, Any]:
    """What a job (and a benchmark row) shows of a size target's plan: the budget, what the plan stores,
    whether the allocation is optimal, the sensitivity used, the time of each planning part, and each
    Linear's bits, group size, rank and adapter precision (adapter_bits, None: fp16 factors or no adapter)."""
    allocation = chosen.allocation
    return {"bits_per_weight": target.bits_per_weight, "engine": target.engine, "budget_bytes": chosen.budget,
            "planned_bytes": allocation.bytes, "planned_bits_per_weight": chosen.bits_per_weight,
            "optimal": allocation.exact, "gap": allocation.gap, "sensitivity": chosen.sensitivity_kind,
            "part_seconds": {part: round(t, 3) for part, t in chosen.seconds.items()},
            "modules": {name: {"bits": o.quant.bits, "group_size": o.quant.group_size, "rank": o.rank,
                               "adapter_bits": o.adapter_bits} for name, o in chosen.chosen.items()}}


def layer_summary(report) -> dict[str, Any]:
    """What one layer report puts in the event log (numbers only, no tensors)."""
    return {
        "seconds": round(report.seconds, 4),
        "modules": {m.name: module_summary(m) for m in report.modules},
    }


def module_summary(m) -> dict[str, Any]:
    """Relative output errors ||(W - W')X|| / ||WX|| without and with compensation, rank, the adapter's
    precision, sparsity."""
    summary = {"bits": m.quantized and m.quantized.bits, "group_size": m.quantized and m.quantized.group_size,
               "error_before": round(m.error_before, 6),
               "error_after": None if m.error_after is None else round(m.error_after, 6),
               "rank": m.rank, "adapter_bits": m.adapter_bits, "zero_fraction": round(m.zero_fraction, 4)}
    if m.refine_errors:  # compensation.refine: error_after of each round, round 0 = compress then compensate
        summary["refine_errors"] = [round(e, 6) for e in m.refine_errors]
    return summary


def compression_summary(result) -> dict[str, Any]:
    from worker.linear_compress import adapter_served_bytes

    errors_before = [m.error_before for m in result.modules.values()]
    errors_after = [m.error_after for m in result.modules.values() if m.error_after is not None]
    return {
        "modules": len(result.modules),
        "mean_relative_error_before": sum(errors_before) / len(errors_before) if errors_before else None,
        "mean_relative_error_after": sum(errors_after) / len(errors_after) if errors_after else None,
        "max_rank": result.max_rank,
        "per_module": {name: module_summary(m) for name, m in result.modules.items()},
        "adapter_params": result.adapter_params,
        "adapter_stored_bytes": result.adapter_bytes,  # what the adapter file holds (checked on export)
        "adapter_served_bytes": adapter_served_bytes(result.adapter_params),  # fp16 in an engine's memory
        "seconds": {
            "calibration": round(result.calibration_seconds, 3),
            "compression": round(result.compression_seconds, 3),
            "compensation": round(result.compensation_seconds, 3),
            "propagation": round(result.propagation_seconds, 3),
        },
    }
