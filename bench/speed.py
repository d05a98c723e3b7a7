"""Speed benchmark (issue 3): wall time of each stage of GPTQ 4-bit g64 on SmolLM2-135M against one
plain forward pass over the same calibration tokens, measured in the same process.

    .venv/bin/python -m bench.speed [--threads 2]

Writes docs/bench/speed.json (and docs/bench/runs/gptq4_g64.json, the quality row of the same run).
Order in the process: a one-batch warm-up forward; the compression run (stages from
CompressionResult; peak resident memory read right after it); held-out evaluation (reported apart);
then the plain forwards: model(...) with logits, and the decoder stack alone (no lm_head), each over
the 64 x 512 calibration tokens in batches of 8 under no_grad; then capture of layer-0 inputs alone.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import common
from worker.activations import capture_layer_inputs
from worker.models import get_architecture
from worker.plan import CompressionPlan


@torch.no_grad()
def timed_forward(fn, windows: torch.Tensor) -> float:
    start = time.perf_counter()
    for batch in windows.split(common.BATCH_SIZE):
        out = fn(batch)
        del out
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    common.setup(args.threads)
    out = common.RESULTS / "speed.json"
    protocol = common.Protocol()
    calibration = protocol.calibration

    model = common.fresh_model()
    size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    timed_forward(lambda b: model(input_ids=b, use_cache=False), calibration[:1])  # warm-up
    del model
    rss_after_load = common.peak_rss_bytes()

    memory = {}

    def after_compress(result) -> None:
        memory["peak_rss_after_compression"] = common.peak_rss_bytes()

    plan = CompressionPlan(quant=common.quant("gptq", 4))
    record = common.run_config("gptq4_g64", plan, protocol, rerun=True, after_compress=after_compress)

    model = common.fresh_model()
    common.log("plain forward, model(...) with logits ...")
    forward_full = timed_forward(lambda b: model(input_ids=b, use_cache=False), calibration)
    common.log(f"  {forward_full:.1f} s")
    arch = get_architecture(model)
    base = arch.module(model, "base_model")
    forward_decoder = timed_forward(lambda b: base(input_ids=b, use_cache=False), calibration)
    common.log(f"decoder-only forward {forward_decoder:.1f} s")
    start = time.perf_counter()
    capture_layer_inputs(model, arch, calibration, common.BATCH_SIZE)
    capture = time.perf_counter() - start

    stages = record["stages"]
    gram_forwards = stages["calibration"] - capture  # layer forwards with the Gram hooks
    pipeline = stages["calibration"] + stages["compression"] + stages["propagation"]
    everything = record["compress_wall_seconds"]
    result = {
        "config": "GPTQ 4-bit, group 64, asymmetric, damp 0.01, no act-order, block 128",
        "calibration_tokens": int(calibration.numel()),
        "stages_seconds": {
            "capture_layer0_inputs (measured alone, after the run)": capture,
            "gram_forwards (calibration - capture)": gram_forwards,
            "calibration (capture + gram forwards)": stages["calibration"],
            "gptq_math": stages["compression"],
            "statistics (relative errors)": stages["statistics"],
            "propagation": stages["propagation"],
            "transfer": stages["transfer"],
            "compress_model wall": everything,
            "evaluation (apart; 80 x 512 tokens)": record["eval_seconds"],
        },
        "forward_seconds": {"model(...) with logits": forward_full, "decoder stack only": forward_decoder},
        "ratio_calibration_compression_propagation_vs_forward": pipeline / forward_full,
        "ratio_vs_decoder_only_forward": pipeline / forward_decoder,
        "ratio_compress_model_wall_vs_forward": everything / forward_full,
        "target_ratio": 3.0,
        "met": pipeline / forward_full < 3.0,
        "memory": {
            "fp32_model_bytes": size_bytes,
            "peak_rss_after_load_and_warmup": rss_after_load,
            "peak_rss_after_compression": memory["peak_rss_after_compression"],
            "peak_rss_over_model_size": memory["peak_rss_after_compression"] / size_bytes,
        },
        "ppl": record["ppl"],
        "machine": common.machine(),
        "protocol": protocol.info,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    common.log(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
