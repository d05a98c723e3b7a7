"""Job use cases: the checks that need settings, then the repository. Raises domain errors only."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent, JobStatus
from app.errors import BadCursor, InvalidSpec, JobNotFound, JobStateConflict
from app.jobs import repository
from app.jobs.capabilities import check_supported
from app.jobs.destinations import DestinationRefused, check_destination
from app.jobs.spec import JobSpec
from app.secrets import seal
from app.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
UPLOAD_PREFIX = "upload:"


def looks_local(ref: str) -> bool:
    """By its spelling only: asking the filesystem would tell a caller which server paths exist."""
    return ref.startswith(("/", "./", "../", "~", "file://")) or ref in (".", "..")


def resolve_upload(settings: Settings, dataset: str) -> Path:
    upload_id = dataset.removeprefix(UPLOAD_PREFIX)
    matches = sorted(settings.uploads_dir.glob(f"{upload_id}.*")) if re.fullmatch(r"[0-9a-f]{32}", upload_id) else []
    if not matches:
        raise InvalidSpec("calibration.dataset", f"no upload with id '{upload_id}'")
    return matches[0]


def _check_source(settings: Settings, field: str, ref: str, what: str) -> None:
    if ref.startswith(UPLOAD_PREFIX):
        resolve_upload(settings, ref)
    elif looks_local(ref):
        if not settings.local_path_permitted(Path(ref.removeprefix("file://"))):
            raise InvalidSpec(field, f"local {what} paths are not allowed on this server outside its configured roots")
    elif not HUB_ID.match(ref):
        raise InvalidSpec(field, f"'{ref}' is neither a Hub id (org/name) nor a local path")


def validate_for_server(settings: Settings, spec: JobSpec) -> None:
    """Checks that depend on this server's limits and permissions (the spec itself is already valid)."""
    _check_source(settings, "model.id", spec.model.id, "model")
    _check_source(settings, "calibration.dataset", spec.calibration.dataset, "dataset")
    if spec.evaluation.dataset is not None:
        _check_source(settings, "evaluation.dataset", spec.evaluation.dataset, "dataset")
    if spec.calibration.num_samples > settings.max_num_samples:
        raise InvalidSpec("calibration.num_samples", f"at most {settings.max_num_samples} on this server")
    for field, value in (("calibration.seq_len", spec.calibration.seq_len),
                         ("evaluation.seq_len", spec.evaluation.seq_len)):
        if value is not None and value > settings.max_seq_len:
            raise InvalidSpec(field, f"at most {settings.max_seq_len} on this server")
    if spec.compensation is not None and spec.compensation.rank is not None and spec.compensation.rank > settings.max_rank:
        raise InvalidSpec("compensation.rank", f"at most {settings.max_rank} on this server")
    check_supported(spec)
    try:
        check_destination(spec.destination.uri, settings.artifacts_dir)
    except DestinationRefused as exc:
        raise InvalidSpec("destination.uri", str(exc)) from None


def create_job(session: Session, settings: Settings, spec: JobSpec) -> Job:
    validate_for_server(settings, spec)
    sealed = seal(settings, spec.hf_token.get_secret_value(), "hf_token") if spec.hf_token else None
    return repository.add_job(session, spec.model_dump(mode="json"), settings.max_attempts, sealed)


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    job = repository.get_job(session, job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    return job


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except Exception as exc:
        raise BadCursor("cursor is not one this API returned") from exc


def list_jobs(session: Session, status: JobStatus | None, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
    before = decode_cursor(cursor) if cursor else None
    jobs = repository.list_jobs(session, status, limit + 1, before)
    next_cursor = encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def list_events(session: Session, job_id: uuid.UUID, after: int, limit: int) -> list[JobEvent]:
    get_job(session, job_id)
    return repository.list_events(session, job_id, after, limit)


def cancel_job(session: Session, job_id: uuid.UUID) -> Job:
    job = get_job(session, job_id)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise JobStateConflict(f"job {job_id} already {job.status.value}; nothing to cancel")
    repository.request_cancel(session, job)
    return job
