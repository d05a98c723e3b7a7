"""One job, end to end: resolve -> load -> calibration data -> evaluate -> compress -> evaluate -> save.

Called by the Celery task (through worker.jobrunner) and by `squeeze compress`, with a reporter
that receives progress, events and cancellation checks.
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import SecretStr

from app.errors import InvalidSpec
from app.jobs.destinations import scheme_of
from app.jobs.service import UPLOAD_PREFIX, looks_local, resolve_upload
from app.jobs.spec import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    Compensation,
    JobSpec,
    Quantization,
    RankBudget,
    Sparsity,
    Target,
)
from app.settings import Settings
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec
from worker.errors import JobFailure

if TYPE_CHECKING:
    from worker.activations import Placement

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1  # of calibration documents (or tokens, when they are few), without an evaluation dataset


class Reporter(Protocol):
    def progress(self, stage: str, percent: float, layer: int | None = None, layers: int | None = None,
                 message: str | None = None, data: dict[str, Any] | None = None) -> None: ...
    def event(self, stage: str, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None: ...
    def check_cancelled(self) -> None: ...


@dataclass
class PipelineResult:
    metrics: dict[str, Any]
    artifacts: dict[str, Any]


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def quant_spec(q: Quantization) -> QuantSpec:
    """With a size target the spec has no bits or group size: the defaults stand in until plan_for_target
    chooses them for every Linear."""
    return QuantSpec(method=q.method, bits=q.bits or DEFAULT_BITS, group_size=q.group_size or DEFAULT_GROUP_SIZE,
                     symmetric=q.symmetric, damp=q.damp, act_order=q.act_order)


def sparsity_spec(s: Sparsity) -> SparsitySpec:
    n, m = s.nm or (None, None)
    return SparsitySpec(method=s.method, ratio=s.ratio, n=n, m=m)


def compensation_spec(c: Compensation, max_rank: int) -> CompensationSpec | None:
    """None for method 'none'. max_rank: the server's Settings.max_rank."""
    if c.method == "none":
        return None
    budget = c.rank_budget
    # A size target's spec has neither rank nor budget: rank 1 stands in until plan_for_target chooses each Linear's.
    rank = 1 if c.rank is None and budget is None else c.rank
    return CompensationSpec(
        method=c.method, rank=rank, budget_params=None if budget is None else budget.params,
        budget_fraction=None if budget is None else budget.fraction, max_rank=max_rank, adapter_bits=c.adapter_bits,
        budget_criterion=RankBudget.model_fields["criterion"].default if budget is None else budget.criterion,
        min_rank=0 if budget is None else budget.min_rank, damp=c.damp, sink_tokens=c.sink_tokens,
        refine=c.refine)


def compression_plan(spec: JobSpec, max_rank: int):
    """The job spec as the compression math's plan: the one spec-to-plan mapping (the job spec owns the
    defaults; bench/ and tests build plans through this or say every value). max_rank: Settings.max_rank."""
    from worker.plan import CompressionPlan

    too_high = spec.compensation.above_max_rank(max_rank) if spec.compensation is not None else None
    if too_high is not None:
        raise JobFailure(": ".join(too_high))
    return CompressionPlan(
        quant=None if spec.quantization is None else quant_spec(spec.quantization),
        sparsity=None if spec.sparsity is None else sparsity_spec(spec.sparsity),
        compensation=None if spec.compensation is None else compensation_spec(spec.compensation, max_rank))


def check_plan_fits(model, arch, plan) -> None:
    """Refuse before any work when a group size or N:M block does not divide a layer's input width, or a
    rank budget cannot pay for its min_rank floor."""
    from worker.compression.ranks import rank_cap, resolve_budget
    from worker.models import decoder_linears

    linears = decoder_linears(model, arch)
    widths = sorted({linear.in_features for name, linear in linears.items() if name not in plan.module_quant})
    spec = plan.compensation
    if plan.uses_budget and spec.min_rank:
        shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
        budget = resolve_budget(spec.budget_params, spec.budget_fraction, shapes)
        floor = sum(min(spec.min_rank, spec.max_rank, rank_cap(*shape)) * sum(shape) for shape in shapes.values())
        if floor > budget:
            raise JobFailure(f"compensation.rank_budget.min_rank {spec.min_rank} on all {len(shapes)} Linears takes "
                             f"{floor:,} adapter parameters, more than the budget of {budget:,}")
    if plan.quant is not None and plan.quant.group_size != -1:
        bad = [w for w in widths if w % plan.quant.group_size]
        if bad:
            raise JobFailure(
                f"quantization.group_size {plan.quant.group_size} does not divide the input width {bad[0]} of "
                f"this model's Linear layers (widths: {widths}); choose a common divisor or -1 (per channel)")
    if plan.sparsity is not None and plan.sparsity.m is not None:
        bad = [w for w in widths if w % plan.sparsity.m]
        if bad:
            raise JobFailure(f"sparsity.pattern {plan.sparsity.n}:{plan.sparsity.m} needs input widths divisible "
                             f"by {plan.sparsity.m}; this model has {bad[0]}")


# A size target's options. Group sizes: not 32 (fp16 scales cost 0.5 bits per weight there, and SmolLM2, the
# benchmark model, sits on a 4-bit group-32 grid that would flatter it); RTN measures the error curves (one
# rounding per option; the job then runs its own quantizer on the chosen one).
TARGET_BITS = (2, 3, 4, 8)
TARGET_GROUP_SIZES = (64, 128, -1)


def size_target(target: Target, compensates: bool, max_rank: int):
    """The job's target as the worker's SizeTarget: what the engine loads, ranks up to the server's max_rank."""
    from worker.engines import VLLM_LORA_RANKS, VLLM_WNA16_BITS
    from worker.target import SizeTarget

    ranks = (0, *(r for r in VLLM_LORA_RANKS if r <= max_rank)) if compensates else (0,)
    return SizeTarget(bits_per_weight=target.bits_per_weight, engine=target.engine,
                      bits=VLLM_WNA16_BITS if target.engine == "vllm" else TARGET_BITS,
                      group_sizes=TARGET_GROUP_SIZES, ranks=ranks, measure_with="rtn")


def _dataset_source(settings: Settings, ref: str, field: str) -> tuple[str, bool]:
    """(what load_texts reads, whether it is a local file or folder). A Hub id is never looked up on disk."""
    if ref.startswith(UPLOAD_PREFIX):
        try:
            return str(resolve_upload(settings, ref)), True
        except InvalidSpec as exc:
            raise JobFailure(str(exc)) from None
    if not looks_local(ref):
        return ref, False
    path = Path(ref.removeprefix("file://")).expanduser()
    if not settings.local_path_permitted(path):
        raise JobFailure(f"{field} {ref!r}: local paths are not allowed on this server")
    return str(path), True


def _load(settings: Settings, ref: str, field: str, split: str, text_field: str, token: str | None) -> list[str]:
    from worker.data import load_texts

    source, local = _dataset_source(settings, ref, field)
    return load_texts(source, split=split, text_field=text_field, allow_local=local, token=token)


def public_ref(ref: str | None) -> str | None:
    """A reference as an artifact may show it: a local path of the server becomes just "local"."""
    return "local" if ref is not None and looks_local(ref) else ref


def public_spec(spec: JobSpec) -> dict[str, Any]:
    """The job spec for the manifest, without the server's paths (models and artifacts get shared) or
    the webhook URL (it may carry the receiver's own token)."""
    data = spec.model_dump(mode="json", exclude={"webhook_url"})
    data["model"]["id"] = public_ref(data["model"]["id"])
    for section in ("calibration", "evaluation"):
        data[section]["dataset"] = public_ref(data[section]["dataset"])
    if scheme_of(data["destination"]["uri"]) == "local" and data["destination"]["uri"] is not None:
        data["destination"]["uri"] = "local"
    return data


def _without_path(exc: Exception, path: Path) -> str:
    return str(exc).replace(str(path), "the model folder")


def load_windows(spec: JobSpec, settings: Settings, tokenizer,
                 token: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(calibration windows, evaluation windows, a description of both).

    Without evaluation.dataset the calibration text's last tenth is held back for evaluation: its last
    tenth of documents when it has ten or more and they hold a whole evaluation window, else the last
    tenth of its tokens (one document, or a few KB). The held-back slice gives what it has, up to
    num_windows windows, or one shorter window when it holds less than one; info["notes"] says so
    whenever evaluation runs on fewer or shorter windows than asked.
    """
    from worker.data import (
        DataError,
        contiguous_windows,
        make_windows,
        stream_windows,
        token_stream,
        windows_hash,
    )

    cal, ev = spec.calibration, spec.evaluation
    eval_len = ev.seq_len or cal.seq_len
    notes: list[str] = []
    try:
        texts = _load(settings, cal.dataset, "calibration.dataset", cal.split, cal.text_field, token)
        if ev.dataset is not None:
            eval_texts = _load(settings, ev.dataset, "evaluation.dataset", ev.split, ev.text_field, token)
            calibration = make_windows(tokenizer, texts, cal.num_samples, cal.seq_len, cal.seed)
            evaluation, eval_source = contiguous_windows(tokenizer, eval_texts, ev.num_windows, eval_len), public_ref(ev.dataset)
        else:
            held_docs = int(len(texts) * HELD_OUT_FRACTION)
            held_stream = token_stream(tokenizer, texts[-held_docs:]) if held_docs else None
            if held_stream is not None and len(held_stream) >= eval_len:
                calibration = make_windows(tokenizer, texts[:-held_docs], cal.num_samples, cal.seq_len, cal.seed)
                eval_source = f"last {held_docs} of {len(texts)} documents of the calibration dataset"
            else:
                stream = token_stream(tokenizer, texts)
                held_tokens = int(len(stream) * HELD_OUT_FRACTION)
                if held_tokens < 2:
                    raise JobFailure(f"calibration.dataset has {len(stream)} tokens, too few to hold back an "
                                     "evaluation slice: give evaluation.dataset or more text")
                held_stream = stream[len(stream) - held_tokens:]
                calibration = stream_windows(stream[: len(stream) - held_tokens], cal.num_samples, cal.seq_len,
                                             cal.seed)
                eval_source = (f"last {held_tokens} of {len(stream)} tokens of the calibration dataset "
                               f"({len(texts)} document{'s' if len(texts) != 1 else ''}: too few to hold back "
                               "a tenth of the documents)")
            evaluation = _held_back_windows(held_stream, ev.num_windows, eval_len, notes)
    except DataError as exc:
        raise JobFailure(f"data: {exc}") from None
    info = {"calibration_windows": list(calibration.shape), "calibration_hash": windows_hash(calibration),
            "evaluation_windows": list(evaluation.shape), "evaluation_source": eval_source, "notes": notes}
    return calibration, evaluation, info


def _held_back_windows(stream: torch.Tensor, num_windows: int, seq_len: int, notes: list[str]) -> torch.Tensor:
    """Up to num_windows non-overlapping windows of the held-back stream; one shorter window if it holds
    less than one. A note for each shortfall."""
    count = min(num_windows, len(stream) // seq_len)
    if count == 0:
        notes.append(f"evaluation runs on 1 window of {len(stream)} tokens, not {num_windows} of {seq_len}: the "
                     "held-back slice of the calibration text holds less than one window (give evaluation.dataset "
                     "for a full evaluation)")
        return stream.reshape(1, -1)
    if count < num_windows:
        notes.append(f"evaluation runs on {count} windows of {seq_len} tokens, not the {num_windows} asked: that "
                     "is all the held-back slice of the calibration text holds (give evaluation.dataset for more)")
    return stream[: count * seq_len].reshape(count, seq_len)


def compute_dtype(setting: str) -> torch.dtype | None:
    """Settings.compute_dtype as a torch dtype; None for "auto" (the checkpoint's own)."""
    return None if setting == "auto" else getattr(torch, setting)


def run_pipeline(job_id: uuid.UUID, spec: JobSpec, settings: Settings, reporter: Reporter,
                 token: str | None = None) -> PipelineResult:
    """token: the job's own Hugging Face token (else the server's), for download and Hub upload."""
    scratch = settings.data_dir / "work" / f"{job_id}.layers"  # a streamed run's finished layers
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        return _run_pipeline(job_id, spec, settings, reporter, token, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_pipeline(job_id: uuid.UUID, spec: JobSpec, settings: Settings, reporter: Reporter, token: str | None,
                  scratch: Path) -> PipelineResult:
    from worker.evaluate import perplexity
    from worker.export import export_model, reference_logits, verify_export, verify_export_streamed
    from worker.export.streamed import layer_logits
    from worker.hub import resolve_model
    from worker.models import ModelLoadError, UnsupportedArchitecture, get_architecture, load_model, load_tokenizer
    from worker.sequential import compress_model
    from worker.storage import DestinationOptions, LocalDestination, destination_for
    from worker.stream import StreamedLayers

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    destination = destination_for(  # checked before any work: the stored spec may predate today's rules
        spec.destination.uri, artifacts_dir=settings.artifacts_dir,
        options=DestinationOptions(private=spec.destination.private, create_repo=spec.destination.create_repo,
                                   token=SecretStr(token) if token else None),
        s3_endpoint_url=settings.s3_endpoint_url, hf_endpoint=settings.hf_endpoint, hf_token=settings.hf_token,
    )
    if isinstance(destination, LocalDestination):
        destination.target(str(job_id))

    reporter.progress("loading", 1.0, message=f"resolving model {spec.model.id}@{spec.model.revision}")
    resolved = resolve_model(spec.model.id, spec.model.revision, settings, token=token)
    dtype = compute_dtype(settings.compute_dtype)
    if settings.memory_check:
        from worker.memory import check_memory

        check_memory(resolved.path, spec, device, streamed=settings.stream_layers,
                     dtype_bytes=4 if dtype is None else dtype.itemsize,  # "auto": at most fp32
                     activations=settings.activations)
    try:
        if settings.stream_layers:
            model = StreamedLayers(resolved.path, scratch, dtype)
            tokenizer = load_tokenizer(resolved.path)
        else:
            model, tokenizer = load_model(resolved.path, "auto" if dtype is None else dtype)
        arch = model.arch if settings.stream_layers else get_architecture(model)
    except (ModelLoadError, UnsupportedArchitecture) as exc:  # messages name the folder: show the caller's id
        raise JobFailure(f"model {spec.model.id!r}: {_without_path(exc, resolved.path)}") from None
    except (OSError, ValueError) as exc:
        raise JobFailure(f"model {spec.model.id!r} could not be loaded: {_without_path(exc, resolved.path)}") from None
    skeleton = model.model if settings.stream_layers else model  # the CausalLM (all on meta when streamed)
    n_layers = len(arch.decoder_layers(skeleton))
    timings["load_s"] = time.perf_counter() - started
    how = ("streamed from its safetensors one decoder layer at a time" if settings.stream_layers
           else "loaded whole on CPU")
    reporter.progress("loading", 3.0, layer=0, layers=n_layers,
                      message=f"{arch.family} model with {n_layers} decoder layers {how}; compute device {device}")

    calibration, evaluation, data_info = load_windows(spec, settings, tokenizer, token)
    for note in data_info["notes"]:
        reporter.event("calibration", note, level="warning")
    reporter.progress("calibration", 5.0, layer=0, layers=n_layers,
                      message=f"calibration {tuple(calibration.shape)} tokens, evaluation {tuple(evaluation.shape)}")
    placement, activations_bytes = _place_activations(settings, skeleton, calibration, evaluation, device, scratch,
                                                      reporter)
    reporter.check_cancelled()

    plan = compression_plan(spec, settings.max_rank)
    target_info = None
    if spec.target is not None and spec.target.bits_per_weight is not None:
        plan, target_info = _plan_for_target(model, calibration, plan, spec, settings, device, reporter, n_layers)
    check_plan_fits(skeleton, arch, plan)
    from worker.resume import open_checkpoints

    checkpoints, resume = open_checkpoints(job_id, spec, settings, getattr(reporter, "attempt", None), plan, device,
                                           resolved.revision, data_info["calibration_hash"])

    t0 = time.perf_counter()
    if resume is not None and "perplexity_before" in resume.meta:
        ppl_before = resume.meta["perplexity_before"]
    else:
        ppl_before = perplexity(model, evaluation, device, placement=placement)
    timings["eval_before_s"] = time.perf_counter() - t0
    reporter.progress("evaluating", 10.0, layer=0, layers=n_layers, message=f"perplexity before: {ppl_before:.4f}")
    reporter.check_cancelled()
    if checkpoints is not None:
        checkpoints.meta["perplexity_before"] = ppl_before
    if resume is not None:
        walk = "" if resume.walk == "compress" else " of the compensation walk"
        where = (f"at layer {resume.done + 1} of {n_layers}{walk}" if resume.done < n_layers
                 else f"after layer {n_layers} of {n_layers}{walk}")
        steps = n_layers * (2 if plan.uses_budget else 1)
        reporter.progress(resume.walk, 10.0 + 75.0 * resume.run["step"] / steps, layer=resume.done, layers=n_layers,
                          message=f"resumed {where} (attempt {checkpoints.attempt}): {resume.done} finished layers "
                                  "restored from an earlier attempt's checkpoint",
                          data={"walk": resume.walk, "layers_restored": resume.done})

    def on_layer(report) -> None:
        reporter.progress(report.stage, 10.0 + 75.0 * report.step / report.steps, layer=report.index + 1,
                          layers=report.total,
                          message=f"layer {report.index + 1}/{report.total} {report.stage} done in {report.seconds:.2f}s",
                          data=layer_summary(report))
        reporter.check_cancelled()

    t0 = time.perf_counter()
    result = compress_model(model, calibration, plan, device, on_layer=on_layer, on_module=reporter.check_cancelled,
                            checkpoints=checkpoints, resume=resume, activations=placement)
    timings["compress_s"] = time.perf_counter() - t0
    for note in result.notes:
        reporter.event("compress", note, level="warning")

    t0 = time.perf_counter()
    ppl_after = perplexity(model, evaluation, device, placement=placement)
    timings["eval_after_s"] = time.perf_counter() - t0
    reporter.progress("evaluating", 90.0, layer=n_layers, layers=n_layers, message=f"perplexity after: {ppl_after:.4f}")
    reporter.check_cancelled()

    reporter.progress("exporting", 92.0, layer=n_layers, layers=n_layers,
                      message="exporting the compressed checkpoint and adapter")
    verify_windows = calibration[:2, : min(128, calibration.shape[1])]
    reference = (layer_logits(model, verify_windows, device) if settings.stream_layers
                 else reference_logits(model, verify_windows))
    work = settings.data_dir / "work" / str(job_id)
    shutil.rmtree(work, ignore_errors=True)
    try:  # a failed or cancelled job leaves no work folder behind
        t0 = time.perf_counter()
        info = export_model(model, tokenizer, result, plan, work, {
            "job": public_spec(spec),
            "model": {"id": public_ref(spec.model.id), "revision": resolved.revision, "source": resolved.source},
            "calibration": data_info,
            "evaluation": {"perplexity_before": ppl_before, "perplexity_after": ppl_after,
                           "windows": data_info["evaluation_windows"], "source": data_info["evaluation_source"]},
        })
        if settings.stream_layers:  # layer by layer, as it was made
            verified = verify_export_streamed(work, reference, verify_windows, scratch / "verify", device)
        else:
            verified = verify_export(work, reference, verify_windows)
        timings["export_s"] = time.perf_counter() - t0
        reporter.progress("exporting", 96.0, layer=n_layers, layers=n_layers,
                          message=f"export reloaded cold and matched in-memory logits (max diff {verified.max_abs_diff:.3g})")
        reporter.check_cancelled()

        t0 = time.perf_counter()
        published = destination.publish(work, str(job_id), getattr(reporter, "attempt", 1),
                                        getattr(reporter, "still_owns", lambda: True))
        timings["upload_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reporter.progress("uploading", 99.0, layer=n_layers, layers=n_layers,
                      message=f"published {len(published.files)} files to {published.uri}")
    timings["total_s"] = time.perf_counter() - started

    metrics = {
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "perplexity_ratio": ppl_after / ppl_before,
        "layers": n_layers,
        "device": str(device),
        "memory": {"streamed": settings.stream_layers, "compute_dtype": str(reference.dtype).removeprefix("torch."),
                   "calibration_activations_bytes": calibration.numel() * skeleton.config.hidden_size
                   * reference.dtype.itemsize,
                   "activations": placement.where, "activations_bytes": activations_bytes,
                   "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "model_revision": resolved.revision,
        "data": data_info,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "compression": compression_summary(result),
        "target": target_info,
        "adapter": None if info.adapter is None else info.adapter.sizes(),
        "size": info.sizes,  # counted from the artifact's files: bytes by part, bits per weight
        "verification": {"max_abs_diff": verified.max_abs_diff, "atol": verified.atol, "rtol": verified.rtol,
                         "windows": verified.windows, "adapter": verified.adapter},
    }
    artifacts = {"uri": published.uri, "files": published.files, "notes": info.notes,
                 "adapter": "adapter" if info.adapter is not None else None, "manifest": "squeeze.json"}
    return PipelineResult(metrics=metrics, artifacts=artifacts)


def _place_activations(settings: Settings, skeleton, calibration: torch.Tensor, evaluation: torch.Tensor,
                       device: torch.device, scratch: Path, reporter: Reporter) -> tuple[Placement, int]:
    """Where the job's activations between layers live (Settings.activations, decided once for every walk
    from the larger of the calibration and evaluation sets) and their size in bytes, said in an event."""
    from worker.activations import Placement, decide_placement
    from worker.memory import GiB

    largest = max(calibration, evaluation, key=torch.Tensor.numel)
    dtype_bytes = next(skeleton.parameters()).element_size()  # the compute dtype (streamed: on meta)
    where, size, why = decide_placement(settings.activations, skeleton.config, *largest.shape, device=device,
                                        streamed=settings.stream_layers, dtype_bytes=dtype_bytes)
    where_said = {"device": f"on {device}", "host": "in host memory", "disk": "on disk, in the job's work folder"}
    reporter.event("calibration", f"activations between layers: {size / GiB:.3f} GiB ({size:,} bytes, the larger "
                                  f"of calibration and evaluation), kept {where_said[where]} ({why})",
                   data={"activations": where, "activations_bytes": size})
    return Placement(where, scratch / "activations"), size


def _plan_for_target(model, calibration, plan, spec: JobSpec, settings: Settings, device, reporter,
                     n_layers: int):
    """(the plan meeting spec.target, what the job shows of it); an impossible target fails the job."""
    from worker.target import TargetError, plan_for_target

    target = size_target(spec.target, plan.compensates, settings.max_rank)
    reporter.progress("planning", 6.0, layer=0, layers=n_layers,
                      message=f"measuring every Linear's options for {target.bits_per_weight:g} bits per weight")
    t0 = time.perf_counter()
    try:
        chosen = plan_for_target(model, calibration, plan, target, device)
    except TargetError as exc:
        raise JobFailure(str(exc)) from None
    allocation = chosen.allocation
    info = {**planning_summary(target, chosen), "seconds": round(time.perf_counter() - t0, 3)}
    reporter.event("planning", f"plan for {target.bits_per_weight:g} bits per weight: {allocation.bytes:,} of "
                   f"{chosen.budget:,} bytes ({chosen.bits_per_weight:.4f} bits per weight), "
                   f"{'optimal' if allocation.exact else f'within {allocation.gap:.3g} of the optimum'}",
                   data={k: v for k, v in info.items() if k != "modules"})
    return chosen.plan, info


def planning_summary(target, chosen) -> dict[str, Any]:
    """What a job (and a benchmark row) shows of a size target's plan: the budget, what the plan stores,
    whether the allocation is optimal, the sensitivity used, and each Linear's bits, group size and rank."""
    allocation = chosen.allocation
    return {"bits_per_weight": target.bits_per_weight, "engine": target.engine, "budget_bytes": chosen.budget,
            "planned_bytes": allocation.bytes, "planned_bits_per_weight": chosen.bits_per_weight,
            "optimal": allocation.exact, "gap": allocation.gap, "sensitivity": chosen.sensitivity_kind,
            "modules": {name: {"bits": o.quant.bits, "group_size": o.quant.group_size, "rank": o.rank}
                        for name, o in chosen.chosen.items()}}


def layer_summary(report) -> dict[str, Any]:
    """What one layer report puts in the event log (numbers only, no tensors)."""
    return {
        "seconds": round(report.seconds, 4),
        "modules": {m.name: module_summary(m) for m in report.modules},
    }


def module_summary(m) -> dict[str, Any]:
    """Relative output errors ||(W - W')X|| / ||WX|| without and with compensation, rank, sparsity."""
    summary = {"bits": m.quantized and m.quantized.bits, "group_size": m.quantized and m.quantized.group_size,
               "error_before": round(m.error_before, 6),
               "error_after": None if m.error_after is None else round(m.error_after, 6),
               "rank": m.rank, "zero_fraction": round(m.zero_fraction, 4)}
    if m.refine_errors:  # compensation.refine: error_after of each round, round 0 = compress then compensate
        summary["refine_errors"] = [round(e, 6) for e in m.refine_errors]
    return summary


def compression_summary(result) -> dict[str, Any]:
    from worker.linear_compress import adapter_served_bytes

    errors_before = [m.error_before for m in result.modules.values()]
    errors_after = [m.error_after for m in result.modules.values() if m.error_after is not None]
    return {
        "modules": len(result.modules),
        "mean_relative_error_before": sum(errors_before) / len(errors_before) if errors_before else None,
        "mean_relative_error_after": sum(errors_after) / len(errors_after) if errors_after else None,
        "max_rank": result.max_rank,
        "per_module": {name: module_summary(m) for name, m in result.modules.items()},
        "adapter_params": result.adapter_params,
        "adapter_stored_bytes": result.adapter_bytes,  # what the adapter file holds (checked on export)
        "adapter_served_bytes": adapter_served_bytes(result.adapter_params),  # fp16 in an engine's memory
        "seconds": {
            "calibration": round(result.calibration_seconds, 3),
            "compression": round(result.compression_seconds, 3),
            "compensation": round(result.compensation_seconds, 3),
            "propagation": round(result.propagation_seconds, 3),
        },
    }
