"""Compensation benchmark (issue 4): held-out perplexity of SmolLM2-135M with EoRA / SVD low-rank
compensation on top of compression, with effective bits per weight and compensation time.

    .venv/bin/python -m bench.compensation [--threads 2] [--settings gptq3 sparse24 sparse24_gptq4]

Per setting (GPTQ 3-bit g64; SparseGPT 2:4; SparseGPT 2:4 + GPTQ 4-bit g64): no compensation (the
quality benchmark's run, reused), SVD rank 16 / 64, EoRA rank 16 / 64, EoRA global budget equal in
parameters to uniform rank 64 (sum over the decoder Linears of 64 * (d_out + d_in)), EoRA rank 64 with
4-bit adapters (group 64). If the budget (the issue's criterion: sigma_i^2 / (d_out + d_in)) does not
beat uniform rank 64, the budget is rerun with each module's projected singular values divided by
its output norm ||W X|| (error reduced *relative* to the module's output; the engine's
budget_criterion="relative", now its default), reported beside it. GPTQ 8-bit g64 (no compensation)
is run once for the plot.

EoRA damping (compensation.damp: the Gram's diagonal raised by damp x its mean before the
eigendecomposition) is chosen, not tuned on the evaluation windows: EoRA rank 64 on GPTQ 3-bit is run
at each DAMP_SWEEP value, the one with the lowest perplexity on the *validation* windows (the last
32 x 512 tokens of the Wikipedia excerpt, disjoint from the evaluation windows) is chosen
(--choose-damp, docs/bench/damp_sweep.json), and the EoRA rows are run again with it (names suffixed
_damp<percent>). --sweep-damp D runs one sweep point, so the sweep can be split across processes.

Writes docs/bench/runs/<config>.json (resumable) and docs/bench/compensation.json.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

from bench import common
from bench.quality import in_domain_protocol
from worker.plan import CompressionPlan

SETTINGS = {
    "gptq3": ("gptq3_g64", {"quant": common.quant("gptq", 3)}),
    "sparse24": ("sparsegpt_2of4", {"sparsity": common.two_four("sparsegpt")}),
    "sparse24_gptq4": (
        "sparsegpt_2of4_gptq4_g64",
        {"quant": common.quant("gptq", 4), "sparsity": common.two_four("sparsegpt")},
    ),
    # GPTQ 3-bit with act-order, the job default since the rows above were run
    "gptq3_actorder": ("gptq3_g64_actorder", {"quant": replace(common.quant("gptq", 3), act_order=True)}),
}
RANK64_BUDGET_PER_LAYER = 64  # uniform rank whose parameter count the global budget matches


DAMP_SWEEP = (0.0, 0.01, 0.1, 1.0, 3.0, 10.0)  # compensation.damp candidates, chosen on the validation windows
SWEEP_SETTING, SWEEP_RANK = "gptq3", 64  # the one (setting, rank) the damping is chosen on


def damp_tag(damp: float) -> str:
    """0.01 -> 'damp01', 0.1 -> 'damp10', 1.0 -> 'damp100' (percent of mean(diag S))."""
    return f"damp{round(damp * 100):02d}"


def sweep_name(damp: float) -> str:
    return f"eora_r{SWEEP_RANK}" if damp == 0 else f"eora_r{SWEEP_RANK}_{damp_tag(damp)}"


def variants(budget_params: int, damp: float | None = None) -> dict[str, dict]:
    """The issue's rows with undamped EoRA (the paper's method); with damp, the EoRA rows again with
    compensation.damp = damp (names suffixed with its tag)."""
    if damp is not None:
        tag = damp_tag(damp)
        return {
            f"eora_r64_{tag}": {"compensation": common.compensation("eora", rank=64, damp=damp)},
            f"eora_r16_{tag}": {"compensation": common.compensation("eora", rank=16, damp=damp)},
            f"eora_budget_r64eq_relnorm_{tag}": {"compensation": common.compensation(
                "eora", budget_params=budget_params, budget_criterion="relative", damp=damp)},
            f"eora_r64_adapter4bit_{tag}": {"compensation": common.compensation(
                "eora", rank=64, adapter_bits=4, adapter_group_size=64, damp=damp)},
        }
    return {
        "eora_r64": {"compensation": common.compensation("eora", rank=64)},
        "svd_r64": {"compensation": common.compensation("svd", rank=64)},
        "eora_r16": {"compensation": common.compensation("eora", rank=16)},
        "svd_r16": {"compensation": common.compensation("svd", rank=16)},
        "eora_budget_r64eq": {"compensation": common.compensation("eora", budget_params=budget_params,
                                                                  budget_criterion="absolute")},
        "eora_r64_adapter4bit": {"compensation": common.compensation("eora", rank=64, adapter_bits=4, adapter_group_size=64)},
    }


def all_variants(budget_params: int, damp: float | None) -> dict[str, dict]:
    """The undamped rows plus, once a damping is chosen, the damped EoRA rows."""
    return variants(budget_params) | (variants(budget_params, damp) if damp else {})


def sweep_compensation(damp: float):
    return common.compensation("eora", rank=SWEEP_RANK, damp=damp)


def choose_damp(protocol: common.Protocol) -> float:
    """Run EoRA rank 64 on GPTQ 3-bit at every DAMP_SWEEP value with the validation perplexity
    recorded; the damp with the lowest *validation* perplexity is chosen (the evaluation windows
    play no part in the choice). Writes docs/bench/damp_sweep.json."""
    base_name = SETTINGS[SWEEP_SETTING][0]
    rows = {}
    for damp in DAMP_SWEEP:
        run = sweep_run(protocol, damp)
        rows[damp] = {"run": run["name"], "val_ppl": run["val_ppl"], "ppl": run["ppl"]}
    chosen = min(rows, key=lambda d: rows[d]["val_ppl"])
    record = {"setting": base_name, "rank": SWEEP_RANK, "chosen_damp": chosen,
              "rows": {str(d): r for d, r in rows.items()}, "validation": protocol.info["validation"]}
    (common.RESULTS / "damp_sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    common.log(f"damp sweep: {rows}; chosen {chosen}")
    return chosen


def sweep_run(protocol: common.Protocol, damp: float) -> dict:
    """One point of the damping sweep, with its validation perplexity (runs stored without one, from
    before the validation windows existed, are rerun)."""
    base_name, compression = SETTINGS[SWEEP_SETTING]
    name = f"{base_name}__{sweep_name(damp)}"
    run = common.load_run(name)
    if run is None or run.get("val_ppl") is None:
        plan = CompressionPlan(**compression, compensation=sweep_compensation(damp))
        run = common.run_config(name, plan, protocol, rerun=True, validate=True)
    return run


def chosen_damp() -> float | None:
    path = common.RESULTS / "damp_sweep.json"
    return json.loads(path.read_text())["chosen_damp"] if path.exists() else None


def summarize(fp32: float) -> dict:
    damp = chosen_damp()
    out = {"fp32_ppl": fp32, "chosen_damp": damp, "settings": {}}
    names = [*variants(0), "eora_budget_r64eq_relnorm"]
    names += [sweep_name(d) for d in DAMP_SWEEP if d != 0]
    if damp:
        names += list(variants(0, damp))
    for setting, (base_name, _) in SETTINGS.items():
        base = common.load_run(base_name)
        if base is None:
            continue
        rows = {"none": _row(base, base, fp32)}
        for variant in dict.fromkeys(names):
            run = common.load_run(f"{base_name}__{variant}")
            if run is not None:
                rows[variant] = _row(run, base, fp32)
        out["settings"][setting] = {"base": base_name, "rows": rows, "checks": _checks(rows, damp)}
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
        "val_ppl": run.get("val_ppl"),  # validation windows; recorded on the runs made since they exist
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


def _checks(rows: dict, damp: float | None) -> dict:
    checks = {}
    suffixes = {"": "EoRA"} | ({f"_{damp_tag(damp)}": f"EoRA damp {damp}"} if damp else {})
    for suffix, label in suffixes.items():
        for rank in (16, 64):
            e, s = rows.get(f"eora_r{rank}{suffix}"), rows.get(f"svd_r{rank}")
            if e and s:
                checks[f"{label} beats SVD at rank {rank}"] = e["ppl"] < s["ppl"]
        u = rows.get(f"eora_r64{suffix}")
        for budget, criterion in (("eora_budget_r64eq", "sigma^2/(d_out+d_in)"), ("eora_budget_r64eq_relnorm", "relative")):
            b = rows.get(f"{budget}{suffix}")
            if u and b:
                checks[f"{label} budget ({criterion}) beats uniform rank 64"] = b["ppl"] < u["ppl"]
    return checks


def wikicalib(protocol: common.Protocol, settings: list[str], only: list[str], budget: int) -> None:
    """Diagnostic, outside the fixed protocol: does the EoRA vs SVD ordering depend on calibrating on
    news text and evaluating on Wikipedia? The same rows calibrated in-domain (quality.in_domain_protocol)."""
    diag = in_domain_protocol(protocol)
    todo = all_variants(budget, chosen_damp())
    for setting in settings:
        base_name, compression = SETTINGS[setting]
        common.run_config(f"diag_wikicalib_{base_name}", CompressionPlan(**compression), diag, note=diag.info["calibration"])
        for variant in only:
            common.run_config(f"diag_wikicalib_{base_name}__{variant}", CompressionPlan(**compression, **todo[variant]),
                              diag, note=diag.info["calibration"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--only", nargs="*", help="run only these variant names (e.g. svd_r16 eora_r64_damp10)")
    parser.add_argument("--choose-damp", action="store_true", help="run the damping sweep only")
    parser.add_argument("--sweep-damp", type=float, choices=DAMP_SWEEP,
                        help="run one point of the damping sweep only (to split the sweep across processes)")
    parser.add_argument("--wikicalib", action="store_true",
                        help="diagnostic: the --settings / --only rows (and the uncompensated base) calibrated "
                             "in-domain on Wikipedia tokens after the evaluation windows; names prefixed diag_wikicalib_")
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

    if args.sweep_damp is not None:
        sweep_run(protocol, args.sweep_damp)
        return 0
    if args.wikicalib:
        wikicalib(protocol, args.settings, args.only or [], budget)
        return 0
    if args.choose_damp:
        choose_damp(protocol)
        save()
        return 0
    damp = chosen_damp()
    if damp is None and not args.only:
        damp = choose_damp(protocol)
    for i, setting in enumerate(args.settings):
        base_name, compression = SETTINGS[setting]
        common.run_config(base_name, CompressionPlan(**compression), protocol)
        todo = all_variants(budget, damp)
        if setting == SWEEP_SETTING:
            todo |= {sweep_name(d): {"compensation": sweep_compensation(d)} for d in DAMP_SWEEP if d != 0}
        for variant, extra in todo.items():
            if args.only and variant not in args.only:
                continue
            run = common.run_config(f"{base_name}__{variant}", CompressionPlan(**compression, **extra), protocol,
                                    validate=True)
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
                        validate=True,
                    )
                    save()
        if i == 0 and not args.only:
            common.run_config("gptq8_g64", CompressionPlan(quant=common.quant("gptq", 8)), protocol)
            save()
    save()
    common.log(json.dumps(summarize(fp32), indent=1, default=float)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
