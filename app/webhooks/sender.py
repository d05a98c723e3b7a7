"""POSTs due webhook deliveries: runs in the reaper (its own process under `squeeze serve`, or a thread
of the API), never in a request or in the worker's pipeline.

Each attempt is claimed in a short transaction (app/webhooks/repository.take), sent with no session
held, and recorded in another. A 2xx delivers it; anything else (another status, a timeout, a refused
or unresolvable address) is retried after webhook_backoff_seconds * 2**(attempt-1) until
webhook_max_attempts, then the delivery is failed. Every attempt is a row the job's owner can read.
Redirects are not followed (a redirect could lead anywhere the address check would refuse).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, WebhookDelivery
from app.db.session import unit_of_work
from app.jobs.schemas import JobOut
from app.settings import Settings
from app.webhooks import repository
from app.webhooks.addresses import Resolver, WebhookRefused, check_url, system_resolver
from app.webhooks.service import SIGNATURE_HEADER, signature, signing_secret

log = logging.getLogger(__name__)
BATCH = 50


def body_for(delivery: WebhookDelivery, job: Job) -> bytes:
    """What is POSTed: the delivery's id (receivers dedupe by it), its event, and the job as GET returns it."""
    return json.dumps({"id": str(delivery.id), "event": delivery.event,
                       "created_at": delivery.created_at.isoformat(),
                       "job": JobOut.of(job).model_dump(mode="json")}, sort_keys=True).encode()


def _post(settings: Settings, delivery: WebhookDelivery, body: bytes, secret: str,
          resolver: Resolver) -> tuple[int | None, str | None]:
    """(status code, None) of one POST, or (None, why there was no answer)."""
    try:
        target = check_url(delivery.url, settings.webhook_allow_private, resolver)
    except WebhookRefused as exc:
        return None, f"refused: {exc}"
    headers = {"Host": target.host_header, "Content-Type": "application/json", "User-Agent": "squeeze-webhooks/1",
               "X-Squeeze-Event": delivery.event, "X-Squeeze-Delivery": str(delivery.id),
               SIGNATURE_HEADER: signature(secret, body)}
    try:
        with httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False) as http:
            response = http.post(target.pinned_url, content=body, headers=headers,
                                 extensions={"sni_hostname": target.host})
        return response.status_code, None
    except httpx.HTTPError as exc:
        return None, f"{exc.__class__.__name__}: {exc}"[:500]


def deliver_due(settings: Settings, sessions: sessionmaker[Session],
                resolver: Resolver = system_resolver) -> int:
    """One pass over the due deliveries; returns how many attempts it made."""
    with unit_of_work(sessions) as session:
        due = repository.due(session, BATCH)
    made = 0
    for delivery_id in due:
        hold = settings.webhook_timeout_seconds * 3 + 30  # longer than a POST (and its DNS) can take
        with unit_of_work(sessions) as session:
            taken = repository.take(session, delivery_id, hold)
            if taken is None:
                continue  # another sender has it
            body = body_for(taken.delivery, taken.job)
            secret = signing_secret(session, settings, taken.job.tenant_id)
            delivery = taken.delivery
        started = time.perf_counter()
        status_code, error = _post(settings, delivery, body, secret, resolver)
        duration_ms = (time.perf_counter() - started) * 1000
        delivered = status_code is not None and 200 <= status_code < 300
        if status_code is not None and not delivered:
            error = f"HTTP {status_code}"
        retry_in = None if taken.attempt >= settings.webhook_max_attempts else \
            settings.webhook_backoff_seconds * 2 ** (taken.attempt - 1)
        with unit_of_work(sessions) as session:
            repository.record(session, delivery_id, taken.attempt, status_code=status_code,
                              error=None if delivered else error, duration_ms=round(duration_ms, 1),
                              delivered=delivered, retry_in=retry_in)
        made += 1
        if not delivered:
            log.warning("webhook %s of job %s, attempt %d: %s", delivery_id, delivery.job_id, taken.attempt, error)
    return made


def deliver_until(stop: threading.Event, settings: Settings, sessions: sessionmaker[Session]) -> None:
    """A pass every webhook_interval_seconds until `stop` is set; a failed pass is logged and retried."""
    while not stop.wait(settings.webhook_interval_seconds):
        try:
            deliver_due(settings, sessions)
        except Exception:
            log.exception("webhook pass failed")
