"""Keeps jobs moving when messages or workers are lost.

- a running job whose lease expired (its worker died) goes back to queued, or fails when its
  attempts are spent;
- a queued job that was never dispatched (broker down at submit) or not picked up for a long time
  is sent again. Duplicated messages are harmless: claiming is conditional;
- uploads older than the retention period are deleted (row and file);
- a job it fails or cancels loses its layer checkpoints (when they are on a disk this process sees);
- beside the passes, a second loop POSTs due webhook deliveries (app/webhooks/sender.py), so a slow
  receiver never delays the lease checks.

It runs as its own process (`squeeze reaper`, which `squeeze serve` starts beside the API) or as a
thread inside an API process (`create_app`'s default). Any number may run at once against one
database: every change is a conditional UPDATE or DELETE that one of them wins (a re-send too: the
job is marked sent before the message goes), and each job is released in its own transaction.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.models import JobStatus
from app.db.session import make_engine, make_sessionmaker, unit_of_work
from app.jobs import repository, uploads
from app.queue import Dispatcher
from app.settings import Settings
from app.webhooks.sender import deliver_until

log = logging.getLogger(__name__)


def reap_once(settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher) -> dict[str, int]:
    """One pass. Counts only what this pass changed, not what a reaper beside it did."""
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "dispatched": 0, "uploads_expired": 0}
    with unit_of_work(sessions) as session:
        expired = repository.expired_leases(session)
    for job in expired:
        with unit_of_work(sessions) as session:
            outcome = repository.release_expired(session, job)
        if outcome == JobStatus.queued:
            counts["requeued"] += 1
        elif outcome is not None:
            counts[outcome.value] += 1
            # the job ended with its worker dead: nothing resumes from its layer checkpoints (on this disk)
            shutil.rmtree(settings.checkpoints_dir / str(job.id), ignore_errors=True)
    stale = utcnow() - timedelta(seconds=settings.redispatch_after_seconds)
    with unit_of_work(sessions) as session:
        to_send = repository.jobs_to_dispatch(session, stale)
    for job_id in to_send:
        counts["dispatched"] += dispatcher.redispatch(job_id, stale)
    with unit_of_work(sessions) as session:
        counts["uploads_expired"] = uploads.delete_expired(session, settings, utcnow())
    return counts


def reap_until(stop: threading.Event, settings: Settings, sessions: sessionmaker[Session],
               dispatcher: Dispatcher) -> None:
    """A pass every reaper_interval_seconds until `stop` is set; a failed pass is logged and retried."""
    while not stop.wait(settings.reaper_interval_seconds):
        try:
            counts = reap_once(settings, sessions, dispatcher)
            if any(counts.values()):
                log.info("reaper: %s", counts)
        except Exception:
            log.exception("reaper pass failed")


def _loops(stop: threading.Event, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher,
           daemon: bool) -> list[threading.Thread]:
    return [threading.Thread(target=reap_until, args=(stop, settings, sessions, dispatcher), name="squeeze-reaper",
                             daemon=daemon),
            threading.Thread(target=deliver_until, args=(stop, settings, sessions), name="squeeze-webhooks",
                             daemon=daemon)]


class Reaper:
    """reap_until and the webhook sender in daemon threads of the API process."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher):
        self._stop = threading.Event()
        self._threads = _loops(self._stop, settings, sessions, dispatcher, daemon=True)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def run_reaper_process(settings: Settings) -> int:
    """`squeeze reaper`: passes until SIGTERM or SIGINT, then a clean exit (a pass in progress finishes)."""
    # Blocked before any thread starts, so every thread inherits the mask and the signals reach only
    # sigwait below: no handler runs in the middle of a pass.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    dispatcher = Dispatcher(settings, sessions)
    stop = threading.Event()
    loops = _loops(stop, settings, sessions, dispatcher, daemon=False)
    for loop in loops:
        loop.start()
    log.info("reaper: a pass every %ss (pid %d)", settings.reaper_interval_seconds, os.getpid())
    received = signal.sigwait(stop_signals)
    log.info("reaper: %s, stopping", signal.Signals(received).name)
    stop.set()
    for loop in loops:
        loop.join()
    dispatcher.close()
    engine.dispose()
    return 0
