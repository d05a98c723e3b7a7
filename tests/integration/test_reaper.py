"""Reapers on real PostgreSQL and Redis, several at once: in threads with their own sessions, and as
`squeeze reaper` processes with no API running. Each expired lease is released exactly once (one
UPDATE, one event), each requeued job is re-sent once, each old upload deleted once."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
import redis
from sqlalchemy import func, select, update

from app.db.base import db_now, utcnow
from app.db.models import DEFAULT_TENANT, Job, JobEvent, JobStatus, Upload
from app.db.session import make_engine, make_sessionmaker, unit_of_work
from app.jobs import repository, uploads
from app.queue import Dispatcher
from app.reaper import reap_once
from tests.services import REDIS_URL, ROOT, migrated_database, settings_env

SPEC = {"model": {"id": "a/b"}}


@pytest.fixture
def pg(tmp_path):
    """(settings, sessions) on a fresh migrated database, with a queue of its own on Redis."""
    with migrated_database(tmp_path, reaper_interval_seconds=0.2) as database:
        yield database


def dead_workers_jobs(sessions, count: int, max_attempts: int) -> list[uuid.UUID]:
    """Jobs claimed by a worker that got to layer 2 of 4 and then died: their leases are over."""
    ids = []
    for _ in range(count):
        with unit_of_work(sessions) as s:
            job_id = repository.add_job(s, SPEC, max_attempts).id
            assert repository.claim(s, job_id, "dead", 60) == 1
            assert repository.report_progress(s, job_id, 1, "dead", stage="compress", layer=2, layers=4, percent=40)
        ids.append(job_id)
    with unit_of_work(sessions) as s:
        s.execute(update(Job).where(Job.id.in_(ids)).values(lease_expires_at=db_now(-1)))
    return ids


def released(sessions, ids) -> dict[uuid.UUID, tuple[JobStatus, list[str]]]:
    """Per job: its status and the stages of the events written after the claim."""
    with unit_of_work(sessions) as s:
        jobs = {j.id: j.status for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        events = s.execute(select(JobEvent.job_id, JobEvent.stage).where(JobEvent.job_id.in_(ids), JobEvent.attempt == 1,
                                                                          JobEvent.stage != "starting")).all()
    return {job_id: (status, [stage for j, stage in events if j == job_id]) for job_id, status in jobs.items()}


def messages_sent(settings) -> list[str]:
    """Job ids of the messages waiting in the queue (kombu keeps a Redis list per queue; the body is
    Celery's [args, kwargs, embed], base64 encoded)."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
            for raw in redis.Redis.from_url(REDIS_URL).lrange(settings.queue_name, 0, -1)]


def old_uploads(settings, sessions, count: int) -> list[str]:
    settings.uploads_dir.mkdir(parents=True)
    ids = []
    with unit_of_work(sessions) as s:
        for _ in range(count):
            upload_id = uuid.uuid4().hex
            (settings.uploads_dir / f"{upload_id}.txt").write_text("old text\n")
            s.add(Upload(id=upload_id, tenant_id=DEFAULT_TENANT, filename=f"{upload_id}.txt", bytes=9,
                         created_at=utcnow() - timedelta(days=30)))
            ids.append(upload_id)
    return ids


def test_two_reapers_racing_release_each_job_once(pg):
    settings, sessions = pg
    requeue = dead_workers_jobs(sessions, 15, max_attempts=3)
    fail = dead_workers_jobs(sessions, 15, max_attempts=1)
    old_uploads(settings, sessions, 5)
    start = threading.Barrier(2)
    counts: list[dict[str, int]] = []

    def reaper():  # an engine (connection pool) and a broker connection of its own, as a process has
        engine = make_engine(settings)
        own_sessions = make_sessionmaker(engine)
        dispatcher = Dispatcher(settings, own_sessions)
        start.wait()
        counts.append(reap_once(settings, own_sessions, dispatcher))
        dispatcher.close()
        engine.dispose()

    threads = [threading.Thread(target=reaper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(counts) == 2, "a reaper pass raised"

    total = {key: sum(c[key] for c in counts) for key in counts[0]}
    assert total == {"requeued": 15, "failed": 15, "cancelled": 0, "dispatched": 15, "uploads_expired": 5}, counts
    outcome = released(sessions, requeue + fail)
    assert all(outcome[j] == (JobStatus.queued, ["queued"]) for j in requeue), outcome
    assert all(outcome[j] == (JobStatus.failed, ["failed"]) for j in fail), outcome
    assert sorted(messages_sent(settings)) == sorted(str(j) for j in requeue)  # one message per requeued job
    assert list(settings.uploads_dir.iterdir()) == []


def test_an_upload_deleted_by_another_reaper_is_not_counted_again(pg):
    """The second reaper read the upload before the first committed its deletion: it waits on the row
    lock, then deletes nothing, and says so."""
    settings, sessions = pg
    old_uploads(settings, sessions, 3)
    second: list[int] = []
    with unit_of_work(sessions) as first:
        assert uploads.delete_expired(first, settings, utcnow()) == 3
        racer = threading.Thread(target=lambda: second.append(_delete_expired(settings, sessions)))
        racer.start()
        _wait_until_blocked_on_a_lock(settings)
    racer.join(timeout=30)
    assert second == [0]
    with unit_of_work(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Upload)) == 0


def _delete_expired(settings, sessions) -> int:
    with unit_of_work(sessions) as s:
        return uploads.delete_expired(s, settings, utcnow())


def _wait_until_blocked_on_a_lock(settings) -> None:
    deadline = time.monotonic() + 20
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'").fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the second reaper never waited on the first one's lock"
            time.sleep(0.05)


def test_reaper_processes_requeue_and_fail_expired_jobs_with_no_api(pg, tmp_path):
    """Two `squeeze reaper` processes and nothing else: every dead worker's job is released once and
    the requeued ones are re-sent once; SIGTERM stops both cleanly."""
    settings, sessions = pg
    env = {**os.environ, **settings_env(settings), "SQUEEZE_REAPER_INTERVAL_SECONDS": "0.2", "PYTHONUNBUFFERED": "1"}
    requeue = dead_workers_jobs(sessions, 6, max_attempts=2)
    fail = dead_workers_jobs(sessions, 6, max_attempts=1)
    logs = [tmp_path / f"reaper{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "app.cli", "reaper"], cwd=ROOT, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs]
    try:
        deadline = time.monotonic() + 60
        while any(status == JobStatus.running for status, _ in released(sessions, requeue + fail).values()):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [log.read_text()[-2000:] for log in logs]
            time.sleep(0.2)
        time.sleep(1.0)  # a few more passes of both: nothing is released or sent twice
        outcome = released(sessions, requeue + fail)
        assert all(outcome[j] == (JobStatus.queued, ["queued"]) for j in requeue), outcome
        assert all(outcome[j] == (JobStatus.failed, ["failed"]) for j in fail), outcome
        assert sorted(messages_sent(settings)) == sorted(str(j) for j in requeue)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        returncodes = [p.wait(timeout=30) for p in procs]
    assert returncodes == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert all("SIGTERM, stopping" in log.read_text() for log in logs)
