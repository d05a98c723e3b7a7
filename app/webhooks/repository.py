"""Every query of webhook deliveries, their attempts and the tenants' sealed secrets. Functions only
add and flush; the caller's unit of work commits.

enqueue runs inside a job's terminal transition (app/jobs/repository.py), so the delivery exists
exactly when the new state was committed: an outbox the sender drains, surviving restarts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import insert, literal, select, update
from sqlalchemy.orm import Session

from app.db.base import db_now
from app.db.models import DeliveryState, Job, JobStatus, Tenant, WebhookAttempt, WebhookDelivery


def enqueue(session: Session, job_id: uuid.UUID, status: JobStatus) -> None:
    """A pending delivery of `status` when the job has a webhook_url (one INSERT ... SELECT)."""
    columns = WebhookDelivery.__table__.c
    row = select(
        literal(uuid.uuid4(), columns.id.type), Job.id, literal(f"job.{status.value}", columns.event.type),
        Job.webhook_url, literal(DeliveryState.pending, columns.state.type), literal(0, columns.attempts.type),
        db_now(), db_now(),
    ).where(Job.id == job_id, Job.webhook_url.is_not(None))
    session.execute(insert(WebhookDelivery).from_select(
        ["id", "job_id", "event", "url", "state", "attempts", "next_attempt_at", "created_at"], row))


def due(session: Session, limit: int) -> list[uuid.UUID]:
    return list(session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.state == DeliveryState.pending, WebhookDelivery.next_attempt_at <= db_now())
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)))


@dataclass(frozen=True)
class Taken:
    delivery: WebhookDelivery
    job: Job
    attempt: int


def take(session: Session, delivery_id: uuid.UUID, hold_seconds: float) -> Taken | None:
    """Claim the next attempt of a due delivery: one conditional UPDATE that also moves next_attempt_at
    past the time a POST can take, so a sender beside this one leaves it alone. None when not ours."""
    attempt = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == DeliveryState.pending,
               WebhookDelivery.next_attempt_at <= db_now())
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=db_now(hold_seconds))
        .returning(WebhookDelivery.attempts)
    ).scalar_one_or_none()
    if attempt is None:
        return None
    delivery = session.get(WebhookDelivery, delivery_id)
    return Taken(delivery=delivery, job=session.get(Job, delivery.job_id), attempt=attempt)


def record(session: Session, delivery_id: uuid.UUID, attempt: int, *, status_code: int | None, error: str | None,
           duration_ms: float, delivered: bool, retry_in: float | None) -> None:
    """One attempt's outcome; then delivered, failed (retry_in None: no attempts left) or due again later."""
    session.add(WebhookAttempt(delivery_id=delivery_id, attempt=attempt, at=db_now(), status_code=status_code,
                               error=error, duration_ms=duration_ms))
    if delivered:
        values = {"state": DeliveryState.delivered, "delivered_at": db_now()}
    elif retry_in is None:
        values = {"state": DeliveryState.failed}
    else:
        values = {"next_attempt_at": db_now(retry_in)}
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                                  WebhookDelivery.attempts == attempt).values(**values))
    session.flush()


def for_job(session: Session, job_id: uuid.UUID) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    deliveries = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                      .order_by(WebhookDelivery.created_at)))
    attempts = list(session.scalars(select(WebhookAttempt)
                                    .where(WebhookAttempt.delivery_id.in_([d.id for d in deliveries]))
                                    .order_by(WebhookAttempt.attempt)))
    return [(d, [a for a in attempts if a.delivery_id == d.id]) for d in deliveries]


def sealed_secret(session: Session, tenant_id: str) -> str | None:
    return session.scalar(select(Tenant.sealed_webhook_secret).where(Tenant.id == tenant_id))


def store_secret(session: Session, tenant_id: str, sealed: str, *, only_if_missing: bool) -> bool:
    """Returns whether it was stored; with only_if_missing, a secret another request stored first stays."""
    where = [Tenant.id == tenant_id]
    if only_if_missing:
        where.append(Tenant.sealed_webhook_secret.is_(None))
    return session.execute(update(Tenant).where(*where).values(sealed_webhook_secret=sealed)).rowcount == 1
