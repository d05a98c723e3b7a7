"""One job, end to end: resolve -> load -> calibration data -> evaluate -> compress -> evaluate -> save.

Called by the Celery task (through worker.jobrunner) and by `squeeze compress`, with a reporter
that receives progress, events and cancellation checks.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import SecretStr

from app.errors import InvalidSpec
from app.jobs.destinations import scheme_of
from app.jobs.service import UPLOAD_PREFIX, looks_local, resolve_upload
from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec
from worker.errors import JobFailure

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1  # of calibration documents, when no evaluation dataset is given


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


def compression_plan(spec: JobSpec):
    from worker.plan import CompressionPlan

    quant = sparsity = compensation = None
    if spec.quantization is not None:
        q = spec.quantization
        quant = QuantSpec(method=q.method, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric,
                          damp=q.damp, act_order=q.act_order)
    if spec.sparsity is not None:
        s = spec.sparsity
        n, m = s.nm or (None, None)
        sparsity = SparsitySpec(method=s.method, ratio=s.ratio, n=n, m=m)
    if spec.compensation is not None and spec.compensation.method != "none":
        c = spec.compensation
        budget = c.rank_budget
        budget_fields = {} if budget is None else {
            "budget_params": budget.params, "budget_fraction": budget.fraction, "budget_criterion": budget.criterion,
            "min_rank": budget.min_rank}
        compensation = CompensationSpec(method=c.method, rank=c.rank, adapter_bits=c.adapter_bits, damp=c.damp,
                                        sink_tokens=c.sink_tokens, **budget_fields)
    return CompressionPlan(quant=quant, sparsity=sparsity, compensation=compensation)


def check_plan_fits(model, arch, plan) -> None:
    """Refuse before any work when a group size or N:M block does not divide a layer's input width, or a
    rank budget cannot pay for its min_rank floor."""
    from worker.compression.ranks import resolve_budget
    from worker.models import decoder_linears

    linears = decoder_linears(model, arch)
    widths = sorted({linear.in_features for linear in linears.values()})
    spec = plan.compensation
    if plan.uses_budget and spec.min_rank:
        shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
        budget = resolve_budget(spec.budget_params, spec.budget_fraction, shapes)
        floor = sum(min(spec.min_rank, spec.max_rank, *shape) * sum(shape) for shape in shapes.values())
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
    """The job spec for the manifest, without the server's paths (models and artifacts get shared)."""
    data = spec.model_dump(mode="json")
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
    """(calibration windows, evaluation windows, a description of both)."""
    from worker.data import DataError, contiguous_windows, make_windows, token_stream, windows_hash

    cal, ev = spec.calibration, spec.evaluation
    eval_len = ev.seq_len or cal.seq_len
    try:
        texts = _load(settings, cal.dataset, "calibration.dataset", cal.split, cal.text_field, token)
        if ev.dataset is None:
            held = max(1, int(len(texts) * HELD_OUT_FRACTION))
            if len(texts) < 2:
                raise JobFailure("calibration.dataset has a single document; cannot hold back an evaluation "
                                 "slice: give evaluation.dataset")
            texts, eval_texts, eval_source = texts[:-held], texts[-held:], f"last {held} documents of {public_ref(cal.dataset)}"
        else:
            eval_texts = _load(settings, ev.dataset, "evaluation.dataset", ev.split, ev.text_field, token)
            eval_source = public_ref(ev.dataset)
        calibration = make_windows(tokenizer, texts, cal.num_samples, cal.seq_len, cal.seed)
        if ev.dataset is None:  # a held-back slice gives what it has, up to num_windows
            stream = token_stream(tokenizer, eval_texts)
            count = min(ev.num_windows, len(stream) // eval_len)
            if count == 0:
                raise JobFailure(f"the held-back evaluation slice ({eval_source}) has {len(stream)} tokens, "
                                 f"less than one window of {eval_len}: give evaluation.dataset")
            evaluation = stream[: count * eval_len].reshape(count, eval_len)
        else:
            evaluation = contiguous_windows(tokenizer, eval_texts, ev.num_windows, eval_len)
    except DataError as exc:
        raise JobFailure(f"data: {exc}") from None
    info = {"calibration_windows": list(calibration.shape), "calibration_hash": windows_hash(calibration),
            "evaluation_windows": list(evaluation.shape), "evaluation_source": eval_source}
    return calibration, evaluation, info


def run_pipeline(job_id: uuid.UUID, spec: JobSpec, settings: Settings, reporter: Reporter,
                 token: str | None = None) -> PipelineResult:
    """token: the job's own Hugging Face token (else the server's), for download and Hub upload."""
    from worker.evaluate import perplexity
    from worker.hub import resolve_model
    from worker.models import ModelLoadError, UnsupportedArchitecture, get_architecture, load_model
    from worker.export import export_model, reference_logits, verify_export
    from worker.sequential import compress_model
    from worker.storage import DestinationOptions, LocalDestination, destination_for

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
    try:
        model, tokenizer = load_model(resolved.path)
        arch = get_architecture(model)
    except (ModelLoadError, UnsupportedArchitecture) as exc:  # messages name the folder: show the caller's id
        raise JobFailure(f"model {spec.model.id!r}: {_without_path(exc, resolved.path)}") from None
    except (OSError, ValueError) as exc:
        raise JobFailure(f"model {spec.model.id!r} could not be loaded: {_without_path(exc, resolved.path)}") from None
    n_layers = len(arch.decoder_layers(model))
    timings["load_s"] = time.perf_counter() - started
    reporter.progress("loading", 3.0, layers=n_layers,
                      message=f"loaded {arch.family} model with {n_layers} decoder layers on CPU; compute device {device}")

    calibration, evaluation, data_info = load_windows(spec, settings, tokenizer, token)
    reporter.progress("calibration", 5.0, layers=n_layers,
                      message=f"calibration {tuple(calibration.shape)} tokens, evaluation {tuple(evaluation.shape)}")
    reporter.check_cancelled()

    t0 = time.perf_counter()
    ppl_before = perplexity(model, evaluation, device)
    timings["eval_before_s"] = time.perf_counter() - t0
    reporter.progress("evaluating", 10.0, layers=n_layers, message=f"perplexity before: {ppl_before:.4f}")
    reporter.check_cancelled()

    plan = compression_plan(spec)
    check_plan_fits(model, arch, plan)

    def on_layer(report) -> None:
        reporter.progress(report.stage, 10.0 + 75.0 * report.step / report.steps, layer=report.index + 1,
                          layers=report.total,
                          message=f"layer {report.index + 1}/{report.total} {report.stage} done in {report.seconds:.2f}s",
                          data=layer_summary(report))
        reporter.check_cancelled()

    t0 = time.perf_counter()
    result = compress_model(model, calibration, plan, device, on_layer=on_layer)
    timings["compress_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ppl_after = perplexity(model, evaluation, device)
    timings["eval_after_s"] = time.perf_counter() - t0
    reporter.progress("evaluating", 90.0, layers=n_layers, message=f"perplexity after: {ppl_after:.4f}")
    reporter.check_cancelled()

    reporter.progress("exporting", 92.0, layers=n_layers, message="exporting the compressed checkpoint and adapter")
    verify_windows = calibration[:2, : min(128, calibration.shape[1])]
    reference = reference_logits(model, verify_windows)
    work = settings.data_dir / "work" / str(job_id)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    info = export_model(model, tokenizer, result, plan, work, {
        "job": public_spec(spec),
        "model": {"id": public_ref(spec.model.id), "revision": resolved.revision, "source": resolved.source},
        "calibration": data_info,
        "evaluation": {"perplexity_before": ppl_before, "perplexity_after": ppl_after,
                       "windows": data_info["evaluation_windows"], "source": data_info["evaluation_source"]},
    })
    verified = verify_export(work, reference, verify_windows)
    timings["export_s"] = time.perf_counter() - t0
    reporter.progress("exporting", 96.0, layers=n_layers,
                      message=f"export reloaded cold and matched in-memory logits (max diff {verified.max_abs_diff:.3g})")
    reporter.check_cancelled()

    t0 = time.perf_counter()
    published = destination.publish(work, str(job_id), getattr(reporter, "attempt", 1),
                                    getattr(reporter, "still_owns", lambda: True))
    timings["upload_s"] = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    reporter.progress("uploading", 99.0, layers=n_layers, message=f"published {len(published.files)} files to {published.uri}")
    timings["total_s"] = time.perf_counter() - started

    metrics = {
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "perplexity_ratio": ppl_after / ppl_before,
        "layers": n_layers,
        "device": str(device),
        "model_revision": resolved.revision,
        "data": data_info,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "compression": compression_summary(result),
        "verification": {"max_abs_diff": verified.max_abs_diff, "atol": verified.atol, "rtol": verified.rtol,
                         "windows": verified.windows, "adapter": verified.adapter},
    }
    artifacts = {"uri": published.uri, "files": published.files, "notes": info.notes,
                 "adapter": "adapter" if info.adapter is not None else None, "manifest": "squeeze.json"}
    return PipelineResult(metrics=metrics, artifacts=artifacts)


def layer_summary(report) -> dict[str, Any]:
    """What one layer report puts in the event log (numbers only, no tensors)."""
    return {
        "seconds": round(report.seconds, 4),
        "modules": {m.name: module_summary(m) for m in report.modules},
    }


def module_summary(m) -> dict[str, Any]:
    """Relative output errors ||(W - W')X|| / ||WX|| without and with compensation, rank, sparsity."""
    return {"error_before": round(m.error_before, 6),
            "error_after": None if m.error_after is None else round(m.error_after, 6),
            "rank": m.rank, "zero_fraction": round(m.zero_fraction, 4)}


def compression_summary(result) -> dict[str, Any]:
    errors_before = [m.error_before for m in result.modules.values()]
    errors_after = [m.error_after for m in result.modules.values() if m.error_after is not None]
    return {
        "modules": len(result.modules),
        "mean_relative_error_before": sum(errors_before) / len(errors_before) if errors_before else None,
        "mean_relative_error_after": sum(errors_after) / len(errors_after) if errors_after else None,
        "max_rank": result.max_rank,
        "per_module": {name: module_summary(m) for name, m in result.modules.items()},
        "adapter_params": result.adapter_params,
        "adapter_bytes": result.adapter_bytes,
        "seconds": {
            "calibration": round(result.calibration_seconds, 3),
            "compression": round(result.compression_seconds, 3),
            "compensation": round(result.compensation_seconds, 3),
            "propagation": round(result.propagation_seconds, 3),
        },
    }
