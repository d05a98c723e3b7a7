"""GPU check (issue 19 item 5): whole jobs through the worker's pipeline on CUDA, on random LLaMA models
built on the machine itself, so nothing large is copied to it and nothing is downloaded.

    .venv/bin/python -m bench.gpu_check            # on a CUDA machine: writes docs/bench/gpu_check.json
    .venv/bin/python -m bench.gpu_check --smoke    # tiny sizes, CPU only, writes to a temp folder

Every job is run by worker.pipeline.run_pipeline (as `squeeze compress` and the worker run it: load,
calibrate, GPTQ 4-bit g128, EoRA r64, evaluate, export, verify the export, publish locally), with its
mode set explicitly: Settings.stream_layers (streamed from the safetensors one decoder layer at a time,
the default, or the whole model loaded first) and Settings.compute_dtype. In order of priority:
1. CPU vs CUDA on a small model (hidden 1024, 2 layers), streamed fp32: the same job on both devices;
   the compressed models (the published artifacts, loaded as the model card says:
   worker.export.verify.load_export) must give the same logits, relative difference
   ||L_cuda - L_cpu|| / ||L_cpu|| under 1e-3.
2. The speed ratio CPU / CUDA per stage, from the same two jobs. CPU on the hidden-4096 model would take
   far longer than this check may, so the ratio is measured on the small model both devices finish.
3. Large jobs on CUDA: hidden 4096, FFN 14336, 8 layers, vocab 32000 (a LLaMA-3-8B layer shape, saved in
   bf16), one model built once, three modes: streamed fp32, whole-model fp32, streamed bf16 compute
   (--no-bf16 leaves the last out). Each records its mode, the job's metrics["memory"] (activation
   placement and sizes), per-stage times, peak device memory (torch.cuda.max_memory_allocated, reset
   before each job) and peak host RSS (VmHWM, reset before each job through /proc/self/clear_refs, next
   to the RSS the job started from).
The JSON is rewritten after each job, so a run cut short keeps what it measured; a large job that the
previous one's time says would end past --budget-seconds (default 540, inside a 10-minute device call)
is skipped and recorded as skipped.

Time, estimated (not yet measured on a GPU): the small jobs 1-2 min, mostly the CPU one; each large job
1.5-3 min on an H100 (per layer four fp64 eigendecompositions, one of them 14336 x 14336, and fp64 SVDs
of up to 14336 x 4096), the bf16 one a little less; 6-11 min in all, hence the budget. --no-bf16 or
--large-layers 4 make it shorter.

--smoke runs the same code on the CPU ("cuda" jobs run on the CPU too) with tiny sizes, to show the
script works on a machine without a GPU; it never writes docs/bench/gpu_check.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import common
from tests.fixtures_models import SAMPLE_TEXT, make_tokenizer

RESULT = common.RESULTS / "gpu_check.json"
LOGIT_THRESHOLD = 1e-3

# (model dims, job spec overrides) per size; --smoke replaces them with tiny ones
FULL = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000),
    "large": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000),
    # the small model's calibration is half the large one's: its CPU job is the slowest part of the check
    "small_job": dict(group_size=128, rank=64, num_samples=64, seq_len=512, eval_windows=8),
    "large_job": dict(group_size=128, rank=64, num_samples=128, seq_len=512, eval_windows=8),
}
SMOKE = {
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
    "large": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
    "small_job": dict(group_size=32, rank=8, num_samples=16, seq_len=64, eval_windows=4),
    "large_job": dict(group_size=32, rank=8, num_samples=32, seq_len=64, eval_windows=4),
}


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, the peak resident set, to the current one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (Linux), e.g. VmHWM (peak resident set) or VmRSS, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    peak = proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset


def build_model(folder: Path, dims: dict, dtype: torch.dtype, device: str, tokenizer, seed: int = 0) -> Path:
    """A random LLaMA saved with the tokenizer; built on `device` (fast init of a large one on the GPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**dims, max_position_embeddings=4096)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def calibration_text(path: Path, documents: int, words: int, seed: int = 0) -> Path:
    """English-like documents (the words of the test corpus in seeded random order), blank-line separated."""
    vocabulary = SAMPLE_TEXT.replace(".", " .").split()
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choices(vocabulary, k=words)) for _ in range(documents)))
    return path


def job_spec(model_dir: Path, text: Path, job: dict):
    from app.jobs.spec import JobSpec

    return JobSpec.model_validate({
        "model": {"id": str(model_dir)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": job["group_size"]},
        "compensation": {"method": "eora", "rank": job["rank"]},
        "calibration": {"dataset": str(text), "num_samples": job["num_samples"], "seq_len": job["seq_len"]},
        "evaluation": {"num_windows": job["eval_windows"]},
    })


@dataclass(frozen=True)
class Mode:
    """How a job runs: the Settings it sets, whatever their defaults are."""
    stream_layers: bool
    compute_dtype: str = "float32"

    @property
    def label(self) -> str:
        return ("streamed" if self.stream_layers else "whole") + ("" if self.compute_dtype == "float32"
                                                                  else f"-{self.compute_dtype}")


STREAMED, WHOLE, STREAMED_BF16 = Mode(True), Mode(False), Mode(True, "bfloat16")


def run_job(name: str, spec, device: str, mode: Mode, work: Path) -> dict[str, Any]:
    """One job through run_pipeline on `device` in `mode`; its metrics, peaks and where its artifact is."""
    from rich.console import Console

    from app.settings import Settings
    from worker.cli_compress import ConsoleReporter
    from worker.memory import trim_heap
    from worker.pipeline import run_pipeline

    settings = Settings(data_dir=work / "data", artifact_root=work / "artifacts", device=device,
                        allow_local_paths=True, stream_layers=mode.stream_layers, compute_dtype=mode.compute_dtype)
    job_id = uuid.uuid4()
    class LayerTimes(ConsoleReporter):  # the CLI's reporter, keeping each finished layer's seconds
        def progress(self, stage, percent, layer=None, layers=None, message=None, data=None) -> None:
            if data and "seconds" in data:
                layer_seconds.append(data["seconds"])
            super().progress(stage, percent, layer, layers, message, data)

    layer_seconds: list[float] = []
    reporter = LayerTimes(Console(stderr=True))
    gc.collect()
    trim_heap()  # what an earlier job freed goes back to the system before the peak is reset
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    rss_at_start = proc_status_bytes("VmRSS")
    common.log(f"{name}: job on {device}, {mode.label} ...")
    start = time.perf_counter()
    with reporter.bars:
        result = run_pipeline(job_id, spec, settings, reporter)
    wall = time.perf_counter() - start
    metrics = result.metrics
    record = {
        "name": name, "device": metrics["device"], "mode": asdict(mode), "wall_seconds": round(wall, 3),
        "timings_seconds": metrics["timings"], "compression_seconds": metrics["compression"]["seconds"],
        "layer_seconds": layer_seconds, "memory": metrics["memory"],
        "host_rss_at_start_bytes": rss_at_start, "peak_host_rss_bytes": peak_rss(),
        "peak_device_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "perplexity_before": metrics["perplexity_before"], "perplexity_after": metrics["perplexity_after"],
        "mean_relative_error_before": metrics["compression"]["mean_relative_error_before"],
        "mean_relative_error_after": metrics["compression"]["mean_relative_error_after"],
        "max_rank": metrics["compression"]["max_rank"], "export_max_abs_diff": metrics["verification"]["max_abs_diff"],
        "artifact": str(settings.artifacts_dir / str(job_id)),
    }
    common.log(f"{name}: {wall:.1f} s, peak host {record['peak_host_rss_bytes'] / 2**30:.2f} GiB"
               + (f", peak device {record['peak_device_bytes'] / 2**30:.2f} GiB" if device == "cuda" else ""))
    return record


@torch.no_grad()
def artifact_logits(artifact: str, windows: torch.Tensor) -> torch.Tensor:
    from worker.export.verify import load_export

    model = load_export(Path(artifact))
    logits = torch.cat([model(input_ids=batch).logits.double() for batch in windows.split(2)])
    del model
    return logits


def compare(cpu_job: dict, cuda_job: dict, vocab: int) -> dict[str, Any]:
    """Logits of the two compressed models (both loaded on the CPU in fp32) on the same seeded tokens."""
    windows = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    cpu, cuda = artifact_logits(cpu_job["artifact"], windows), artifact_logits(cuda_job["artifact"], windows)
    relative = float((cuda - cpu).norm() / cpu.norm())
    return {"windows": list(windows.shape), "relative_logit_diff": relative,
            "max_abs_logit_diff": float((cuda - cpu).abs().max()), "max_abs_logit": float(cpu.abs().max()),
            "threshold": LOGIT_THRESHOLD, "passes": relative < LOGIT_THRESHOLD,
            "perplexity_after": {"cpu": cpu_job["perplexity_after"], "cuda": cuda_job["perplexity_after"]}}


def speed_ratio(cpu_job: dict, cuda_job: dict) -> dict[str, Any]:
    def ratios(cpu: dict, cuda: dict) -> dict[str, float | None]:
        return {k: round(cpu[k] / cuda[k], 2) if cuda.get(k) else None for k in cpu}

    return {"wall": round(cpu_job["wall_seconds"] / cuda_job["wall_seconds"], 2),
            "timings": ratios(cpu_job["timings_seconds"], cuda_job["timings_seconds"]),
            "compression": ratios(cpu_job["compression_seconds"], cuda_job["compression_seconds"])}


def warm_up(device: str) -> None:
    """CUDA context, cuBLAS and cuSOLVER start-up outside the timed jobs."""
    if device != "cuda":
        return
    a = torch.randn(512, 512, device=device, dtype=torch.float64)
    torch.linalg.eigh(a @ a.T)
    torch.linalg.cholesky(a @ a.T + 512 * torch.eye(512, device=device, dtype=torch.float64))
    torch.randn(512, 512, device=device) @ torch.randn(512, 512, device=device)
    torch.cuda.synchronize()


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def large_jobs(report: dict, out: Path, spec, device: str, modes: list[Mode], work: Path,
               started: float, budget: float) -> None:
    """The large model's jobs in `modes`, in order, each recorded (or its error, or why it was skipped) and
    the JSON rewritten after it; a job the previous one's time says would end past `budget` is skipped."""
    last_wall = None
    for mode in modes:
        name = f"large-{device}-{mode.label}"
        spent = time.perf_counter() - started
        if last_wall is not None and spent + last_wall > budget:
            record = {"name": name, "mode": asdict(mode),
                      "skipped": f"{spent:.0f} s spent + {last_wall:.0f} s (the previous large job) would pass "
                                 f"--budget-seconds {budget:g}"}
            common.log(f"{name}: skipped ({record['skipped']})")
        else:
            try:  # out of memory, say: the other jobs' figures are kept, with the reason
                record = run_job(name, spec, device, mode, work / mode.label)
                last_wall = record["wall_seconds"]
            except Exception as exc:
                record = {"name": name, "mode": asdict(mode), "error": f"{exc.__class__.__name__}: {exc}"}
                common.log(f"{name} failed: {record['error']}")
        report["large_jobs"].append(record)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        write(report, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; writes to a temp folder")
    parser.add_argument("--out", type=Path, help=f"where the JSON goes (default {RESULT}; with --smoke a temp file)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--large-layers", type=int, help="decoder layers of the large model (default 8; 3 with "
                        "--smoke): fewer when the check must be shorter, each costs about the same")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the large streamed job with bf16 compute (default: on)")
    parser.add_argument("--budget-seconds", type=float, default=540.0,
                        help="skip a large job that would end past this many seconds from the start (default 540)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; --smoke runs the same code on the CPU")
    gpu = "cpu" if args.smoke else "cuda"
    sizes = SMOKE if args.smoke else FULL
    if args.large_layers:
        sizes = {**sizes, "large": {**sizes["large"], "num_hidden_layers": args.large_layers}}
    modes = [STREAMED, WHOLE] + ([STREAMED_BF16] if args.bf16 else [])
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-smoke-")) / "gpu_check.json" if args.smoke else RESULT)
    if args.smoke and out.resolve() == RESULT.resolve():
        parser.error(f"--smoke never writes {RESULT}")

    started = time.perf_counter()
    report: dict[str, Any] = {
        "what": "bench/gpu_check.py: GPTQ 4-bit + EoRA jobs through worker.pipeline.run_pipeline on CUDA",
        "smoke": args.smoke, "provenance": common.provenance(), "machine": common.machine(),
        "device_name": torch.cuda.get_device_name() if gpu == "cuda" else "cpu (smoke: the 'cuda' jobs ran on the CPU)",
        "jobs": {"small": sizes["small_job"], "large": sizes["large_job"]},
        "models": {"small": sizes["small"], "large": sizes["large"]},
        "modes": {"small": asdict(STREAMED), "large": [asdict(mode) for mode in modes]},
        "budget_seconds": args.budget_seconds,
        "notes": ["peak_host_rss_bytes is the job's own peak (VmHWM reset before it, from host_rss_at_start_bytes); "
                  "memory.peak_rss_bytes is the pipeline's ru_maxrss, the whole process's peak so far",
                  "peak_device_bytes: torch.cuda.max_memory_allocated, reset before each job"],
        "small_jobs": [], "large_jobs": [],
    }
    warm_up(gpu)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        tokenizer = make_tokenizer()
        largest = sizes["large_job"]
        text = calibration_text(work / "calibration.txt", documents=max(400, largest["num_samples"] * 4),
                                words=max(64, largest["seq_len"] // 2))

        common.log(f"small model {sizes['small']}")
        small = build_model(work / "small", sizes["small"], torch.float32, "cpu", tokenizer)
        small_spec = job_spec(small, text, sizes["small_job"])
        for index, (name, device) in enumerate([("small-cpu", "cpu"), (f"small-{gpu}", gpu)]):  # smoke: both CPU
            report["small_jobs"].append(run_job(name, small_spec, device, STREAMED, work / f"small-{index}"))
            write(report, out)
        cpu_job, cuda_job = report["small_jobs"]
        report["cpu_vs_cuda"] = compare(cpu_job, cuda_job, sizes["small"]["vocab_size"])
        report["speed_ratio_cpu_over_cuda"] = {
            **speed_ratio(cpu_job, cuda_job),
            "note": "measured on the small model: CPU on the hidden-4096 model takes far longer than this check may"}
        common.log(f"CPU vs {gpu}: relative logit difference {report['cpu_vs_cuda']['relative_logit_diff']:.3g}, "
                   f"wall ratio {report['speed_ratio_cpu_over_cuda']['wall']}")
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        write(report, out)

        common.log(f"large model {sizes['large']}")
        try:
            large = build_model(work / "large", sizes["large"], torch.bfloat16, gpu, tokenizer)
            report["large_model_bf16_bytes"] = sum(f.stat().st_size for f in large.glob("*.safetensors"))
            large_jobs(report, out, job_spec(large, text, sizes["large_job"]), gpu, modes, work, started,
                       args.budget_seconds)
        except Exception as exc:
            report["large_model_error"] = f"{exc.__class__.__name__}: {exc}"
            common.log(f"the large model could not be built: {report['large_model_error']}")
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
    for record in report["small_jobs"] + report["large_jobs"]:
        if "artifact" in record:
            record["artifact"] = "deleted with the scratch folder"
    write(report, out)
    common.log(f"wrote {out} ({report['wall_seconds']} s)")
    failed = "large_model_error" in report or any("error" in record for record in report["large_jobs"])
    return 0 if report["cpu_vs_cuda"]["passes"] and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
