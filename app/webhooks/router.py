"""Webhook endpoints: a job's deliveries (tenant-checked like every job endpoint) and the caller's
tenant's signing secret."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from app.auth import Caller, authenticate
from app.db.models import DeliveryState
from app.db.session import unit_of_work
from app.jobs import service as jobs
from app.jobs.schemas import ERRORS
from app.webhooks import repository, service

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=ERRORS)
CallerDep = Annotated[Caller, Depends(authenticate)]


class AttemptOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None  # the receiver's answer; None when there was none (see error)
    error: str | None
    duration_ms: float


class DeliveryOut(BaseModel):
    id: uuid.UUID  # also the X-Squeeze-Delivery header and the body's "id"
    event: str
    url: str
    state: DeliveryState
    attempts: list[AttemptOut]
    created_at: datetime
    next_attempt_at: datetime | None  # pending only
    delivered_at: datetime | None


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]


class SecretOut(BaseModel):
    secret: str  # HMAC-SHA256 key of X-Squeeze-Signature (its UTF-8 bytes)


@router.get("/jobs/{job_id}/webhooks", response_model=DeliveryPage)
def list_deliveries(job_id: uuid.UUID, request: Request, caller: CallerDep) -> DeliveryPage:
    with unit_of_work(request.app.state.sessions) as session:
        jobs.get_job(session, job_id, caller)
        return DeliveryPage(items=[
            DeliveryOut(id=d.id, event=d.event, url=d.url, state=d.state, created_at=d.created_at,
                        next_attempt_at=d.next_attempt_at if d.state == DeliveryState.pending else None,
                        delivered_at=d.delivered_at,
                        attempts=[AttemptOut(attempt=a.attempt, at=a.at, status_code=a.status_code, error=a.error,
                                             duration_ms=a.duration_ms) for a in attempts])
            for d, attempts in repository.for_job(session, job_id)])


@router.get("/webhook-secret", response_model=SecretOut)
def read_secret(request: Request, caller: CallerDep) -> SecretOut:
    """The secret that signs this tenant's webhooks (made on first use)."""
    state = request.app.state
    with unit_of_work(state.sessions) as session:
        return SecretOut(secret=service.signing_secret(session, state.settings, caller.tenant_id))


@router.post("/webhook-secret/rotate", response_model=SecretOut)
def rotate_secret(request: Request, caller: CallerDep) -> SecretOut:
    """A new secret; every delivery from now on, retries included, is signed with it."""
    state = request.app.state
    with unit_of_work(state.sessions) as session:
        return SecretOut(secret=service.rotate_secret(session, state.settings, caller.tenant_id))
