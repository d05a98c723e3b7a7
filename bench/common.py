"""Shared protocol and bookkeeping for the SmolLM2 benchmarks (quality, speed, compensation).

Protocol (fixed so results compare across issues and tools):
- model: bench/.data/smollm2-135m, fp32, CPU;
- calibration: 64 windows x 512 tokens at seeded random offsets (seed 0) of the Lee corpus
  (worker.data.make_windows; one document per line, EOS between documents);
- evaluation: the first 80 non-overlapping 512-token windows of wiki_eval.txt
  (worker.data.contiguous_windows; articles split on blank lines, EOS between them), perplexity by
  worker.evaluate.perplexity (exp of the mean NLL over 80 x 511 predicted tokens).

Every configuration writes one JSON file under docs/bench/runs/ when it completes, with the git
commit it ran on (and whether the code was modified) and the library versions ("provenance"); a
rerun skips configurations whose file exists, so an interrupted benchmark resumes where it stopped.
With fresh (the scripts' --fresh) nothing written before this process is reused: every row asked
for is rerun once on the current code, and a row another part of the run asks for again is taken
from this process's own result.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from app.settings import Settings
from bench.sizes import bits_by_kind, bits_per_weight
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec
from worker.data import load_texts, make_windows, token_stream, windows_hash
from worker.evaluate import perplexity
from worker.models import decoder_linears, get_architecture, load_model
from worker.plan import CompressionPlan, CompressionResult
from worker.sequential import compress_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".data"
MODEL_DIR = DATA / "smollm2-135m"
CALIBRATION_FILE = DATA / "lee_background.txt"
EVAL_FILE = DATA / "wiki_eval.txt"
RESULTS = ROOT / "docs" / "bench"
RUNS = RESULTS / "runs"

CALIBRATION_WINDOWS, EVAL_WINDOWS, SEQ_LEN, SEED, BATCH_SIZE = 64, 80, 512, 0, 8
VALIDATION_WINDOWS = 32  # the *last* windows of wiki_eval.txt: for choosing options, never for reporting
DEVICE = torch.device("cpu")



# Rows written by this process; with _fresh set, the only rows that may be reused.
_written: set[str] = set()
_fresh = False


def set_fresh(fresh: bool) -> None:
    """--fresh: rerun every row (and the fp32 reference) instead of reusing files from earlier runs."""
    global _fresh
    _fresh = fresh


def provenance() -> dict:
    """The code and libraries a row ran on: git commit, whether tracked files outside docs/bench (the
    results themselves) differ from it, and the versions that produce and load the numbers."""
    from worker.export.manifest import library_versions

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs/bench")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else status != "",
            "versions": library_versions()}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def lee_calibration(tokenizer, windows: int = CALIBRATION_WINDOWS) -> torch.Tensor:
    """The protocol's calibration windows (seed SEED); with more windows, its first CALIBRATION_WINDOWS
    are the protocol's own."""
    return make_windows(tokenizer, load_texts(str(CALIBRATION_FILE)), windows, SEQ_LEN, SEED)


class Protocol:
    """Tokenized calibration and evaluation windows, built once per process, with the model they are for
    and the folder their rows are written to (SmolLM2 and docs/bench/runs/ unless made by `of`)."""

    model_dir: Path = MODEL_DIR
    runs: Path = RUNS

    def __init__(self) -> None:
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)  # the tokenizer only: no second model in memory
        self.calibration = lee_calibration(tokenizer)
        # The Wikipedia token stream, tokenized once: evaluation = its first windows; validation = its
        # last VALIDATION_WINDOWS windows, ~566k tokens further on. Options (e.g. EoRA damping) are
        # chosen on validation; the evaluation windows report.
        self.eval_stream = token_stream(tokenizer, load_texts(str(EVAL_FILE)))
        self.evaluation = self.eval_stream[: EVAL_WINDOWS * SEQ_LEN].reshape(EVAL_WINDOWS, SEQ_LEN)
        tail = self.eval_stream[len(self.eval_stream) - VALIDATION_WINDOWS * SEQ_LEN :]
        self.validation = tail.reshape(VALIDATION_WINDOWS, SEQ_LEN)
        self.info = {
            "model": str(MODEL_DIR.relative_to(ROOT)),
            "calibration": f"{CALIBRATION_WINDOWS} x {SEQ_LEN} tokens of {CALIBRATION_FILE.name}, seed {SEED}",
            "evaluation": f"first {EVAL_WINDOWS} x {SEQ_LEN} tokens of {EVAL_FILE.name}",
            "calibration_sha256": windows_hash(self.calibration),
            "evaluation_sha256": windows_hash(self.evaluation),
            "validation": f"last {VALIDATION_WINDOWS} x {SEQ_LEN} tokens of {EVAL_FILE.name}",
            "validation_sha256": windows_hash(self.validation),
            "dtype": "float32",
            "device": str(DEVICE),
            "batch_size": BATCH_SIZE,
        }

    @classmethod
    def of(cls, model_dir: Path, runs: Path, calibration: torch.Tensor, evaluation: torch.Tensor,
           validation: torch.Tensor, info: dict) -> Protocol:
        """Another model's windows, its rows written to `runs` (bench.target's smoke run on a tiny model)."""
        protocol = cls.__new__(cls)
        protocol.model_dir, protocol.runs, protocol.info = model_dir, runs, info
        protocol.calibration, protocol.evaluation, protocol.validation = calibration, evaluation, validation
        return protocol

    def with_calibration(self, calibration: torch.Tensor, description: str) -> Protocol:
        """Diagnostic only: the same evaluation and validation windows, calibrated on other windows."""
        diag = copy.copy(self)
        diag.calibration = calibration
        diag.info = {**self.info, "calibration": f"{description} (diagnostic)",
                     "calibration_sha256": windows_hash(calibration)}
        return diag


def fresh_model(model_dir: Path = MODEL_DIR) -> torch.nn.Module:
    model, _ = load_model(model_dir)
    return model


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every decoder Linear, by name: what the bits accounting counts."""
    return {n: (m.out_features, m.in_features) for n, m in decoder_linears(model, get_architecture(model)).items()}


def fp32_reference(protocol: Protocol) -> float:
    """The uncompressed model's perplexity on the protocol, computed once and cached in JSON."""
    path = RESULTS / "fp32_reference.json"
    if path.exists() and not (_fresh and path.name not in _written):
        cached = json.loads(path.read_text())
        if cached["protocol"]["evaluation_sha256"] == protocol.info["evaluation_sha256"]:
            return cached["ppl"]
    log("fp32 reference perplexity ...")
    start = time.perf_counter()
    ppl = perplexity(fresh_model(), protocol.evaluation, DEVICE, BATCH_SIZE)
    record = {"ppl": ppl, "eval_seconds": time.perf_counter() - start, "protocol": protocol.info, "machine": machine(),
              "provenance": provenance()}
    _write(path, record)
    _written.add(path.name)
    log(f"fp32 reference ppl {ppl:.4f} ({record['eval_seconds']:.0f} s)")
    return ppl


def plan_to_dict(plan: CompressionPlan) -> dict:
    """The plan as JSON: its specs as dicts; per-module quantizers and ranks keyed by Linear name."""

    def value(v):
        if isinstance(v, Mapping):
            return {k: value(x) for k, x in v.items()}
        return asdict(v) if is_dataclass(v) else v

    return {k: value(v) for k, v in vars(plan).items()}


# The merge that completed issue 15's numeric fixes (error_after from an untouched W, fp64 Gram, no cut of
# the damped spectrum, true ranks, stored adapters, one owner per default). Rows run on code without it
# (and rows from before provenance was recorded, which came with it) measured through the defects.
FIXES_COMMIT = "cfe14ea"


def on_fixed_code(run: dict, fixes: str = FIXES_COMMIT, repo: Path = ROOT) -> bool:
    """Whether a stored row ran on code that contains the commit `fixes` (git history of repo)."""
    commit = (run.get("provenance") or {}).get("commit")
    if commit is None:
        return False
    check = subprocess.run(["git", "merge-base", "--is-ancestor", fixes, commit], cwd=repo,
                           capture_output=True, check=False)
    if check.returncode not in (0, 1):
        raise RuntimeError(f"git cannot compare commit {commit} with {fixes}: {check.stderr.decode().strip()}")
    return check.returncode == 0


def load_run(name: str, runs: Path | None = None) -> dict | None:
    """The stored row, whenever it was written (summaries read every row there is); runs: RUNS by default."""
    path = (runs or RUNS) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def reusable_run(name: str, runs: Path | None = None) -> dict | None:
    """The stored row if it may stand in for running it: any row, or with fresh only one this process wrote."""
    if _fresh and f"{name}.json" not in _written:
        return None
    return load_run(name, runs)


def run_config(
    name: str,
    plan: CompressionPlan,
    protocol: Protocol,
    note: str | None = None,
    rerun: bool = False,
    after_compress: Callable[[CompressionResult], None] | None = None,
    validate: bool = False,
    planner: Callable[[torch.nn.Module, CompressionPlan], tuple[CompressionPlan, dict]] | None = None,
) -> dict:
    """Compress a fresh model with plan on the calibration windows, evaluate, write runs/<name>.json.

    Returns the stored record; a configuration already on disk is returned without rerunning unless
    rerun. after_compress(result) runs between compression and evaluation (e.g. to read peak memory).
    validate also records the perplexity on the validation windows (val_ppl), used to choose options.
    planner(model, plan) -> (the plan to run, what the row records of the planning) runs on the fresh
    model first (e.g. a size target's plan_for_target, with `plan` its base), timed as stages["planning"].
    """
    done = None if rerun else reusable_run(name, protocol.runs)
    if done is not None:
        log(f"{name}: done already (ppl {done['ppl']:.4f}), skipped")
        return done
    model = fresh_model(protocol.model_dir)
    shapes = linear_shapes(model)
    planning = None
    if planner is not None:
        log(f"{name}: planning ...")
        start = time.perf_counter()
        plan, planning = planner(model, plan)
        planning = {**planning, "seconds": time.perf_counter() - start}
    log(f"{name}: compressing ...")

    def on_layer(report) -> None:
        if report.step % 5 == 0 or report.step == report.steps:
            log(f"  {name}: {report.stage} layer {report.index + 1}/{report.total} ({report.seconds:.1f} s)")

    start = time.perf_counter()
    result = compress_model(model, protocol.calibration, plan, DEVICE, on_layer=on_layer, batch_size=BATCH_SIZE)
    compress_wall = time.perf_counter() - start
    if after_compress is not None:
        after_compress(result)
    log(f"{name}: compressed in {compress_wall:.0f} s; evaluating ...")
    start = time.perf_counter()
    ppl = perplexity(model, protocol.evaluation, DEVICE, BATCH_SIZE)
    eval_seconds = time.perf_counter() - start
    val_ppl = perplexity(model, protocol.validation, DEVICE, BATCH_SIZE) if validate else None
    record = {
        "name": name,
        "plan": plan_to_dict(plan),
        "note": note,
        "ppl": ppl,
        "val_ppl": val_ppl,
        "compress_wall_seconds": compress_wall,
        "eval_seconds": eval_seconds,
        "stages": stage_seconds(result) | ({} if planning is None else {"planning": planning["seconds"]}),
        "planning": planning,
        "budget_params": result.budget_params,
        "adapter_params": result.adapter_params,
        "adapter_bytes": result.adapter_bytes,
        "max_rank": result.max_rank,
        "bits": bits_per_weight(plan, shapes, result),
        "bits_by_kind": bits_by_kind(plan, shapes, result),
        "per_layer": per_layer(result),
        "modules": {
            n: {
                "shape": list(m.shape),
                "rank": m.rank,
                "error_before": m.error_before,
                "error_after": m.error_after,
                "compress_seconds": m.compress_seconds,
                "compensate_seconds": m.compensate_seconds,
                "adapter_params": m.adapter_params,
                "adapter_bytes": m.adapter_bytes,
                "adapter_bits": m.adapter_bits,
                "zero_fraction": m.zero_fraction,
            }
            for n, m in result.modules.items()
        },
        "peak_rss_bytes_process": peak_rss_bytes(),
        "protocol": protocol.info,
        "machine": machine(),
        "provenance": provenance(),
    }
    _write(protocol.runs / f"{name}.json", record)
    _written.add(f"{name}.json")
    log(f"{name}: ppl {ppl:.4f} (compress {compress_wall:.0f} s, eval {eval_seconds:.0f} s)")
    return record


def stage_seconds(result: CompressionResult) -> dict:
    return {
        "calibration": result.calibration_seconds,
        "compression": result.compression_seconds,
        "compensation": result.compensation_seconds,
        "statistics": result.statistics_seconds,
        "propagation": result.propagation_seconds,
        "transfer": result.transfer_seconds,
    }


def per_layer(result: CompressionResult) -> list[dict]:
    """Per decoder layer: seconds of compression (prune/quantize) and of compensation, summed over its Linears."""
    layers: dict[int, dict] = {}
    for name, m in result.modules.items():
        index = int(name.split(".layers.")[1].split(".")[0])
        row = layers.setdefault(index, {"layer": index, "compress_seconds": 0.0, "compensate_seconds": 0.0})
        row["compress_seconds"] += m.compress_seconds
        row["compensate_seconds"] += m.compensate_seconds
    return [layers[i] for i in sorted(layers)]


def quant(method: str, bits: int) -> QuantSpec:
    """The benchmark quantizer: asymmetric, group 64, damp 0.01, no act-order, block 128."""
    return QuantSpec(method=method, bits=bits, group_size=64, symmetric=False, damp=0.01, act_order=False)


def two_four(method: str) -> SparsitySpec:
    return SparsitySpec(method=method, n=2, m=4)


def compensation(method: str, **kwargs) -> CompensationSpec:
    """The benchmark's compensation, every value stated (the job spec's defaults are the user's, not the
    protocol's): the paper's exact EoRA (damp 0) unless a row names its damping, no sink tokens, fp16
    adapters, the relative budget criterion without a floor, no joint refinement, the server's default max_rank."""
    values = {"max_rank": Settings.model_fields["max_rank"].default, "adapter_bits": None,
              "budget_criterion": "relative", "min_rank": 0, "damp": 0.0, "sink_tokens": 0, "refine": 0}
    return CompensationSpec(method=method, **{**values, **kwargs})


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
    tmp.replace(path)
