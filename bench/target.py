"""Size-target benchmark (issue 16): SmolLM2-135M compressed to a number of stored bits per weight by the
job's own planner, against the best fixed configuration at equal or fewer stored bits.

    .venv/bin/python -m bench.target [--threads 2] [--targets 3.3 3.6 4.0 4.31] [--engine transformers vllm]
                                     [--compensation eora|none] [--fresh] [--smoke] [--curve-windows N]

Per (target, engine) one row, docs/bench/runs/target_<bits, "." as "p">_<engine>_<compensation>.json
(e.g. target_3p6_transformers_eora; resumable, with bench.common's provenance), made by the code a job runs:
- the job spec {quantization: {method: gptq}, compensation: {method: eora} (or none), target:
  {bits_per_weight, engine}} mapped by the job's own code (worker.job_plan.compression_plan and size_target),
  so its defaults are the job's: GPTQ asymmetric, act-order on, damp 0.01; EoRA damp 1.0, no sink tokens;
  offered bit widths 2/3/4/8 (vLLM: 4/8), group sizes 64, 128 and per channel (where they divide a
  Linear's width: 576 takes 64 and per channel), adapter ranks 0 and vLLM's set up to the server's
  max_rank, adapter precisions fp16, 8 and 4 bits (vLLM: fp16); error curves measured with RTN; scales counted at fp16
  (SizeTarget.scale_bytes 2), as bench.sizes counts every row's (the model is computed in fp32, and a
  job would store fp32 scales);
- worker.target.plan_for_target on the protocol's 64 calibration windows with the whole model in memory,
  so every Linear is weighed by its Fisher sensitivity (one backward pass of the first
  worker.target.SENSITIVITY_WINDOWS windows; a streamed model would weigh them equally) and its error
  curves read the Grams of the first worker.target.CURVE_WINDOWS;
- bench.common.run_config with the chosen plan: the compression, the evaluation and validation
  perplexity, the stored bits as every row counts them (bench.sizes.bits_per_weight, per module), the
  stage times with the planning (the candidate measurements and the backward pass) as stages.planning.

Group size 32 is never offered: SmolLM2's weights sit on the GGUF Q4_1 grid (4-bit groups of 32), where
4-bit group-32 quantization is lossless and would flatter the allocator; the harness refuses options
that include it. A target the offered options cannot meet (vLLM's 4-bit floor lies above 4.0 bits per
weight) writes no row: the summary gives the planner's reason.

The fixed GPTQ 4-bit g64 act-order row (bench.quality's gptq4_g64_actorder) is the cost baseline; it is
run again, with validation, when the stored one is not on fixed code or has no validation perplexity.
--refresh-fixed does the same first for bench.quality's rows at or under the largest target (on SmolLM2
at 4.31: gptq3_g64, rtn3_g64, sparsegpt_2of4_gptq4_g64, gptq3_g64_actorder), which the comparison
otherwise leaves out (not on fixed code) or compares on evaluation only (no validation perplexity).
Summary: docs/bench/target.json (see summarize).

--curve-windows N: instead, only diagnostic rows, diag_<row>_curves<N> (e.g.
diag_target_3p3_transformers_eora_curves64): the same job with the error curves' Grams from the first N
calibration windows (a job reads worker.target.CURVE_WINDOWS); no baseline, left out of the summary.

--smoke: the same path on a tiny random LLaMA (tied embeddings, as tests/fixtures_models builds it) with
8 calibration and 4 + 4 evaluation/validation windows of 32 tokens, in a temp folder; nothing is written
under docs/. Its summary is printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

from torch import Tensor

from app.jobs.spec import JobSpec
from app.settings import Settings
from bench import common, sizes
from bench.quality import CONFIGS
from worker.data import make_windows, token_stream, windows_hash
from worker.job_plan import compression_plan, size_target
from worker.plan import CompressionPlan
from worker.summaries import planning_summary
from worker.target import CURVE_WINDOWS, SizeTarget, TargetError, plan_for_target

TARGETS = (3.3, 3.6, 4.0, 4.31)  # issue 16's stored bits per weight
ENGINES = ("transformers", "vllm")
PREFIX = "target_"
BASELINE = "gptq4_g64_actorder"  # the fixed GPTQ job a target job's time is compared with
COST_LIMIT = 1.5  # issue 16: a target job takes at most 1.5x the fixed GPTQ job's time, measurements included
VLLM_BOUND = (4.31, 24.79)  # issue 16: engine vllm at 4.31 bits below 24.79 (gptq4_g64_actorder's perplexity)
GGUF_GROUP = 32  # SmolLM2's weights sit on 4-bit groups of 32: never offered


def row_name(target: float, engine: str, compensation: str) -> str:
    """target_3p6_transformers_eora, target_4p0_vllm_none, ..."""
    return f"{PREFIX}{str(float(target)).replace('.', 'p')}_{engine}_{compensation}"


def job_options(target: float, engine: str, compensation: str, protocol: common.Protocol) -> tuple[CompressionPlan, SizeTarget]:
    """(the base plan, the SizeTarget) a job with this spec gets; the spec's calibration section only
    describes the protocol's windows, which are passed to the planner as they are."""
    windows, seq_len = protocol.calibration.shape
    spec = JobSpec(model={"id": str(protocol.model_dir)}, quantization={"method": "gptq"},
                   compensation=None if compensation == "none" else {"method": compensation},
                   target={"bits_per_weight": target, "engine": engine},
                   calibration={"dataset": str(common.CALIBRATION_FILE), "num_samples": windows, "seq_len": seq_len,
                                "seed": common.SEED})
    max_rank = Settings.model_fields["max_rank"].default
    plan = compression_plan(spec, max_rank)
    options = replace(size_target(spec.target, plan, max_rank), scale_bytes=sizes.SCALE_BITS // 8)
    if GGUF_GROUP in options.group_sizes:
        raise ValueError(f"group size {GGUF_GROUP} is offered: SmolLM2's weights sit on that grid (GGUF Q4_1)")
    return plan, options


def planner(options: SizeTarget, windows: Tensor, curve_windows: int = CURVE_WINDOWS):
    """run_config's planner: the job's plan_for_target on the whole model (Fisher sensitivity)."""

    def plan(model, base: CompressionPlan) -> tuple[CompressionPlan, dict]:
        chosen = plan_for_target(model, windows, base, options, common.DEVICE, common.BATCH_SIZE,
                                 curve_windows=curve_windows)
        return chosen.plan, {"base_plan": common.plan_to_dict(base), "size_target": asdict(options),
                             **planning_summary(options, chosen)}

    return plan


def run_target(protocol: common.Protocol, target: float, engine: str, compensation: str,
               curve_windows: int | None = None) -> dict:
    """The (target, engine) row; with curve_windows (--curve-windows) instead a diagnostic row,
    diag_<row>_curves<N>, whose error curves read the Grams of the first N calibration windows instead of
    the job's CURVE_WINDOWS (left out of the summary)."""
    base, options = job_options(target, engine, compensation, protocol)
    name, note = row_name(target, engine, compensation), f"size target {target:g} bits/weight, engine {engine}"
    if curve_windows is None:
        note, curve_windows = f"{note}; Fisher sensitivity", CURVE_WINDOWS
    else:
        name = f"diag_{name}_curves{curve_windows}"
        note = f"{note}; the error curves' Grams from the first {curve_windows} calibration windows (a job: {CURVE_WINDOWS})"
    return common.run_config(name, base, protocol, validate=True, note=note,
                             planner=planner(options, protocol.calibration, curve_windows))


def current_row(name: str, plan: CompressionPlan, protocol: common.Protocol) -> dict:
    """The stored fixed row `name`, run again (with validation) unless it is on fixed code with it."""
    run = common.reusable_run(name, protocol.runs)
    if run is not None and common.on_fixed_code(run) and run.get("val_ppl") is not None:
        return run
    return common.run_config(name, plan, protocol, rerun=True, validate=True)


def refresh_fixed(protocol: common.Protocol, bits: float) -> None:
    """--refresh-fixed: bench.quality's configurations storing at most `bits` (codes, scales, 2:4 mask),
    made current as the baseline is, so that the comparison has them on fixed code and on validation."""
    shapes = common.linear_shapes(common.fresh_model(protocol.model_dir))
    for name, plan in CONFIGS.items():
        if sizes.bits_per_weight(plan, shapes, None)["total"] <= bits:
            current_row(name, plan, protocol)


def fixed_rows(runs: Path, info: dict) -> list[dict]:
    """The stored rows of fixed configurations with the same calibration and evaluation windows (diagnostic
    rows, diag_*, vary something else and are left out), each with whether it ran on fixed code."""
    rows = []
    for path in sorted(runs.glob("*.json")):
        run = json.loads(path.read_text())
        if path.stem.startswith((PREFIX, "diag_")) or "bits" not in run or "protocol" not in run:
            continue
        if all(run["protocol"].get(k) == info[k] for k in ("calibration_sha256", "evaluation_sha256")):
            rows.append({"name": path.stem, "ppl": run["ppl"], "bits": run["bits"]["total"],
                         "val_ppl": run.get("val_ppl") if run["protocol"].get("validation_sha256") ==
                         info.get("validation_sha256") else None, "fixed_code": common.on_fixed_code(run)})
    return rows


def best_fixed(fixed: list[dict], bits: float, key: str) -> dict | None:
    """The row on fixed code with the lowest `key` (ppl or val_ppl) among those storing at most `bits`."""
    pool = (r for r in fixed if r["fixed_code"] and r["bits"] <= bits and r[key] is not None)
    return min(pool, key=lambda r: r[key], default=None)


def per_kind(run: dict, target: float) -> dict:
    """Per Linear kind: bits of the whole model's weights it spends on weights and adapters (they sum to
    the row's total), their share of the target, how many of its Linears got each bit width, group size
    and rank, and how many of its adapters are stored at each precision ("fp16", "8", "4")."""
    kinds = {kind: {**bits, "share_weights": bits["weights"] / target, "share_adapters": bits["adapters"] / target,
                    "bits": Counter(), "group_size": Counter(), "rank": Counter(), "adapter_bits": Counter()}
             for kind, bits in run["bits_by_kind"].items()}
    for name, chosen in run["planning"]["modules"].items():
        kind, fitted = kinds[name.rsplit(".", 1)[1]], run["modules"][name]
        kind["bits"][chosen["bits"]] += 1
        kind["group_size"][chosen["group_size"]] += 1
        kind["rank"][fitted["rank"]] += 1  # the rank the run fitted (the plan's, or capped)
        if fitted["rank"]:
            kind["adapter_bits"][fitted.get("adapter_bits") or 16] += 1  # rows before per-module precisions: fp16
    for kind in kinds.values():
        for count in ("bits", "group_size", "rank"):
            kind[count] = {str(k): n for k, n in sorted(kind[count].items())}
        kind["adapter_bits"] = {"fp16" if k == 16 else str(k): n for k, n in sorted(kind["adapter_bits"].items())}
    return kinds


def summarize(protocol: common.Protocol, infeasible: dict[str, str]) -> dict:
    """Every target row stored under protocol.runs against the best fixed rows at <= the *target* (not the
    row's own, lower, stored bits: the stricter comparison), on evaluation and validation; its job time
    (planning + compression) against the baseline's compression; issue 16's checks. infeasible: this
    run's targets the planner refused, with its reason."""
    base = common.load_run(BASELINE, protocol.runs)
    base_seconds = None if base is None else base["compress_wall_seconds"]
    out: dict = {"baseline": None if base is None else {
        "name": BASELINE, "compress_wall_seconds": base_seconds, "fixed_code": common.on_fixed_code(base),
        "torch_threads": base["machine"]["torch_threads"]}, "rows": {}, "infeasible": infeasible}
    fixed = fixed_rows(protocol.runs, protocol.info)
    for path in sorted(protocol.runs.glob(f"{PREFIX}*.json")):
        run = json.loads(path.read_text())
        target, engine = run["planning"]["bits_per_weight"], run["planning"]["engine"]
        seconds = {"planning": run["stages"]["planning"], "compression": run["compress_wall_seconds"]}
        seconds["job"] = seconds["planning"] + seconds["compression"]
        seconds["planning_parts"] = run["planning"].get("part_seconds")  # rows before 93f85ff: None
        best = {"evaluation": best_fixed(fixed, target, "ppl"), "validation": best_fixed(fixed, target, "val_ppl")}
        row = {"target": target, "engine": engine, "ppl": run["ppl"], "val_ppl": run["val_ppl"],
               "bits": run["bits"]["total"], "bits_served": run["bits"]["total_served_adapter"],
               "planned_bits": run["planning"]["planned_bits_per_weight"], "optimal": run["planning"]["optimal"],
               "sensitivity": run["planning"]["sensitivity"], "seconds": seconds,
               "torch_threads": run["machine"]["torch_threads"],
               "cost_ratio": None if base_seconds is None else seconds["job"] / base_seconds,
               # the same job's own compression (a GPTQ job of the chosen plan) timed in the same process, so
               # under the same load: the steadier ratio on shared cores
               "cost_ratio_own_compression": seconds["job"] / seconds["compression"],
               "by_kind": per_kind(run, target), "best_fixed": best,
               "fixed_without_validation": [r["name"] for r in fixed if r["bits"] <= target and r["fixed_code"]
                                            and r["val_ppl"] is None],
               "fixed_before_the_fixes": [r["name"] for r in fixed if r["bits"] <= target and not r["fixed_code"]],
               "fixed_code": common.on_fixed_code(run)}
        checks = {"stored bits within the target": row["bits"] <= target}
        for windows, key in (("evaluation", "ppl"), ("validation", "val_ppl")):  # None: no fixed row to beat
            checks[f"beats the best fixed row on {windows}"] = None if best[windows] is None else \
                row[key] < best[windows][key]
        if row["cost_ratio"] is not None:
            checks[f"job time at most {COST_LIMIT}x {BASELINE}'s"] = row["cost_ratio"] <= COST_LIMIT
        checks[f"job time at most {COST_LIMIT}x its own compression's"] = row["cost_ratio_own_compression"] <= COST_LIMIT
        if engine == "vllm" and target == VLLM_BOUND[0]:
            checks[f"below {VLLM_BOUND[1]}"] = row["ppl"] < VLLM_BOUND[1]
        row["checks"] = checks
        out["rows"][path.stem] = row
    return out


def run(protocol: common.Protocol, targets: list[float], engines: list[str], compensation: str, out: Path,
        refresh: bool = False) -> dict:
    """The baseline (and, refresh, the fixed rows), then every (target, engine) row; the summary written
    to `out` after each."""
    current_row(BASELINE, CONFIGS[BASELINE], protocol)
    if refresh:
        refresh_fixed(protocol, max(targets))
    infeasible: dict[str, str] = {}
    summary = summarize(protocol, infeasible)
    for target in targets:
        for engine in engines:
            try:
                run_target(protocol, target, engine, compensation)
            except TargetError as exc:
                common.log(f"{row_name(target, engine, compensation)}: {exc}")
                infeasible[row_name(target, engine, compensation)] = str(exc)
            summary = summarize(protocol, infeasible)
            out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def smoke_protocol(folder: Path) -> common.Protocol:
    """A tiny random LLaMA saved under folder, 8 x 32 calibration windows (seed 0), the first and last 4 x 32
    tokens of the sample corpus for evaluation and validation; rows go to folder/runs."""
    from tests.fixtures_models import SAMPLE_DOCS, build_tiny_model, make_tokenizer

    tokenizer = make_tokenizer()
    model_dir = folder / "tiny-llama"
    build_tiny_model("llama_tied", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    stream = token_stream(tokenizer, SAMPLE_DOCS)
    calibration = make_windows(tokenizer, SAMPLE_DOCS, 8, 32, common.SEED)
    evaluation, validation = stream[: 4 * 32].reshape(4, 32), stream[len(stream) - 4 * 32 :].reshape(4, 32)
    info = {"model": "tiny random LLaMA (smoke)", "calibration_sha256": windows_hash(calibration),
            "evaluation_sha256": windows_hash(evaluation), "validation_sha256": windows_hash(validation)}
    return common.Protocol.of(model_dir, folder / "runs", calibration, evaluation, validation, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--engine", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--compensation", choices=("eora", "none"), default="eora")
    parser.add_argument("--fresh", action="store_true", help="rerun every row asked for (and the baseline)")
    parser.add_argument("--refresh-fixed", action="store_true",
                        help="first rerun, with validation, bench.quality's rows at or under the largest target that "
                             "are not on fixed code or have no validation perplexity")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model in a temp folder; nothing in docs/")
    parser.add_argument("--curve-windows", type=int, default=None,
                        help="only diagnostic rows, diag_<row>_curves<N>: the error curves' Grams from the first N "
                             f"calibration windows (a job reads {CURVE_WINDOWS}); no baseline, no summary")
    args = parser.parse_args(argv)
    common.set_fresh(args.fresh)
    common.setup(args.threads)
    if args.curve_windows is not None:
        if args.smoke:
            parser.error("--curve-windows writes diagnostic rows under docs/: not with --smoke")
        for target in args.targets:
            for engine in args.engine:
                run_target(common.Protocol(), target, engine, args.compensation, args.curve_windows)
        return 0
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            summary = run(smoke_protocol(Path(tmp)), args.targets, args.engine, args.compensation,
                          Path(tmp) / "target.json", args.refresh_fixed)
        print(json.dumps(summary, indent=1))
        return 0
    summary = run(common.Protocol(), args.targets, args.engine, args.compensation, common.RESULTS / "target.json",
                  args.refresh_fixed)
    common.log(json.dumps({name: row["checks"] for name, row in summary["rows"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
