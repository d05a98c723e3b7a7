"""Every query and state transition of jobs, in one place, but for the polling reads' queries (the API's
job, job list and events reads as plain rows: app/jobs/reads.py).

Transitions are conditional UPDATEs on (status, attempt[, lease owner]): when zero rows change,
someone else owns the job and the caller must stop writing. Functions only add and flush; the
caller's unit of work commits.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, exists, func, insert, literal, null, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import db_now, utcnow
from app.db.models import DEFAULT_TENANT, Job, JobEvent, JobStatus
from app.webhooks import repository as webhooks

if TYPE_CHECKING:
    from app.jobs.routing import Route

TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
def listed_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """metrics without compression.per_module: what Job.listed_metrics holds."""
    compression = metrics.get("compression") if isinstance(metrics, dict) else None
    if not isinstance(compression, dict) or "per_module" not in compression:
        return metrics
    return {**metrics, "compression": {k: v for k, v in compression.items() if k != "per_module"}}


def add_job(
    session: Session, spec: dict[str, Any], max_attempts: int, sealed_token: str | None = None, *,
    tenant_id: str = DEFAULT_TENANT, idempotency_key: str | None = None, request_hash: str | None = None,
    webhook_url: str | None = None, route: Route | None = None,
) -> Job:
    """route: the memory class and queue (app/jobs/routing.py); None = the base queue, as before routing."""
    now = utcnow()
    job = Job(
        id=uuid.uuid4(), tenant_id=tenant_id, status=JobStatus.queued, spec=spec, attempt=0,
        max_attempts=max_attempts, stage="queued", percent=0.0, created_at=now, updated_at=now,
        sealed_token=sealed_token, idempotency_key=idempotency_key, request_hash=request_hash,
        webhook_url=webhook_url, memory_class=route.memory_class if route else None,
        queue=route.queue if route else None,
    )
    session.add(job)
    message = f"job queued; {route.note}" if route and route.note else "job queued"
    session.add(JobEvent(job_id=job.id, attempt=0, created_at=now, stage="queued", level="info", message=message,
                         data=route.data if route and route.data else None))
    session.flush()
    return job


def add_job_once(
    session: Session, spec: dict[str, Any], max_attempts: int, sealed_token: str | None, *,
    tenant_id: str, idempotency_key: str, request_hash: str, webhook_url: str | None = None,
    route: Route | None = None,
) -> tuple[Job, bool]:
    """add_job, unless the tenant already used the idempotency key: then (that job, False). The unique
    index decides, so concurrent retries, each in its own transaction, all get the one job."""
    try:
        with session.begin_nested():  # a savepoint: losing the race rolls back only this insert
            job = add_job(session, spec, max_attempts, sealed_token, tenant_id=tenant_id,
                          idempotency_key=idempotency_key, request_hash=request_hash, webhook_url=webhook_url,
                          route=route)
        return job, True
    except IntegrityError:
        existing = job_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is None:
            raise
        return existing, False


def job_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def get_job(session: Session, job_id: uuid.UUID, tenant_id: str | None = None) -> Job | None:
    """tenant_id None: any tenant's job (workers, admin keys)."""
    job = session.get(Job, job_id)
    return job if job is not None and (tenant_id is None or job.tenant_id == tenant_id) else None


def count_queued(session: Session, tenant_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status == JobStatus.queued))


def list_events(session: Session, job_id: uuid.UUID, after: int, limit: int,
                tenant_id: str | None = None) -> list[JobEvent]:
    query = (
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    )
    if tenant_id is not None:
        query = query.join(Job, Job.id == JobEvent.job_id).where(Job.tenant_id == tenant_id)
    return list(session.scalars(query))


def add_event(
    session: Session, job_id: uuid.UUID, attempt: int, stage: str, message: str,
    level: str = "info", data: dict[str, Any] | None = None, owner: str | None = None,
) -> bool:
    """Append one event. With `owner`, only while that worker's attempt still owns the running job
    (one INSERT ... SELECT: a worker that lost its lease cannot write). Returns whether it was written."""
    if owner is None:
        session.add(JobEvent(job_id=job_id, attempt=attempt, created_at=utcnow(), stage=stage, level=level,
                             message=message, data=data))
        session.flush()
        return True
    columns = JobEvent.__table__.c
    row = select(
        literal(job_id, columns.job_id.type), literal(attempt, columns.attempt.type),
        literal(utcnow(), columns.created_at.type), literal(stage, columns.stage.type),
        literal(level, columns.level.type), literal(message, columns.message.type),
        literal(data, columns.data.type),
    ).where(exists().where(Job.id == job_id, *_owned(attempt, owner)))
    written = session.execute(insert(JobEvent).from_select(
        ["job_id", "attempt", "created_at", "stage", "level", "message", "data"], row).returning(JobEvent.id))
    return written.scalar_one_or_none() is not None


def _transition(session: Session, job_id: uuid.UUID, where: list, **values: Any) -> bool:
    """A terminal one also queues the job's webhook delivery, in the same transaction (an outbox)."""
    values.setdefault("updated_at", utcnow())
    ending = values.get("status") in TERMINAL
    if "metrics" in values:
        values["listed_metrics"] = listed_metrics(values["metrics"])
    if ending:
        values["sealed_token"] = None  # a finished job keeps no secret
    changed = session.execute(update(Job).where(Job.id == job_id, *where).values(**values)).rowcount == 1
    if changed and ending:
        webhooks.enqueue(session, job_id, values["status"])
    return changed


def mark_dispatched(session: Session, job_id: uuid.UUID) -> bool:
    return _transition(session, job_id, [Job.status == JobStatus.queued], dispatched_at=utcnow())


def take_dispatch(session: Session, job_id: uuid.UUID, older_than: datetime) -> datetime | None:
    """Before a re-send: mark the job sent, if it is still queued and unsent (or sent before
    older_than). Of several reapers passing at once only one gets the stamp, and only it sends."""
    stamp = utcnow()
    taken = _transition(
        session, job_id,
        [Job.status == JobStatus.queued, Job.cancel_requested_at.is_(None),
         or_(Job.dispatched_at.is_(None), Job.dispatched_at < older_than)],
        dispatched_at=stamp,
    )
    return stamp if taken else None


def job_queue(session: Session, job_id: uuid.UUID) -> str | None:
    """The broker queue chosen for the job at submit; None for a job made before routing (the base queue)."""
    return session.scalar(select(Job.queue).where(Job.id == job_id))


def give_back_dispatch(session: Session, job_id: uuid.UUID, stamp: datetime) -> bool:
    """The send after take_dispatch failed: the job is unsent again, for the next pass."""
    return _transition(session, job_id, [Job.dispatched_at == stamp], dispatched_at=None)


def claim(session: Session, job_id: uuid.UUID, owner: str, lease_seconds: float) -> int | None:
    """queued -> running for the next attempt, in one conditional UPDATE (a cancel that committed
    first wins). Returns that attempt, or None when not ours to run."""
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, Job.cancel_requested_at.is_(None))
        .values(status=JobStatus.running, attempt=Job.attempt + 1, lease_owner=owner,
                lease_expires_at=db_now(lease_seconds), started_at=db_now(), updated_at=utcnow(),
                stage="starting", layer=None, layers=None, percent=0.0, error=None)
        .returning(Job.attempt)
    ).scalar_one_or_none()
    if attempt is not None:
        add_event(session, job_id, attempt, "starting", f"attempt {attempt} claimed by a worker")
    return attempt


def _owned(attempt: int, owner: str) -> list:
    return [Job.status == JobStatus.running, Job.attempt == attempt, Job.lease_owner == owner]


def renew_lease(session: Session, job_id: uuid.UUID, attempt: int, owner: str, lease_seconds: float) -> bool:
    return _transition(session, job_id, _owned(attempt, owner), lease_expires_at=db_now(lease_seconds))


def mark_publishing(session: Session, job_id: uuid.UUID, attempt: int, owner: str, lease_seconds: float) -> bool:
    """Right before an artifact is switched into place: the attempt still owns the job, with a fresh
    lease so it stays ours for the rename that follows."""
    return _transition(session, job_id, _owned(attempt, owner) + [Job.lease_expires_at > db_now()],
                       stage="publishing", lease_expires_at=db_now(lease_seconds))


def report_progress(
    session: Session, job_id: uuid.UUID, attempt: int, owner: str, *, stage: str,
    layer: int | None, layers: int | None, percent: float,
) -> bool:
    return _transition(session, job_id, _owned(attempt, owner), stage=stage, layer=layer, layers=layers,
                       percent=percent)


def cancel_requested(session: Session, job_id: uuid.UUID) -> bool:
    return session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id)) is not None


def claimable(session: Session, job_id: uuid.UUID) -> bool:
    """Whether a claim could take the job now (a cheap read; the claim itself decides)."""
    return session.scalar(select(Job.id).where(Job.id == job_id, Job.status == JobStatus.queued,
                                               Job.cancel_requested_at.is_(None))) is not None


def cancel_overdue(session: Session, job_id: uuid.UUID, grace_seconds: float) -> bool:
    """A cancel was asked more than grace_seconds ago, by the database's clock."""
    return session.scalar(select(Job.id).where(Job.id == job_id, Job.cancel_requested_at < db_now(-grace_seconds))) \
        is not None


def succeed(session: Session, job_id: uuid.UUID, attempt: int, owner: str,
            metrics: dict[str, Any], artifacts: dict[str, Any]) -> bool:
    # Every layer is done: the progress reads "done", layer n of n, not the last stage's position.
    return _transition(session, job_id, _owned(attempt, owner), status=JobStatus.succeeded, stage="done",
                       layer=Job.layers, percent=100.0, metrics=metrics, artifacts=artifacts, finished_at=db_now(),
                       lease_expires_at=None)


def fail(session: Session, job_id: uuid.UUID, attempt: int, owner: str, reason: str,
         metrics: dict[str, Any] | None = None) -> bool:
    # The stage says it failed; layer / layers keep how far it got.
    return _transition(session, job_id, _owned(attempt, owner), status=JobStatus.failed, stage="failed",
                       error=reason, metrics=metrics, finished_at=db_now(), lease_expires_at=None)


def finish_cancelled(session: Session, job_id: uuid.UUID, attempt: int, owner: str) -> bool:
    return _transition(session, job_id, _owned(attempt, owner), status=JobStatus.cancelled, stage="cancelled",
                       finished_at=db_now(), lease_expires_at=None)


def request_cancel(session: Session, job: Job) -> JobStatus:
    """One conditional UPDATE, whatever the job's state was when the caller read it: a queued job is
    cancelled at once, a running one gets the flag its worker checks between layers. A claim racing
    with it either committed first (the job is running: flag set) or sees the flag and does not claim."""
    queued = Job.status == JobStatus.queued
    row = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_([JobStatus.queued, JobStatus.running]),
               Job.cancel_requested_at.is_(None))
        .values(status=case((queued, literal(JobStatus.cancelled.value)), else_=Job.status),
                stage=case((queued, literal("cancelled")), else_=Job.stage),
                finished_at=case((queued, db_now()), else_=Job.finished_at),
                sealed_token=case((queued, null()), else_=Job.sealed_token),
                cancel_requested_at=db_now(), updated_at=utcnow())
        .returning(Job.status, Job.attempt)
    ).one_or_none()
    if row is not None:
        status, attempt = JobStatus(row[0]), row[1]
        if status == JobStatus.cancelled:
            add_event(session, job.id, attempt, "cancelled", "cancelled before it started")
            webhooks.enqueue(session, job.id, status)
        else:
            add_event(session, job.id, attempt, "cancelling", "cancel requested; the worker stops at the next layer")
    session.refresh(job)
    return job.status


def jobs_to_dispatch(session: Session, older_than: datetime) -> list[uuid.UUID]:
    """Queued jobs whose message was never sent, or was sent long ago without a worker taking it."""
    query = select(Job.id).where(
        Job.status == JobStatus.queued,
        Job.cancel_requested_at.is_(None),
        or_(Job.dispatched_at.is_(None), Job.dispatched_at < older_than),
    )
    return list(session.scalars(query))


def expired_leases(session: Session) -> list[Job]:
    """Running jobs whose lease ran out, by the database's clock."""
    return list(session.scalars(select(Job).where(Job.status == JobStatus.running, Job.lease_expires_at < db_now())
                                .order_by(Job.id)))


def release_expired(session: Session, job: Job) -> JobStatus | None:
    """A dead worker's job: back to queued for another attempt, or failed when attempts are spent, or
    cancelled when a cancel was asked. Each outcome is one UPDATE that re-checks, by the database's
    clock, that the lease of that attempt is still the expired one, so racing reapers write it once.

    `job` is the row as read before (expired_leases): its stage and layer are where the dead attempt
    was last seen. The requeue resets them, so its event keeps them (message and data)."""
    where = [Job.status == JobStatus.running, Job.attempt == job.attempt, Job.lease_expires_at < db_now()]
    # Read before any UPDATE: an UPDATE also refreshes `job` when it sits in this session.
    seen, seen_at = {"stage": job.stage, "layer": job.layer, "layers": job.layers}, last_seen(job)
    if _transition(session, job.id, where + [Job.cancel_requested_at.is_not(None)], status=JobStatus.cancelled,
                   stage="cancelled", finished_at=db_now(), lease_expires_at=None):
        add_event(session, job.id, job.attempt, "cancelled", "worker gone after cancel; job cancelled", data=seen)
        return JobStatus.cancelled
    where.append(Job.cancel_requested_at.is_(None))
    # Only a lease expiry ends an attempt without ending the job, so every attempt so far was lost.
    times = "1 time" if job.attempt == 1 else f"{job.attempt} times"
    reason = (f"worker lost {times} (lease expired on each attempt); last seen {seen_at}; "
              f"giving up after {job.attempt} of {job.max_attempts} attempts")
    if _transition(session, job.id, where + [Job.attempt >= Job.max_attempts], status=JobStatus.failed,
                   stage="failed", error=reason, finished_at=db_now(), lease_expires_at=None):
        add_event(session, job.id, job.attempt, "failed", reason, level="error", data=seen)
        return JobStatus.failed
    if _transition(session, job.id, where + [Job.attempt < Job.max_attempts], status=JobStatus.queued,
                   stage="queued", lease_owner=None, lease_expires_at=None, dispatched_at=None, layer=None,
                   layers=None, percent=0.0):
        add_event(session, job.id, job.attempt, "queued",
                  f"worker lost (lease expired) on attempt {job.attempt} of {job.max_attempts}, last seen {seen_at}; "
                  "requeued", level="warning", data=seen)
        return JobStatus.queued
    return None


def last_seen(job: Job) -> str:
    """Where a running job was: 'at layer 3 of 12, stage compress', or 'at stage loading' before the layers."""
    if job.layer is not None and job.layers is not None:
        return f"at layer {job.layer} of {job.layers}, stage {job.stage}"
    return f"at stage {job.stage}"
