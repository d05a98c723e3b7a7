"""Diagnostic (issue 15): how far GPTQ 3-bit g64 without act-order moves with the precision of its
Hessian and with the calibration draw, to read the 56.57 -> 60.35 change of its benchmark row.

    .venv/bin/python -m bench.gptq_sensitivity [--threads 2] [--seeds 0 1 2] [--grams 64 32] [--fresh]

The fixes of issue 15 changed the Gram's accumulation from fp32 to fp64 (worker/compression/gram.py);
GPTQ has always factorised it in fp64, so the only change is the rounding of H as accumulated. Each
row compresses a fresh SmolLM2 with the benchmark's GPTQ 3-bit g64 plan, the Gram accumulated in
fp64 (today's code) or fp32 (the old accumulation, by setting gram.GRAM_DTYPE for the run), on the
protocol's 64 Lee windows drawn with calibration seed s (seed 0 is the protocol's own draw), and
reports perplexity on the evaluation and the validation windows. Nothing here chooses an option: it
measures the spread a reader should expect between two runs that differ only in rounding or draw.
Rows: docs/bench/runs/diag_gptq3_g64_gram{32,64}_seed{s}.json; summary docs/bench/gptq_sensitivity.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager

import torch
from transformers import AutoTokenizer

from bench import common
from worker.compression import gram
from worker.data import load_texts, make_windows
from worker.plan import CompressionPlan

PLAN = CompressionPlan(quant=common.quant("gptq", 3))
GRAM_DTYPES = {64: torch.float64, 32: torch.float32}


def row_name(bits: int, seed: int) -> str:
    return f"diag_gptq3_g64_gram{bits}_seed{seed}"


@contextmanager
def gram_dtype(dtype: torch.dtype):
    saved = gram.GRAM_DTYPE
    gram.GRAM_DTYPE = dtype
    try:
        yield
    finally:
        gram.GRAM_DTYPE = saved


def seeded_protocol(protocol: common.Protocol, tokenizer, seed: int) -> common.Protocol:
    if seed == common.SEED:
        return protocol
    windows = make_windows(tokenizer, load_texts(str(common.CALIBRATION_FILE)), common.CALIBRATION_WINDOWS,
                           common.SEQ_LEN, seed)
    return protocol.with_calibration(windows, f"{common.CALIBRATION_WINDOWS} x {common.SEQ_LEN} tokens of "
                                     f"{common.CALIBRATION_FILE.name}, seed {seed}")


def summarize(seeds: list[int], grams: list[int]) -> dict:
    rows = {}
    for bits in grams:
        for seed in seeds:
            run = common.load_run(row_name(bits, seed))
            if run is not None:
                rows[row_name(bits, seed)] = {
                    "gram_bits": bits, "seed": seed, "ppl": run["ppl"], "val_ppl": run["val_ppl"],
                    "mean_module_error": statistics.fmean(m["error_after"] for m in run["modules"].values()),
                    "commit": run["provenance"]["commit"],
                }
    spread = {}
    for key in ("ppl", "val_ppl"):
        values = [row[key] for row in rows.values() if row[key] is not None]
        if len(values) >= 2:
            spread[key] = {"min": min(values), "max": max(values), "max_over_min": max(values) / min(values)}
    rtn = common.load_run("rtn3_g64")
    return {"plan": common.plan_to_dict(PLAN), "rows": rows, "spread": spread,
            "rtn3_g64_ppl": None if rtn is None else rtn["ppl"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grams", type=int, nargs="+", choices=list(GRAM_DTYPES), default=[64, 32])
    parser.add_argument("--fresh", action="store_true", help="rerun rows that exist already")
    args = parser.parse_args(argv)
    common.set_fresh(args.fresh)
    common.setup(args.threads)
    protocol = common.Protocol()
    tokenizer = AutoTokenizer.from_pretrained(common.MODEL_DIR)
    for seed in args.seeds:  # seed-major: each seed's pair is done before the next seed starts
        diag = seeded_protocol(protocol, tokenizer, seed)
        for bits in args.grams:
            with gram_dtype(GRAM_DTYPES[bits]):
                common.run_config(row_name(bits, seed), PLAN, diag, validate=True,
                                  note=f"Gram accumulated in fp{bits}; calibration seed {seed}")
            summary = summarize(args.seeds, args.grams)
            (common.RESULTS / "gptq_sensitivity.json").write_text(json.dumps(summary, indent=1) + "\n")
    common.log(json.dumps(summarize(args.seeds, args.grams)["spread"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
