"""Issue 5's cold-reload check on the real model: a whole job (the same pipeline the worker runs,
export and in-job verification included) on SmolLM2-135M with GPTQ 4-bit g64 + EoRA rank 32, on the
benchmark protocol; then the exported folder is reloaded cold with transformers + PEFT in this
process and its held-out perplexity is computed on the same 80 x 512 Wikipedia windows.

    .venv/bin/python -m bench.export_check [--out DIR]   -> docs/bench/export_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from pathlib import Path

import torch

from app.jobs.spec import JobSpec
from app.settings import Settings
from bench import common


class Quiet:
    def progress(self, stage, percent, layer=None, layers=None, message=None, data=None):
        if message and not message.startswith("layer "):
            common.log(message)

    def event(self, stage, message, level="info", data=None):
        common.log(message)

    def check_cancelled(self):
        return None


@torch.no_grad()
def plain_perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) with the model's own forward, summed over all predicted tokens window by
    window (fp32 within a window, fp64 across), as worker.evaluate.perplexity sums."""
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()  # (b, L-1, vocab)
        targets = batch[:, 1:]
        for row in range(batch.shape[0]):
            nll += float(torch.nn.functional.cross_entropy(logits[row], targets[row], reduction="sum").double())
        count += targets.numel()
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=common.ROOT / "bench" / ".cache" / "export_check")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    common.setup(args.threads)
    from worker.export.verify import load_export
    from worker.pipeline import run_pipeline

    spec = JobSpec.model_validate({
        "model": {"id": str(common.MODEL_DIR)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 64},
        "compensation": {"method": "eora", "rank": 32},
        "calibration": {"dataset": str(common.CALIBRATION_FILE), "num_samples": 64, "seq_len": 512, "seed": 0},
        "evaluation": {"dataset": str(common.EVAL_FILE), "num_windows": 80, "seq_len": 512},
        "destination": {"uri": str(args.out.resolve())},
    })
    settings = Settings(data_dir=common.ROOT / "bench" / ".cache" / "squeeze", allow_local_paths=True,
                        artifact_root=args.out.resolve().parent)
    manifest_path = args.out / "squeeze.json"
    job_seconds = None
    if not manifest_path.exists():  # a finished export is reused: the job is the slow part
        start = time.perf_counter()
        run_pipeline(uuid.uuid4(), spec, settings, Quiet())
        job_seconds = time.perf_counter() - start
    manifest = json.loads(manifest_path.read_text())

    protocol = common.Protocol()
    start = time.perf_counter()
    reloaded = load_export(args.out)  # transformers + PEFT, no Squeeze code in the forward
    cold = plain_perplexity(reloaded, protocol.evaluation)
    in_job = manifest["evaluation"]["perplexity_after"]
    record = {
        "spec": spec.model_dump(mode="json"),
        "in_job_perplexity_after": in_job,
        "cold_reload_perplexity": cold,
        "relative_difference": abs(cold - in_job) / in_job,
        "in_job_perplexity_before": manifest["evaluation"]["perplexity_before"],
        "job_seconds": job_seconds,
        "reload_eval_seconds": time.perf_counter() - start,
        "artifact_files": sorted(p.relative_to(args.out).as_posix() for p in args.out.rglob("*") if p.is_file()),
    }
    (common.RESULTS / "export_check.json").write_text(json.dumps(record, indent=1) + "\n")
    common.log(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
