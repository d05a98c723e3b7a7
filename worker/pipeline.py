"""One job, end to end: resolve -> load -> calibration data -> evaluate -> compress -> evaluate -> save.

Called by the Celery task (through worker.jobrunner) and by `squeeze compress`, with a reporter
that receives progress, events and cancellation checks. The job spec becomes a plan in worker.job_plan,
its data windows in worker.job_data; what the job reports of its work is made in worker.summaries.
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

from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.errors import JobFailure
from worker.job_data import load_windows, public_ref, public_spec
from worker.job_plan import check_plan_fits, compression_plan, plan_for_job_target
from worker.summaries import compression_summary, layer_summary

if TYPE_CHECKING:
    from worker.activations import Placement

log = logging.getLogger(__name__)


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


def _without_path(exc: Exception, path: Path) -> str:
    return str(exc).replace(str(path), "the model folder")


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
    dtype = compute_dtype(settings.compute_dtype)

    def check_config(folder: Path) -> None:  # before a Hub model's weights are downloaded
        from worker.memory import check_memory

        check_memory(folder, spec, device, streamed=settings.stream_layers,
                     dtype_bytes=4 if dtype is None else dtype.itemsize,  # "auto": at most fp32
                     activations=settings.activations)

    resolved = resolve_model(spec.model.id, spec.model.revision, settings, token=token,
                             check_config=check_config if settings.memory_check else None)
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
        plan, target_info = plan_for_job_target(model, calibration, plan, spec, settings, device, reporter, n_layers,
                                                placement)
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

    from worker.memory import predict_peak, prediction_record

    predicted = predict_peak(skeleton.config, spec, on_cpu=device.type == "cpu", streamed=settings.stream_layers,
                             dtype_bytes=reference.dtype.itemsize, activations=placement.where)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
                   "peak_rss_bytes": peak_rss, "predicted": prediction_record(predicted),
                   "peak_rss_over_predicted_host": round(peak_rss / predicted.host_bytes, 3)},
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
    # "serving" is squeeze.json's table of engines, copied so a job page shows it whatever the destination.
    artifacts = {"uri": published.uri, "files": published.files, "notes": info.notes,
                 "adapter": "adapter" if info.adapter is not None else None, "manifest": "squeeze.json",
                 "serving": info.manifest["serving"]}
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
