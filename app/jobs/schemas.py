"""What the API returns."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from app.db.models import Job, JobStatus, Upload
from app.settings import Settings


class ErrorOut(BaseModel):
    """Every error: a stable code, a readable detail, and for a bad request the fields at fault."""

    error: str
    detail: str
    fields: list[str] | None = None
    uri: str | None = None  # artifact_not_local: where the artifact is instead


ERRORS = {status: {"model": ErrorOut, "description": what} for status, what in (
    (400, "Bad request (e.g. a cursor this API did not return)"),
    (401, "Missing, unknown or revoked API key"),
    (403, "A cross-site write"),
    (404, "No such job or upload for this caller"),
    (409, "The job's state does not allow it"),
    (413, "Request body, upload or upload quota too large"),
    (422, "Invalid request"),
    (429, "Too many queued jobs for this tenant (see Retry-After)"),
)}


class Progress(BaseModel):
    stage: str
    layer: int | None
    layers: int | None
    percent: float


class JobOut(BaseModel):
    id: uuid.UUID
    tenant: str
    status: JobStatus
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress
    # The job's memory class (app/jobs/routing.py): a size such as "48gib", or "any" (any worker). A default,
    # so that the client reads the jobs of a server older than routing.
    memory_class: str = "any"
    spec: dict[str, Any]
    error: str | None
    metrics: dict[str, Any] | None
    artifacts: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls.model_validate(job_fields(job, job.spec, job.metrics, job.artifacts))


def job_fields(job: Any, spec: Any, metrics: Any, artifacts: Any) -> dict[str, Any]:
    """JobOut's fields, in its order, from a Job or a row of reads.job_columns (its JSON columns given
    parsed): what JobOut.of validates, and what app/jobs/views.py serialises as it is."""
    return {
        "id": job.id, "tenant": job.tenant_id, "status": job.status, "attempt": job.attempt,
        "max_attempts": job.max_attempts, "cancel_requested": job.cancel_requested_at is not None,
        "progress": {"stage": job.stage, "layer": job.layer, "layers": job.layers, "percent": job.percent},
        "memory_class": job.memory_class or "any", "spec": spec, "error": job.error, "metrics": metrics,
        "artifacts": artifacts, "created_at": job.created_at, "updated_at": job.updated_at,
        "started_at": job.started_at, "finished_at": job.finished_at,
    }


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    id: int
    attempt: int
    created_at: datetime
    stage: str
    level: str
    message: str
    data: dict[str, Any] | None


class EventPage(BaseModel):
    items: list[EventOut]
    next_after: int


class UploadOut(BaseModel):
    id: str
    dataset: str
    bytes: int
    created_at: datetime
    expires_at: datetime

    @classmethod
    def of(cls, upload: Upload, settings: Settings) -> UploadOut:
        return cls(id=upload.id, dataset=f"upload:{upload.id}", bytes=upload.bytes, created_at=upload.created_at,
                   expires_at=upload.created_at + timedelta(hours=settings.upload_retention_hours))


class UploadPage(BaseModel):
    items: list[UploadOut]


class ArtifactFileOut(BaseModel):
    path: str  # relative posix path inside the artifact; GET /v1/jobs/{id}/artifacts/{path} streams it
    bytes: int
    sha256: str


class ArtifactListOut(BaseModel):
    uri: str
    files: list[ArtifactFileOut]
