"""Peak host memory of a whole job, streamed (Settings.stream_layers) against the model loaded whole
(issue 19): does it grow with the number of decoder layers?

Models: random LLaMA-architecture models of 8, 16 and 32 decoder layers at hidden 1024 (FFN 2048, 16
heads, SmolLM2's tokenizer and vocabulary of 49,152 with tied embeddings; the 32-layer one is 1.54 GB
in fp32), built once, seeded, with transformers' LlamaConfig + save_pretrained into bench/.cache;
plus SmolLM2-135M (bench/.data). Job: GPTQ 4-bit g128 (SmolLM2: g64) + EoRA rank 64 through `squeeze compress`
(worker.pipeline.run_pipeline: load, calibration, evaluation before and after, compression, export,
export check), one torch thread. Calibration: Lee windows (random models: 8 x 128 tokens; SmolLM2:
8 x 512), evaluation on the first windows of wiki_eval.txt (random models 4, SmolLM2 8), few to keep
the run short on 2 shared cores.

Each job runs in its own process; its peak RSS is the kernel's high-water mark (VmHWM of
/proc/<pid>/status, read by the job itself at its end; getrusage's ru_maxrss, which the job's metrics
keep, also counts what this process held before the child exec'd). Reported against the model's fp32
size (its parameters x 4 bytes) and against the job's predicted host peak (worker.memory.predict_peak,
in the job's metrics.memory.predicted): measured / predicted per run.

Capped run (--cap): the streamed job of the 32-layer model in a memory cgroup (v1
memory.limit_in_bytes, or v2 memory.max) below the model's fp32 size, made as a child of this
process's own cgroup; page cache of the memory-mapped checkpoint counts against the cgroup but is
reclaimable, so the cap bounds what the job really needs. (ulimit -v / prlimit --as cap address space,
which mmap and torch's allocator reserve far beyond use, so they refuse jobs that would fit.)

Command: `.venv/bin/python -m bench.memory` (about 30 minutes on 2 shared cores)
    -> docs/bench/memory.json; `--only 8,smollm2` for a subset, `--cap` for the capped run.
`--predict`: no job run; the prediction for each run's configuration in memory.json printed next to
its measured peak (seconds; the random models' configs need not be built).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".data"
CACHE = ROOT / "bench" / ".cache"
SMOLLM2 = DATA / "smollm2-135m"
OUT = ROOT / "docs" / "bench" / "memory.json"
LAYERS = (8, 16, 32)
SEED = 0
JOB = ["--quant-method", "gptq", "--bits", "4", "--group-size", "128", "--compensation-method", "eora",
       "--rank", "64", "--calibration", str(DATA / "lee_background.txt"), "--eval-dataset",
       str(DATA / "wiki_eval.txt")]
SIZES = {"random": ["--num-samples", "8", "--seq-len", "128", "--eval-windows", "4"],
         "smollm2": ["--num-samples", "8", "--seq-len", "512", "--eval-windows", "8",
                     "--group-size", "64"]}  # 128 does not divide 576 (the later flag wins)


def random_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


def random_model(layers: int) -> Path:
    """bench/.cache/random-llama-h1024-<layers>l: built once (seeded), fp32 safetensors + SmolLM2's tokenizer."""
    folder = CACHE / f"random-llama-h1024-{layers}l"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(random_config(layers)).to(torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(SMOLLM2).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def fp32_bytes(folder: Path) -> int:
    from transformers import AutoConfig

    from worker.memory import parameter_counts

    return 4 * parameter_counts(AutoConfig.from_pretrained(folder))[0]


def child(model: Path, streamed: bool, sizes: list[str], result_file: Path) -> None:
    """One job in this process; writes its metrics and this process's peak RSS to result_file."""
    import contextlib
    import io

    from app.cli import main

    work = Path(tempfile.mkdtemp(prefix="squeeze-memory-"))
    os.environ.update({"SQUEEZE_STREAM_LAYERS": str(streamed).lower(), "SQUEEZE_DATA_DIR": str(work / "data"),
                       "SQUEEZE_TORCH_THREADS": "1", "SQUEEZE_DEVICE": "cpu"})
    stdout = io.StringIO()
    samples: list[tuple[float, int]] = []  # (seconds since start, VmRSS bytes) every 0.2 s
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append((time.perf_counter() - start, _status_bytes("VmRSS")))

    start = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["compress", str(model), "--out", str(work / "out"), *JOB, *sizes])
        wall = time.perf_counter() - start
        done.set()
        hwm = _status_bytes("VmHWM")
        report = json.loads(stdout.getvalue()) if code == 0 else None
        peak_at = max(samples, key=lambda s: s[1]) if samples else (None, None)
        files = {}
        if code == 0:
            from worker.storage import sha256_file

            files = {p.relative_to(work / "out").as_posix(): sha256_file(p) for p in sorted((work / "out").rglob("*"))
                     if p.is_file() and p.name not in (".squeeze-owner.json", "squeeze.json")}
        result_file.write_text(json.dumps({
            "exit_code": code, "wall_s": round(wall, 2), "peak_rss_bytes": hwm,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "sampled_peak": {"rss_bytes": peak_at[1], "at_s": None if peak_at[0] is None else round(peak_at[0], 1),
                             "stage": _stage_at(peak_at[0], report)},
            "rss_curve_mb": [[round(t, 1), rss // 2**20] for t, rss in samples[::5]],  # every second
            "metrics": None if report is None else report["metrics"], "file_sha256": files}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _status_bytes(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(f"{field}:"))


def _stage_at(seconds: float | None, report: dict | None) -> str | None:
    """The pipeline stage running `seconds` after the job started, from its timings (stages in order;
    data loading counts into evaluation before)."""
    if seconds is None or report is None:
        return None
    timings = report["metrics"]["timings"]
    end = timings["load_s"]
    if seconds <= end:
        return "load"
    begin_compress = timings["total_s"] - sum(timings[k] for k in ("compress_s", "eval_after_s", "export_s",
                                                                    "upload_s"))
    for stage, length in (("data + eval before", begin_compress - end), ("compress", timings["compress_s"]),
                          ("eval after + reference logits", timings["eval_after_s"]),
                          ("export + verify", timings["export_s"]), ("publish", timings["upload_s"])):
        end += length
        if seconds <= end:
            return stage
    return "after"


def run_job(model: Path, streamed: bool, sizes: list[str], cgroup: Path | None = None) -> dict:
    """One job in a fresh process (optionally inside a cgroup); its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_file = Path(handle.name)
    args = [sys.executable, "-m", "bench.memory", "--child", json.dumps(
        {"model": str(model), "streamed": streamed, "sizes": sizes, "result": str(result_file)})]
    preexec = None
    if cgroup is not None:
        def preexec():  # the child joins the cgroup before it execs
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    proc = subprocess.run(args, cwd=ROOT, preexec_fn=preexec, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    try:
        result = json.loads(result_file.read_text()) if result_file.stat().st_size else None
    finally:
        result_file.unlink(missing_ok=True)
    if result is None:
        return {"exit_code": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    if result["exit_code"] != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


def make_cgroup(limit: int) -> tuple[Path, str]:
    """A child memory cgroup of this process's own, limited to `limit` bytes: (folder, the limit file)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder, limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "squeeze-bench-memory", \
                "memory.limit_in_bytes"
            break
        if hierarchy == "0":
            folder, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/") / "squeeze-bench-memory", "memory.max"
    folder.mkdir(exist_ok=True)
    (folder / limit_file).write_text(str(limit))
    if limit_file == "memory.limit_in_bytes":
        swap = folder / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
    return folder, limit_file


def row(name: str, model: Path, result: dict, size: int) -> dict:
    from bench.common import provenance  # here, not at the top: the jobs' child processes do not import it

    peak = result.get("peak_rss_bytes")
    predicted = (result.get("metrics") or {}).get("memory", {}).get("predicted", {}).get("host_bytes")
    return {"model": name, **result, "model_fp32_bytes": size,
            "peak_over_fp32": None if peak is None else round(peak / size, 3), "predicted_host_bytes": predicted,
            "peak_over_predicted": None if peak is None or not predicted else round(peak / predicted, 3),
            "provenance": provenance()}


def predict(label: str, mode: str) -> tuple[int, str]:
    """(predicted host bytes, the step of the peak) of a run of this benchmark, from its configuration
    alone, as the job would predict it on the CPU (fp32, Settings.activations "host")."""
    from transformers import AutoConfig

    from app.cli import build_parser
    from app.compress_args import spec_from_args
    from worker.memory import predict_peak

    smollm2 = label == "smollm2-135m"
    config = AutoConfig.from_pretrained(SMOLLM2) if smollm2 else random_config(int(label.split("-")[-1][:-1]))
    sizes = SIZES["smollm2" if smollm2 else "random"]
    spec = spec_from_args(build_parser().parse_args(["compress", str(SMOLLM2), "--out", "unused", *JOB, *sizes]))
    need = predict_peak(config, spec, on_cpu=True, streamed=mode.startswith("streamed"))
    return need.host_bytes, need.host_step


def print_predictions(runs: dict) -> None:
    """Each run's prediction from today's code next to its measured peak (VmHWM) in memory.json."""
    print("| model | mode | predicted host peak (GB) | step | measured peak RSS (GB) | measured / predicted |")
    print("|---|---|---:|---|---:|---:|")
    for (label, mode), run in runs.items():
        predicted, step = predict(label, mode)
        peak = run.get("peak_rss_bytes")
        print(f"| {label} | {mode} | {predicted / 1e9:.3f} | {step} | "
              f"{'-' if peak is None else f'{peak / 1e9:.3f}'} | {'-' if peak is None else f'{peak / predicted:.2f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="8,16,32,smollm2", help="comma-separated: 8,16,32,smollm2")
    parser.add_argument("--modes", default="streamed,whole", help='streamed,whole; "none" with --cap')
    parser.add_argument("--cap", action="store_true", help="also the capped streamed run of the 32-layer model")
    parser.add_argument("--cap-fraction", type=float, default=0.95, help="cap = this x the model's fp32 size")
    parser.add_argument("--predict", action="store_true", help="print each run's prediction next to its peak")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        child(Path(spec["model"]), spec["streamed"], spec["sizes"], Path(spec["result"]))
        return

    results = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": []}
    runs = {(r["model"], r["mode"]): r for r in results["runs"]}
    if args.predict:
        print_predictions(runs)
        return
    modes = [m for m in args.modes.split(",") if m in ("streamed", "whole")]  # "none": only --cap
    for name in args.only.split(",") if modes else []:
        model = SMOLLM2 if name == "smollm2" else random_model(int(name))
        label = "smollm2-135m" if name == "smollm2" else f"random-llama-h1024-{name}l"
        sizes = SIZES["smollm2" if name == "smollm2" else "random"]
        for mode in modes:
            print(f"{label} {mode} ...", flush=True)
            result = run_job(model, mode == "streamed", sizes)
            runs[(label, mode)] = {**row(label, model, result, fp32_bytes(model)), "mode": mode,
                                   "job": " ".join(JOB[:10] + sizes), "threads": 1}
            r = runs[(label, mode)]
            print(f"  exit {r['exit_code']}, peak RSS {r.get('peak_rss_bytes', 0) / 1e9:.3f} GB = "
                  f"{r['peak_over_fp32']} x fp32 {r['model_fp32_bytes'] / 1e9:.3f} GB = {r['peak_over_predicted']} x "
                  f"predicted, wall {r.get('wall_s')} s", flush=True)
            _save(results, runs)
    if args.cap:
        model = random_model(32)
        size = fp32_bytes(model)
        limit = int(size * args.cap_fraction)
        folder, limit_file = make_cgroup(limit)
        try:
            print(f"capped: {limit / 1e9:.3f} GB ({folder}/{limit_file}) ...", flush=True)
            result = run_job(model, True, SIZES["random"], cgroup=folder)
            failcnt = folder / "memory.failcnt"
            capped = {**row("random-llama-h1024-32l", model, result, size), "mode": "streamed, capped",
                      "cap_bytes": limit, "cap_how": f"cgroup {limit_file} = {limit}",
                      "cgroup_failcnt": int(failcnt.read_text()) if failcnt.exists() else None}
            max_usage = folder / "memory.max_usage_in_bytes"
            if max_usage.exists():
                capped["cgroup_max_usage_bytes"] = int(max_usage.read_text())
            runs[("random-llama-h1024-32l", "streamed, capped")] = capped
            print(f"  exit {capped['exit_code']}, peak RSS {capped.get('peak_rss_bytes', 0) / 1e9:.3f} GB = "
                  f"{capped['peak_over_predicted']} x predicted", flush=True)
        finally:
            folder.rmdir()
        _save(results, runs)


def _save(results: dict, runs: dict) -> None:
    results["runs"] = list(runs.values())
    by = {(r["model"], r["mode"]): r for r in results["runs"]}
    criteria = {}
    s8 = by.get(("random-llama-h1024-8l", "streamed"))
    s32 = by.get(("random-llama-h1024-32l", "streamed")) or by.get(("random-llama-h1024-32l", "streamed, capped"))
    if s8 and s32 and s8.get("peak_rss_bytes") and s32.get("peak_rss_bytes"):
        criteria["streamed 32-layer peak / 8-layer peak (<= 1.25)"] = round(s32["peak_rss_bytes"] /
                                                                          s8["peak_rss_bytes"], 3)
        criteria["streamed 32-layer peak / its fp32 size (< 1)"] = s32["peak_over_fp32"]
    a, b = by.get(("smollm2-135m", "streamed")), by.get(("smollm2-135m", "whole"))
    if a and b and a.get("metrics") and b.get("metrics"):
        criteria["smollm2 perplexity after, streamed == whole"] = (a["metrics"]["perplexity_after"]
                                                                   == b["metrics"]["perplexity_after"])
        criteria["smollm2 artifact files identical (sha256, squeeze.json aside)"] = a["file_sha256"] == b["file_sha256"]
        criteria["smollm2 wall time streamed / whole (<= 1.10)"] = round(a["wall_s"] / b["wall_s"], 3)
    results["criteria"] = criteria
    results["measured_over_predicted"] = {f"{r['model']} {r['mode']}": r.get("peak_over_predicted")
                                          for r in results["runs"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
