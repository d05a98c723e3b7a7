"""Tables: tenants and their API keys, jobs and their append-only event log, uploads, webhook deliveries."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Enum, Float, ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, UTCDateTime, utcnow


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


DEFAULT_TENANT = "default"  # owns every row made before tenants existed, and everything when auth is off


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the name given to `squeeze keys create`
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The key that signs this tenant's webhooks, sealed like a job's token (app/secrets.py); made on first use.
    sealed_webhook_secret: Mapped[str | None] = mapped_column(Text)


class ApiKey(Base):
    """A key is `sqz_<id>_<secret>`; only sha256 of the whole key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # public, shown by `squeeze keys list`
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    # Idempotency-Key of the POST that made the job, and sha256 of its body: a retry returns this job.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", native_enum=False, length=16), index=True
    )
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # A claim increments attempt; every later write names the attempt it belongs to.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Outbox: set once the broker message was sent; the reaper re-sends queued jobs left unsent.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A per-job token sealed with the server's key (app/secrets.py); cleared when the job ends.
    sealed_token: Mapped[str | None] = mapped_column(Text)
    # POSTed when the job ends (app/webhooks): a terminal transition adds a WebhookDelivery in its transaction.
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # Chosen at submit (app/jobs/routing.py): the memory class and the broker queue every send of the job
    # uses. Rows made before routing have none: the base queue, class "any".
    memory_class: Mapped[str | None] = mapped_column(String(32))
    queue: Mapped[str | None] = mapped_column(String(255))

    stage: Mapped[str] = mapped_column(String(32), default="queued")
    layer: Mapped[int | None] = mapped_column(Integer)
    layers: Mapped[int | None] = mapped_column(Integer)
    percent: Mapped[float] = mapped_column(Float, default=0.0)

    error: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # metrics without compression.per_module (the errors of every Linear, most of a finished job's 15-25 KB):
    # what a job list shows, written with metrics, so a list page neither reads nor parses the per-module table.
    # Deferred: only a list reads it (app/jobs/reads.py job_columns).
    listed_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, deferred=True)
    artifacts: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_tenant_id_status", "tenant_id", "status"),
        Index("uq_jobs_tenant_id_idempotency_key", "tenant_id", "idempotency_key", unique=True),
    )


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stage: Mapped[str] = mapped_column(String(32))
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Upload(Base):
    """A calibration file in the uploads folder, named <id><suffix>; counted against its tenant's quota."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(64))  # <id><suffix>, inside settings.uploads_dir
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class DeliveryState(str, enum.Enum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"  # every attempt was used without a 2xx


class WebhookDelivery(Base):
    """Outbox row: one terminal state of a job to POST to its webhook_url, until a 2xx or attempts run out."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled
    url: Mapped[str] = mapped_column(String(2048))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, name="delivery_state", native_enum=False, length=16), default=DeliveryState.pending
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When a sender may take it next; a sender moves it forward before sending, so only one sends.
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),)


class WebhookAttempt(Base):
    """One POST of a delivery: the HTTP status it got, or why there was none."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)
