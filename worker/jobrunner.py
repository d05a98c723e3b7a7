"""The lifecycle around one job: claim, lease heartbeat, progress, cancellation, outcome.

No Celery here: the task calls `run_job(job_id, settings)`, and so can a test. No database session
is held while the pipeline computes; every write is its own short unit of work, retried while the
database is unreachable (a restart, a failover) for up to `db_retry_seconds`. A retried write is the
same conditional UPDATE, so it still applies only while this attempt owns the job.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job
from app.db.session import DatabaseUnreachable, make_engine, make_sessionmaker, retry_while_unreachable, unit_of_work
from app.jobs import repository
from app.jobs.spec import JobSpec
from app.secrets import unseal
from app.settings import Settings
from worker.checkpoint_store import discard_job_checkpoints
from worker.errors import JobCancelled, JobFailure, LostOwnership

log = logging.getLogger(__name__)


def retrying(sessions: sessionmaker[Session], seconds: float, work, what: str):
    """work(session) in its own unit of work, repeated while the database is unreachable."""
    def unit():
        with unit_of_work(sessions) as session:
            return work(session)
    return retry_while_unreachable(unit, seconds, what)


@dataclass
class Reporter:
    """What the pipeline sees of the job: progress, events and the cancel flag."""

    sessions: sessionmaker[Session]
    job_id: uuid.UUID
    attempt: int
    owner: str
    lease_seconds: float = 120.0
    db_retry_seconds: float = 60.0
    lost: threading.Event = field(default_factory=threading.Event)

    def retrying(self, work, what: str):
        return retrying(self.sessions, self.db_retry_seconds, work, f"job {self.job_id}: {what}")

    def _write(self, fn, *args, **kwargs) -> None:
        if self.lost.is_set():
            raise LostOwnership(f"job {self.job_id} attempt {self.attempt} is no longer ours")
        written = self.retrying(lambda s: fn(s, self.job_id, self.attempt, self.owner, *args, **kwargs), "write")
        if written is False:
            self.lost.set()
            raise LostOwnership(f"job {self.job_id} attempt {self.attempt} is no longer ours")

    def event(self, stage: str, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self._write(lambda s, j, a, o: repository.add_event(s, j, a, stage, message, level=level, data=data, owner=o))

    def still_owns(self) -> bool:
        """Checked right before an artifact is switched into place; refreshes the lease as it checks."""
        try:
            self._write(repository.mark_publishing, self.lease_seconds)
        except LostOwnership:
            return False
        return True

    def progress(self, stage: str, percent: float, layer: int | None = None, layers: int | None = None,
                 message: str | None = None, data: dict[str, Any] | None = None) -> None:
        self._write(lambda s, j, a, o: repository.report_progress(
            s, j, a, o, stage=stage, layer=layer, layers=layers, percent=round(percent, 2)))
        if message:
            self.event(stage, message, data=data)

    def check_cancelled(self) -> None:
        if self.lost.is_set():
            raise LostOwnership(f"job {self.job_id} attempt {self.attempt} is no longer ours")
        if self.retrying(lambda s: repository.cancel_requested(s, self.job_id), "cancel check"):
            raise JobCancelled()


class Heartbeat(threading.Thread):
    """Renews the lease; enforces the hard kill when a cancel is ignored past the grace period."""

    def __init__(self, settings: Settings, reporter: Reporter):
        super().__init__(name="squeeze-heartbeat", daemon=True)
        self.settings, self.reporter = settings, reporter
        self.stopped = threading.Event()

    def run(self) -> None:
        r = self.reporter
        while not self.stopped.wait(self.settings.lease_seconds / 4):
            try:
                renewed, overdue = r.retrying(self._renew, "lease renewal")
                if not renewed:
                    r.lost.set()
                    return
                if overdue:
                    r.retrying(self._finish_cancelled, "cancel after grace period")
                    log.warning("job %s: cancel ignored for %ss, killing this process", r.job_id,
                                self.settings.cancel_grace_seconds)
                    os.kill(os.getpid(), signal.SIGKILL)
            except Exception:
                log.exception("heartbeat for job %s failed; will retry", r.job_id)

    def _renew(self, session: Session) -> tuple[bool, bool]:
        r = self.reporter
        if not repository.renew_lease(session, r.job_id, r.attempt, r.owner, self.settings.lease_seconds):
            return False, False
        return True, repository.cancel_overdue(session, r.job_id, self.settings.cancel_grace_seconds)

    def _finish_cancelled(self, session: Session) -> None:
        r = self.reporter
        if repository.finish_cancelled(session, r.job_id, r.attempt, r.owner):
            repository.add_event(session, r.job_id, r.attempt, "cancelled",
                                 "cancel grace period over; worker process killed", level="warning")


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_job(job_id: str | uuid.UUID, settings: Settings, sessions: sessionmaker[Session] | None = None) -> str:
    """Claim and run one job to its end. Returns the outcome ('succeeded', 'skipped', ...).

    A message for a job that is not queued (cancelled, or run already) costs one UPDATE: torch and
    the pipeline are imported only after a claim succeeded."""
    job_id = uuid.UUID(str(job_id))
    engine = None
    if sessions is None:
        engine = make_engine(settings)
        sessions = make_sessionmaker(engine)
    owner = worker_identity()
    try:
        attempt, spec_data, sealed = retrying(sessions, settings.db_retry_seconds,
                                              lambda s: _claim(s, job_id, owner, settings), f"job {job_id}: claim")
        if attempt is None:
            log.info("job %s is not queued (or already claimed); skipping", job_id)
            return "skipped"
        reporter = Reporter(sessions, job_id, attempt, owner, settings.lease_seconds, settings.db_retry_seconds)
        try:
            spec = JobSpec.model_validate(spec_data)
        except ValidationError as exc:  # a spec stored before today's rules: fail once, do not retry
            reason = f"the stored job spec is no longer valid: {spec_problems(exc)}"
            return _finish(reporter, repository.fail, "failed", reason, reason, level="error") or "lost"
        heartbeat = Heartbeat(settings, reporter)
        heartbeat.start()
        try:
            from worker.pipeline import run_pipeline  # torch is imported only once there is work

            def pipeline(*args):  # the token is opened inside the run, so a bad one fails the job readably
                return run_pipeline(*args, token=_open_token(settings, sealed))

            outcome = _run_claimed(job_id, spec, settings, reporter, pipeline)
            if outcome != "lost":  # the job ended: nothing will resume from its layer checkpoints
                shutil.rmtree(settings.checkpoints_dir / str(job_id), ignore_errors=True)
                discard_job_checkpoints(settings.checkpoint_s3_uri, str(job_id), settings.s3_endpoint_url)
            return outcome
        finally:
            heartbeat.stopped.set()
            heartbeat.join(timeout=5)
    finally:
        if engine is not None:
            engine.dispose()


def _claim(session: Session, job_id: uuid.UUID, owner: str, settings: Settings):
    """(attempt, spec, sealed token) of a claim this worker won; (None, None, None) otherwise."""
    attempt = repository.claim(session, job_id, owner, settings.lease_seconds)
    if attempt is None:
        return None, None, None
    job = session.get(Job, job_id)
    return attempt, job.spec, job.sealed_token


def spec_problems(exc: ValidationError) -> str:
    """Field and message of each problem, without the offending values (they may be long or secret)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()[:5])


def _open_token(settings: Settings, sealed: str | None) -> str | None:
    if sealed is None:
        return None
    try:
        return unseal(settings, sealed)
    except ValueError as exc:  # the run fails with the reason; the token itself is never shown
        raise JobFailure(f"hf_token: {exc}") from None


def _finish(reporter: Reporter, transition, stage: str, message: str, *args, level: str = "info",
            data: dict[str, Any] | None = None) -> str | None:
    """The final transition and its event in one unit of work; None when the attempt is no longer ours."""
    def finish(session: Session) -> str | None:
        if not transition(session, reporter.job_id, reporter.attempt, reporter.owner, *args):
            return None
        repository.add_event(session, reporter.job_id, reporter.attempt, stage, message, level=level, data=data)
        return stage
    return reporter.retrying(finish, f"{stage} transition")


def _run_claimed(job_id, spec, settings, reporter: Reporter, run_pipeline) -> str:
    try:
        result = run_pipeline(job_id, spec, settings, reporter)
    except JobCancelled:
        return _finish(reporter, repository.finish_cancelled, "cancelled", "cancelled by request") or "lost"
    except LostOwnership as exc:
        log.warning("%s", exc)
        return "lost"
    except DatabaseUnreachable as exc:  # not the job's fault: its lease expires and the reaper queues it again
        log.error("%s; leaving the job to its lease", exc)
        return "lost"
    except JobFailure as exc:
        reason = str(exc)
    except SoftTimeLimitExceeded:
        reason = f"time limit: the job ran longer than {settings.job_soft_time_limit} s and was stopped"
    except Exception as exc:  # a bug, not bad input: the trace goes to the worker log, never to the user
        log.exception("job %s failed", job_id)
        reason = f"internal error ({exc.__class__.__name__}); the worker log has the details"
    else:
        outcome = _finish(reporter, repository.succeed, "done", "job succeeded", result.metrics, result.artifacts,
                          data={"artifacts": result.artifacts})
        return "succeeded" if outcome else "lost"
    return "failed" if _finish(reporter, repository.fail, "failed", reason, reason, level="error") else "lost"
