"""Celery tasks: as thin as a web view. The logic lives in worker.jobrunner and worker.pipeline."""

from __future__ import annotations

import logging
import uuid

from celery.worker.request import Request
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from app.db.session import make_engine, unit_of_work
from app.jobs import repository
from worker.celery_app import RUN_JOB, create_celery
from worker.jobrunner import run_job

log = logging.getLogger(__name__)

app = create_celery()
settings = app.conf.squeeze_settings
_sessions: sessionmaker | None = None


def _claimable(job_id: str) -> bool:
    """Asked in the worker's main process. NullPool: no connection stays open to be inherited by the
    pool's forked children."""
    global _sessions
    if _sessions is None:
        _sessions = sessionmaker(make_engine(settings, poolclass=NullPool))
    with unit_of_work(_sessions) as session:
        return repository.claimable(session, uuid.UUID(job_id))


class SkipsFinishedJobs(Request):
    """A message for a job that was cancelled (or ran) while queued is acknowledged and dropped in the
    main process, like a revoked task, so it costs no child process: children serve one job each
    (worker_max_tasks_per_child=1) and starting a fresh one costs seconds."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        try:
            claimable = _claimable(self.args[0])
        except Exception:  # bad message or database trouble: the child's claim decides, as before
            log.exception("could not check job of task %s; handing it to the pool", self.id)
            return False
        if claimable:
            return False
        log.info("job %s is not queued (cancelled or already run); message dropped", self.args[0])
        self._announce_revoked("job not queued", False, None, False)
        return True


@app.task(name=RUN_JOB, ignore_result=True, Request=SkipsFinishedJobs)
def run_job_task(job_id: str) -> str:
    outcome = run_job(job_id, settings)
    log.info("job %s: %s", job_id, outcome)
    return outcome
