"""Job transitions on real PostgreSQL: conditional, attempt-checked, and safe against stale workers."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.db.base import utcnow
from app.db.models import Job, JobStatus
from app.db.session import make_engine, make_sessionmaker, unit_of_work, upgrade_database
from app.jobs import repository
from app.settings import Settings
from tests.services import fresh_postgres_database

SPEC = {"model": {"id": "a/b"}}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    with fresh_postgres_database() as url:
        settings = Settings(data_dir=tmp_path_factory.mktemp("pg"), database_url=url)
        upgrade_database(settings)
        engine = make_engine(settings)
        yield make_sessionmaker(engine)
        engine.dispose()


def new_job(sessions, max_attempts=2):
    with unit_of_work(sessions) as s:
        return repository.add_job(s, SPEC, max_attempts).id


def status(sessions, job_id):
    with unit_of_work(sessions) as s:
        return s.get(Job, job_id)


def expire_lease(sessions, job_id):
    with unit_of_work(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_only_one_of_two_workers_claims_a_job(sessions):
    job_id = new_job(sessions)
    with unit_of_work(sessions) as s:
        first = repository.claim(s, job_id, "w1", 60)
    with unit_of_work(sessions) as s:
        second = repository.claim(s, job_id, "w2", 60)
    assert (first, second) == (1, None)
    job = status(sessions, job_id)
    assert job.status == JobStatus.running and job.lease_owner == "w1" and job.attempt == 1


def test_stale_worker_cannot_write_after_its_lease_was_reaped(sessions):
    job_id = new_job(sessions, max_attempts=2)
    with unit_of_work(sessions) as s:
        assert repository.claim(s, job_id, "old", 60) == 1
    expire_lease(sessions, job_id)
    with unit_of_work(sessions) as s:
        job = s.get(Job, job_id)
        assert repository.release_expired(s, job) == JobStatus.queued
    with unit_of_work(sessions) as s:
        assert repository.claim(s, job_id, "new", 60) == 2
    with unit_of_work(sessions) as s:  # the old worker wakes up: every write of it is refused
        assert not repository.renew_lease(s, job_id, 1, "old", 60)
        assert not repository.report_progress(s, job_id, 1, "old", stage="x", layer=1, layers=2, percent=5)
        assert not repository.succeed(s, job_id, 1, "old", {}, {})
    with unit_of_work(sessions) as s:
        assert repository.succeed(s, job_id, 2, "new", {"ppl": 1.0}, {"uri": "x"})
    job = status(sessions, job_id)
    assert job.status == JobStatus.succeeded and job.metrics == {"ppl": 1.0} and job.attempt == 2


def test_lease_expiry_fails_the_job_when_attempts_are_spent(sessions):
    job_id = new_job(sessions, max_attempts=1)
    with unit_of_work(sessions) as s:
        repository.claim(s, job_id, "w", 60)
    expire_lease(sessions, job_id)
    with unit_of_work(sessions) as s:
        assert repository.release_expired(s, s.get(Job, job_id)) == JobStatus.failed
    job = status(sessions, job_id)
    assert job.status == JobStatus.failed and "attempt 1 of 1" in job.error


def test_a_live_lease_is_not_reaped(sessions):
    job_id = new_job(sessions)
    with unit_of_work(sessions) as s:
        repository.claim(s, job_id, "w", 60)
    with unit_of_work(sessions) as s:
        assert job_id not in [j.id for j in repository.expired_leases(s, utcnow())]
        assert repository.release_expired(s, s.get(Job, job_id)) is None
    assert status(sessions, job_id).status == JobStatus.running


def test_cancel_running_sets_flag_then_worker_finishes_cancelled(sessions):
    job_id = new_job(sessions)
    with unit_of_work(sessions) as s:
        repository.claim(s, job_id, "w", 60)
    with unit_of_work(sessions) as s:
        assert repository.request_cancel(s, s.get(Job, job_id)) == JobStatus.running
        assert repository.cancel_requested(s, job_id)
    with unit_of_work(sessions) as s:
        assert repository.finish_cancelled(s, job_id, 1, "w")
    assert status(sessions, job_id).status == JobStatus.cancelled


def test_undispatched_and_stale_queued_jobs_are_found_for_redispatch(sessions):
    job_id = new_job(sessions)
    with unit_of_work(sessions) as s:
        assert job_id in repository.jobs_to_dispatch(s, utcnow() - timedelta(seconds=60))
        repository.mark_dispatched(s, job_id)
    with unit_of_work(sessions) as s:
        assert job_id not in repository.jobs_to_dispatch(s, utcnow() - timedelta(seconds=60))
        assert job_id in repository.jobs_to_dispatch(s, utcnow() + timedelta(seconds=1))
