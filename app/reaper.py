"""Keeps jobs moving when messages or workers are lost.

- a running job whose lease expired (its worker died) goes back to queued, or fails when its
  attempts are spent;
- a queued job that was never dispatched (broker down at submit) or not picked up for a long time
  is sent again. Duplicated messages are harmless: claiming is conditional;
- uploads older than the retention period are deleted (row and file).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.models import JobStatus
from app.db.session import unit_of_work
from app.jobs import repository, uploads
from app.queue import Dispatcher
from app.settings import Settings

log = logging.getLogger(__name__)


def reap_once(settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher) -> dict[str, int]:
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "dispatched": 0, "uploads_expired": 0}
    with unit_of_work(sessions) as session:
        for job in repository.expired_leases(session):
            outcome = repository.release_expired(session, job)
            if outcome == JobStatus.queued:
                counts["requeued"] += 1
            elif outcome is not None:
                counts[outcome.value] += 1
    with unit_of_work(sessions) as session:
        stale = utcnow() - timedelta(seconds=settings.redispatch_after_seconds)
        to_send = repository.jobs_to_dispatch(session, stale)
    for job_id in to_send:
        counts["dispatched"] += dispatcher.dispatch(job_id)
    with unit_of_work(sessions) as session:
        counts["uploads_expired"] = uploads.delete_expired(session, settings, utcnow())
    return counts


class Reaper:
    """Runs reap_once every reaper_interval_seconds in a daemon thread of the API process."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher):
        self.settings, self.sessions, self.dispatcher = settings, sessions, dispatcher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="squeeze-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            try:
                counts = reap_once(self.settings, self.sessions, self.dispatcher)
                if any(counts.values()):
                    log.info("reaper: %s", counts)
            except Exception:
                log.exception("reaper pass failed")
