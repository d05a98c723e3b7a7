"""Compensation benchmark (issue 4): held-out perplexity of SmolLM2-135M with EoRA / SVD low-rank
compensation on top of compression, with effective bits per weight and compensation time.

    .venv/bin/python -m bench.compensation [--threads 2] [--settings gptq3 sparse24 sparse24_gptq4]

Per setting (GPTQ 3-bit g64; SparseGPT 2:4; SparseGPT 2:4 + GPTQ 4-bit g64): no compensation (the
quality benchmark's run, reused), SVD rank 16 / 64, EoRA rank 16 / 64, EoRA global budget equal in
parameters to uniform rank 64 (sum over the decoder Linears of 64 * (d_out + d_in)), EoRA rank 64 with
4-bit adapters (group 64). If the budget (the issue's criterion: sigma_i^2 / (d_out + d_in)) does not
beat uniform rank 64, the budget is rerun with each module's projected singular values divided by
its output norm ||W X|| (error reduced *relative* to the module's output; the engine's
budget_criterion="relative", now its default), reported beside it. EoRA rank 16 / 64 with the Gram
damped by 0.01 mean(diag) (compensation.damp) follow. GPTQ 8-bit g64 (no compensation) is run once for the plot.
Writes docs/bench/runs/<config>.json (resumable) and docs/bench/compensation.json.
"""

from __future__ import annotations

import argparse
import json
import math

from bench import common
from worker.plan import CompressionPlan

SETTINGS = {
    "gptq3": ("gptq3_g64", {"quant": common.quant("gptq", 3)}),
    "sparse24": ("sparsegpt_2of4", {"sparsity": common.two_four("sparsegpt")}),
    "sparse24_gptq4": (
        "sparsegpt_2of4_gptq4_g64",
        {"quant": common.quant("gptq", 4), "sparsity": common.two_four("sparsegpt")},
    ),
}
RANK64_BUDGET_PER_LAYER = 64  # uniform rank whose parameter count the global budget matches


def variants(budget_params: int) -> dict[str, dict]:
    return {
        "eora_r64": {"compensation": common.compensation("eora", rank=64)},
        "svd_r64": {"compensation": common.compensation("svd", rank=64)},
        "eora_r16": {"compensation": common.compensation("eora", rank=16)},
        "svd_r16": {"compensation": common.compensation("svd", rank=16)},
        "eora_budget_r64eq": {"compensation": common.compensation("eora", budget_params=budget_params,
                                                                  budget_criterion="absolute")},
        "eora_r64_adapter4bit": {"compensation": common.compensation("eora", rank=64, adapter_bits=4, adapter_group_size=64)},
        "eora_r64_damp01": {"compensation": common.compensation("eora", rank=64, damp=0.01)},
        "eora_r16_damp01": {"compensation": common.compensation("eora", rank=16, damp=0.01)},
    }


def summarize(fp32: float) -> dict:
    out = {"fp32_ppl": fp32, "settings": {}}
    for setting, (base_name, _) in SETTINGS.items():
        base = common.load_run(base_name)
        if base is None:
            continue
        rows = {"none": _row(base, base, fp32)}
        for variant in [*variants(0), "eora_budget_r64eq_relnorm"]:
            run = common.load_run(f"{base_name}__{variant}")
            if run is not None:
                rows[variant] = _row(run, base, fp32)
        out["settings"][setting] = {"base": base_name, "rows": rows, "checks": _checks(rows)}
    for name in ["gptq3_g64", "gptq4_g64", "gptq8_g64"]:
        run = common.load_run(name)
        if run is not None:
            out.setdefault("uncompensated_gptq", {})[name] = {"ppl": run["ppl"], "bits": run["bits"]["total"]}
    return out


def _row(run: dict, base: dict, fp32: float) -> dict:
    gap = base["ppl"] - fp32
    layers = run["per_layer"]
    return {
        "ppl": run["ppl"],
        "gap_recovered": (base["ppl"] - run["ppl"]) / gap if gap > 0 else math.nan,
        "bits": run["bits"],
        "adapter_params": run["adapter_params"],
        "adapter_bytes": run["adapter_bytes"],
        "max_rank": run["max_rank"],
        "rank_by_module_type": _ranks_by_type(run),
        "compress_seconds_per_layer_mean": sum(r["compress_seconds"] for r in layers) / len(layers),
        "compensate_seconds_per_layer_mean": sum(r["compensate_seconds"] for r in layers) / len(layers),
        "compress_wall_seconds": run["compress_wall_seconds"],
        "stages": run["stages"],
    }


def _ranks_by_type(run: dict) -> dict:
    """Mean and max rank per Linear kind (q_proj, ..., down_proj) across layers."""
    kinds: dict[str, list[int]] = {}
    for name, m in run["modules"].items():
        kinds.setdefault(name.rsplit(".", 1)[1], []).append(m["rank"])
    return {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in kinds.items()}


def _checks(rows: dict) -> dict:
    checks = {}
    for rank in (16, 64):
        e, s = rows.get(f"eora_r{rank}"), rows.get(f"svd_r{rank}")
        if e and s:
            checks[f"eora beats svd at rank {rank}"] = e["ppl"] < s["ppl"]
    u, b = rows.get("eora_r64"), rows.get("eora_budget_r64eq")
    if u and b:
        checks["budget (sigma^2/(d_out+d_in)) beats uniform rank 64"] = b["ppl"] < u["ppl"]
    r = rows.get("eora_budget_r64eq_relnorm")
    if u and r:
        checks["budget (normalised by ||WX||) beats uniform rank 64"] = r["ppl"] < u["ppl"]
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    common.setup(args.threads)
    protocol = common.Protocol()
    fp32 = common.fp32_reference(protocol)
    model = common.fresh_model()
    from worker.models import decoder_linears, get_architecture

    shapes = [tuple(m.weight.shape) for m in decoder_linears(model, get_architecture(model)).values()]
    del model
    budget = sum(RANK64_BUDGET_PER_LAYER * (d_out + d_in) for d_out, d_in in shapes)

    def save() -> None:
        (common.RESULTS / "compensation.json").write_text(json.dumps(summarize(fp32), indent=1, default=float) + "\n")

    for i, setting in enumerate(args.settings):
        base_name, compression = SETTINGS[setting]
        common.run_config(base_name, CompressionPlan(**compression), protocol)
        for variant, extra in variants(budget).items():
            run = common.run_config(f"{base_name}__{variant}", CompressionPlan(**compression, **extra), protocol)
            save()
            if variant == "eora_budget_r64eq":
                uniform = common.load_run(f"{base_name}__eora_r64")
                if uniform is not None and run["ppl"] >= uniform["ppl"]:
                    relative = common.compensation("eora", budget_params=budget, budget_criterion="relative")
                    common.run_config(
                        f"{base_name}__eora_budget_r64eq_relnorm",
                        CompressionPlan(**compression, compensation=relative),
                        protocol,
                        note="allocator given sigma_i / ||W X|| (relative error reduced)",
                    )
                    save()
        if i == 0:
            common.run_config("gptq8_g64", CompressionPlan(quant=common.quant("gptq", 8)), protocol)
            save()
    save()
    common.log(json.dumps(summarize(fp32), indent=1, default=float)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
