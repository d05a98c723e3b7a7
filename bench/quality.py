"""Quality benchmark (issue 3): held-out perplexity of SmolLM2-135M under RTN / GPTQ quantization and
magnitude / Wanda / SparseGPT 2:4 pruning, with the compression wall time of each configuration.

    .venv/bin/python -m bench.quality [--threads 2] [--only NAME ...] [--fresh]

Quantization: asymmetric, group 64 (576 and 1536 are multiples of 64, not of 128; group 32 would be
trivially lossless on SmolLM2's Q4_1-grid weights), GPTQ damp 0.01, block 128, no act-order.
Writes docs/bench/runs/<config>.json per configuration (resumable) and docs/bench/quality.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from bench import common
from worker.plan import CompressionPlan

CONFIGS = {  # most informative first
    "gptq4_g64": CompressionPlan(quant=common.quant("gptq", 4)),
    "rtn4_g64": CompressionPlan(quant=common.quant("rtn", 4)),
    "gptq3_g64": CompressionPlan(quant=common.quant("gptq", 3)),
    "rtn3_g64": CompressionPlan(quant=common.quant("rtn", 3)),
    "sparsegpt_2of4": CompressionPlan(sparsity=common.two_four("sparsegpt")),
    "magnitude_2of4": CompressionPlan(sparsity=common.two_four("magnitude")),
    "wanda_2of4": CompressionPlan(sparsity=common.two_four("wanda")),
    "sparsegpt_2of4_gptq4_g64": CompressionPlan(quant=common.quant("gptq", 4), sparsity=common.two_four("sparsegpt")),
    # GPTQ 4-bit options tried after GPTQ lost to RTN at 4 bits (not part of the table)
    "gptq4_g64_actorder": CompressionPlan(quant=replace(common.quant("gptq", 4), act_order=True)),
    "gptq4_g64_damp10": CompressionPlan(quant=replace(common.quant("gptq", 4), damp=0.1)),
    "gptq3_g64_actorder": CompressionPlan(quant=replace(common.quant("gptq", 3), act_order=True)),
}


def in_domain_protocol(protocol: common.Protocol) -> common.Protocol:
    """Diagnostic only: calibration windows drawn (seed 0) from the Wikipedia excerpt *after* the
    evaluation tokens, so calibration is in-domain but disjoint from the evaluation windows."""
    tail = protocol.eval_stream[common.EVAL_WINDOWS * common.SEQ_LEN :]
    generator = torch.Generator().manual_seed(common.SEED)
    starts = torch.randint(0, len(tail) - common.SEQ_LEN + 1, (common.CALIBRATION_WINDOWS,), generator=generator)
    calibration = tail[starts.unsqueeze(1) + torch.arange(common.SEQ_LEN).unsqueeze(0)]
    return protocol.with_calibration(calibration, f"{common.CALIBRATION_WINDOWS} x {common.SEQ_LEN} tokens of "
                                     f"{common.EVAL_FILE.name} after the evaluation windows, seed {common.SEED}")


DIAGNOSTICS = {  # not part of the fixed protocol: GPTQ calibrated in-domain (RTN needs no calibration)
    "diag_gptq4_g64_wikicalib": CompressionPlan(quant=common.quant("gptq", 4)),
    "diag_gptq3_g64_wikicalib": CompressionPlan(quant=common.quant("gptq", 3)),
}


def summarize(fp32: float) -> dict:
    rows = {"fp32": {"ppl": fp32}}
    for name in [*CONFIGS, *DIAGNOSTICS]:
        run = common.load_run(name)
        if run is not None:
            rows[name] = {
                "ppl": run["ppl"],
                "ppl_ratio_to_fp32": run["ppl"] / fp32,
                "compress_wall_seconds": run["compress_wall_seconds"],
                "eval_seconds": run["eval_seconds"],
                "bits_per_weight": run["bits"]["total"],
                "commit": run.get("provenance", {}).get("commit"),  # None: from before provenance was recorded
            }
    margins = {}
    for better, worse in [("gptq4_g64", "rtn4_g64"), ("gptq3_g64", "rtn3_g64"), ("sparsegpt_2of4", "magnitude_2of4"),
                          ("sparsegpt_2of4", "wanda_2of4"), ("wanda_2of4", "magnitude_2of4")]:
        if better in rows and worse in rows:
            b, w = rows[better]["ppl"], rows[worse]["ppl"]
            margins[f"{better} vs {worse}"] = {
                "ppl": [b, w],
                "ppl_ratio": w / b,
                "gap_to_fp32_reduced": (w - b) / (w - fp32),
            }
    return {"fp32_ppl": fp32, "rows": rows, "margins": margins}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS))
    parser.add_argument("--diagnostics", nargs="*", choices=list(DIAGNOSTICS),
                        help="run these in-domain-calibration diagnostics instead of the protocol")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun every configuration asked for (and the fp32 reference) instead of reusing "
                             "docs/bench/runs/*.json from earlier runs")
    args = parser.parse_args(argv)
    common.set_fresh(args.fresh)
    common.setup(args.threads)
    protocol = common.Protocol()
    fp32 = common.fp32_reference(protocol)
    if args.diagnostics:
        diag = in_domain_protocol(protocol)
        for name in args.diagnostics:
            common.run_config(name, DIAGNOSTICS[name], diag, note=diag.info["calibration"])
        return 0
    for name, plan in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        common.run_config(name, plan, protocol)
        summary = summarize(fp32)
        (common.RESULTS / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    common.log(json.dumps(summarize(fp32)["margins"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
