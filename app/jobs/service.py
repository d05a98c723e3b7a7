"""Job use cases: the checks that need settings, then the repository. Raises domain errors only."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Row
from sqlalchemy.orm import Session

from app.auth import Caller
from app.db.models import Job, JobStatus
from app.errors import BadCursor, IdempotencyMismatch, InvalidSpec, JobNotFound, JobStateConflict, TooManyQueued
from app.jobs import reads, repository, uploads
from app.jobs.capabilities import check_supported
from app.jobs.destinations import DestinationRefused, check_destination
from app.jobs.reads import JobRow
from app.jobs.spec import JobSpec
from app.secrets import seal
from app.settings import Settings
from app.webhooks import service as webhooks

if TYPE_CHECKING:
    from app.jobs.routing import Route

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
UPLOAD_PREFIX = uploads.PREFIX


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
    too_high = spec.compensation.above_max_rank(settings.max_rank) if spec.compensation is not None else None
    if too_high is not None:
        raise InvalidSpec(*too_high)
    if spec.webhook_url is not None:
        webhooks.check_for_submit(settings, spec.webhook_url)
    check_supported(spec)
    try:
        check_destination(spec.destination.uri, settings.artifacts_dir)
    except DestinationRefused as exc:
        raise InvalidSpec("destination.uri", str(exc)) from None


def _tenant_filter(caller: Caller) -> str | None:
    return None if caller.admin else caller.tenant_id


def request_hash(spec: JobSpec) -> str:
    """sha256 of the validated request (defaults filled in, the token included): what a retry must repeat."""
    token = spec.hf_token.get_secret_value() if spec.hf_token else None
    # without webhook_url when it is unset: a retry of a request made before the field existed hashes the same
    stored = spec.model_dump(mode="json", exclude={"webhook_url"} if spec.webhook_url is None else None)
    canonical = json.dumps({"spec": stored, "hf_token": token}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(session: Session, settings: Settings, spec: JobSpec, caller: Caller,
               idempotency_key: str | None = None, route: Route | None = None) -> tuple[Job, bool]:
    """Returns (job, created). A repeated Idempotency-Key returns the tenant's earlier job for the same
    request, and is refused for a different one. route: the job's memory class and queue
    (routing.route_job, read before the transaction); None = the base queue."""
    if idempotency_key is not None:
        earlier = repository.job_by_idempotency_key(session, caller.tenant_id, idempotency_key)
        if earlier is not None:
            return _same_request(earlier, spec), False
    validate_for_server(settings, spec)
    uploads.check_dataset_owned(session, caller, "calibration.dataset", spec.calibration.dataset)
    uploads.check_dataset_owned(session, caller, "evaluation.dataset", spec.evaluation.dataset)
    queued = repository.count_queued(session, caller.tenant_id)
    if queued >= settings.max_queued_jobs_per_tenant:
        raise TooManyQueued(f"{queued} jobs of this tenant are already queued (at most "
                            f"{settings.max_queued_jobs_per_tenant}); retry when some have started",
                            settings.queued_retry_after_seconds)
    sealed = seal(settings, spec.hf_token.get_secret_value(), "hf_token") if spec.hf_token else None
    if spec.webhook_url is not None:
        webhooks.signing_secret(session, settings, caller.tenant_id)  # made now, so the owner can read it first
    stored = spec.model_dump(mode="json")
    if idempotency_key is None:
        return repository.add_job(session, stored, settings.max_attempts, sealed, tenant_id=caller.tenant_id,
                                  webhook_url=spec.webhook_url, route=route), True
    job, created = repository.add_job_once(session, stored, settings.max_attempts, sealed, tenant_id=caller.tenant_id,
                                           idempotency_key=idempotency_key, request_hash=request_hash(spec),
                                           webhook_url=spec.webhook_url, route=route)
    return (job, True) if created else (_same_request(job, spec), False)


def _same_request(job: Job, spec: JobSpec) -> Job:
    if job.request_hash != request_hash(spec):
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different request body")
    return job


def get_job(session: Session, job_id: uuid.UUID, caller: Caller) -> Job:
    job = repository.get_job(session, job_id, _tenant_filter(caller))
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    return job


def job_row(connection: Connection, job_id: uuid.UUID, caller: Caller) -> JobRow:
    """get_job for the read endpoint: a row of reads.job_columns."""
    row = reads.job_row(connection, job_id, _tenant_filter(caller))
    if row is None:
        raise JobNotFound(f"no job with id {job_id}")
    return row


def encode_cursor(job: Job | JobRow) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except Exception as exc:
        raise BadCursor("cursor is not one this API returned") from exc


def list_jobs(connection: Connection, caller: Caller, status: JobStatus | None, limit: int,
              cursor: str | None, model: str = "") -> tuple[list[JobRow], str | None]:
    """A page of rows of reads.job_columns(listed=True) and the next page's cursor."""
    before = decode_cursor(cursor) if cursor else None
    jobs = reads.list_jobs(connection, status, limit + 1, before, _tenant_filter(caller), model)
    next_cursor = encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def list_events(connection: Connection, job_id: uuid.UUID, caller: Caller, after: int, limit: int) -> list[Row]:
    events = reads.event_rows(connection, job_id, after, limit, _tenant_filter(caller))
    if events is None:
        raise JobNotFound(f"no job with id {job_id}")
    return events


def cancel_job(session: Session, job_id: uuid.UUID, caller: Caller) -> Job:
    job = get_job(session, job_id, caller)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise JobStateConflict(f"job {job_id} already {job.status.value}; nothing to cancel")
    repository.request_cancel(session, job)
    return job
