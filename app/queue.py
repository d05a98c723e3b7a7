"""Sending job messages. Called only after the job row is committed (outbox: jobs.dispatched_at)."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from app.db.session import unit_of_work
from app.jobs import repository
from app.settings import Settings
from worker.celery_app import RUN_JOB, create_celery

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.settings = settings
        self.sessions = sessions
        self.celery = create_celery(settings)

    def dispatch(self, job_id: uuid.UUID, queue: str | None = None) -> bool:
        """Send the wake-up message to the job's queue (None: the base queue) and record it. A failure
        leaves the job for the reaper to re-send."""
        if not self._send(job_id, queue):
            return False
        with unit_of_work(self.sessions) as session:
            repository.mark_dispatched(session, job_id)
        return True

    def redispatch(self, job_id: uuid.UUID, older_than: datetime) -> bool:
        """The reaper's re-send of a job left unsent (or sent before older_than). The job is marked sent
        first, by a conditional UPDATE, so that of reapers passing at the same time only one sends; a
        failed send marks it unsent again."""
        with unit_of_work(self.sessions) as session:
            stamp = repository.take_dispatch(session, job_id, older_than)
            queue = repository.job_queue(session, job_id)
        if stamp is None:
            return False
        if self._send(job_id, queue):
            return True
        with unit_of_work(self.sessions) as session:
            repository.give_back_dispatch(session, job_id, stamp)
        return False

    def _send(self, job_id: uuid.UUID, queue: str | None) -> bool:
        try:
            self.celery.send_task(
                RUN_JOB, args=[str(job_id)], queue=queue or self.settings.queue_name,
                expires=self.settings.redispatch_after_seconds * 2,
            )
        except Exception as exc:  # the broker is down: the job stays queued and unsent
            log.warning("could not send job %s to the broker: %s", job_id, exc)
            return False
        return True

    def ping(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def close(self) -> None:
        self.celery.close()
