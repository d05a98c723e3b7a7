"""Job transitions on real PostgreSQL and on SQLite: one conditional statement each, attempt-checked,
judged by the database's clock, and safe against stale workers and racing cancels."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.db.base import db_now, utcnow
from app.db.models import Job, JobStatus
from app.db.session import make_engine, make_sessionmaker, unit_of_work, upgrade_database
from app.jobs import repository
from app.settings import Settings
from tests.services import fresh_postgres_database

SPEC = {"model": {"id": "a/b"}}


def _sessions_for(settings):
    upgrade_database(settings)
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def pg_sessions(tmp_path_factory):
    with fresh_postgres_database() as url:
        yield from _sessions_for(Settings(data_dir=tmp_path_factory.mktemp("pg"), database_url=url))


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def sessions(request, tmp_path_factory):
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_sessions")
    else:
        yield from _sessions_for(Settings(data_dir=tmp_path_factory.mktemp("sqlite")))


def new_job(sessions, max_attempts=2):
    with unit_of_work(sessions) as s:
        return repository.add_job(s, SPEC, max_attempts).id


def status(sessions, job_id):
    with unit_of_work(sessions) as s:
        return s.get(Job, job_id)


def expire_lease(sessions, job_id):
    with unit_of_work(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_now(-1)))


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
    assert job.status == JobStatus.failed and "worker lost 1 time" in job.error and "1 of 1 attempts" in job.error
    assert job.stage == "failed"  # the progress reads failed, not the stage the dead worker was in


def test_the_failure_reason_says_where_the_lost_attempts_were(sessions):
    job_id = new_job(sessions, max_attempts=2)
    for attempt, (stage, layer, layers) in enumerate([("compress", 2, 4), ("loading", None, None)], start=1):
        with unit_of_work(sessions) as s:
            assert repository.claim(s, job_id, f"w{attempt}", 60) == attempt
            assert repository.report_progress(s, job_id, attempt, f"w{attempt}", stage=stage, layer=layer,
                                              layers=layers, percent=10)
        expire_lease(sessions, job_id)
        with unit_of_work(sessions) as s:
            repository.release_expired(s, s.get(Job, job_id))
    job = status(sessions, job_id)
    assert job.status == JobStatus.failed
    assert job.error == ("worker lost 2 times (lease expired on each attempt); last seen at stage loading; "
                         "giving up after 2 of 2 attempts")
    with unit_of_work(sessions) as s:  # the requeue reset layer and stage: its event keeps them
        lost = [e for e in repository.list_events(s, job_id, 0, 100) if "worker lost" in e.message]
    assert [(e.attempt, e.stage, e.data) for e in lost] == [
        (1, "queued", {"stage": "compress", "layer": 2, "layers": 4}),
        (2, "failed", {"stage": "loading", "layer": None, "layers": None})]
    assert lost[0].message == ("worker lost (lease expired) on attempt 1 of 2, last seen at layer 2 of 4, "
                               "stage compress; requeued")


def test_a_live_lease_is_not_reaped(sessions):
    job_id = new_job(sessions)
    with unit_of_work(sessions) as s:
        repository.claim(s, job_id, "w", 60)
    with unit_of_work(sessions) as s:
        assert job_id not in [j.id for j in repository.expired_leases(s)]
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


def test_of_two_reapers_re_sending_a_job_only_one_takes_it(sessions):
    job_id = new_job(sessions)
    stale = utcnow() - timedelta(seconds=60)
    with unit_of_work(sessions) as s:
        stamp = repository.take_dispatch(s, job_id, stale)
    with unit_of_work(sessions) as s:
        assert stamp is not None and repository.take_dispatch(s, job_id, stale) is None
        assert job_id not in repository.jobs_to_dispatch(s, stale)
    with unit_of_work(sessions) as s:  # its send failed: unsent again, for the next pass
        assert repository.give_back_dispatch(s, job_id, stamp)
    with unit_of_work(sessions) as s:
        assert status(sessions, job_id).dispatched_at is None
        assert repository.take_dispatch(s, job_id, stale) is not None


def test_lease_expiry_is_judged_by_the_database_clock(sessions, monkeypatch):
    """A process whose clock runs an hour fast (or slow) neither expires a live lease nor keeps a dead one."""
    job_id = new_job(sessions)
    with unit_of_work(sessions) as s:
        repository.claim(s, job_id, "w", 60)
    monkeypatch.setattr(repository, "utcnow", lambda: utcnow() + timedelta(hours=1))
    with unit_of_work(sessions) as s:
        assert job_id not in [j.id for j in repository.expired_leases(s)]
        assert repository.release_expired(s, s.get(Job, job_id)) is None
    monkeypatch.setattr(repository, "utcnow", lambda: utcnow() - timedelta(hours=1))
    with unit_of_work(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_now(-0.5)))
    with unit_of_work(sessions) as s:
        assert job_id in [j.id for j in repository.expired_leases(s)]
        assert repository.release_expired(s, s.get(Job, job_id)) == JobStatus.queued
    with unit_of_work(sessions) as s:  # a renewal writes the database's now + lease, not the process's
        assert repository.claim(s, job_id, "w2", 60) == 2
        now = s.scalar(select(db_now()))
        lease = s.get(Job, job_id).lease_expires_at
    assert timedelta(seconds=59) < lease - now < timedelta(seconds=61)


def test_a_worker_that_lost_its_lease_cannot_append_events(sessions):
    job_id = new_job(sessions)
    with unit_of_work(sessions) as s:
        repository.claim(s, job_id, "old", 60)
    with unit_of_work(sessions) as s:
        assert repository.add_event(s, job_id, 1, "x", "while ours", owner="old")
    expire_lease(sessions, job_id)
    with unit_of_work(sessions) as s:
        repository.release_expired(s, s.get(Job, job_id))
    with unit_of_work(sessions) as s:
        assert repository.claim(s, job_id, "new", 60) == 2
    with unit_of_work(sessions) as s:
        assert not repository.add_event(s, job_id, 1, "x", "stale", owner="old")
        assert not repository.mark_publishing(s, job_id, 1, "old", 60)
        assert repository.add_event(s, job_id, 2, "x", "current", owner="new", data={"k": [1, 2]})
        assert repository.mark_publishing(s, job_id, 2, "new", 60)
    with unit_of_work(sessions) as s:
        events = repository.list_events(s, job_id, 0, 100)
    messages = [e.message for e in events]
    assert "while ours" in messages and "current" in messages and "stale" not in messages
    assert [e.data for e in events if e.message == "current"] == [{"k": [1, 2]}]


def test_cancel_of_a_queued_job_is_one_update_whatever_the_caller_read(sessions):
    job_id = new_job(sessions)
    with unit_of_work(sessions) as api:
        stale_read = api.get(Job, job_id)
        assert stale_read.status == JobStatus.queued  # the API read it as queued ...
        with unit_of_work(sessions) as s:
            assert repository.claim(s, job_id, "w", 60) == 1  # ... the worker claims in between ...
        # ... and the cancel still lands, as a flag on the running job
        assert repository.request_cancel(api, stale_read) == JobStatus.running
    with unit_of_work(sessions) as s:
        assert repository.cancel_requested(s, job_id)
    with unit_of_work(sessions) as s:
        assert repository.request_cancel(s, s.get(Job, job_id)) == JobStatus.running  # a second cancel: no-op
    with unit_of_work(sessions) as s:
        assert repository.finish_cancelled(s, job_id, 1, "w")
    assert status(sessions, job_id).status == JobStatus.cancelled

    queued = new_job(sessions)
    with unit_of_work(sessions) as s:
        assert repository.request_cancel(s, s.get(Job, queued)) == JobStatus.cancelled
    with unit_of_work(sessions) as s:
        assert repository.claim(s, queued, "w", 60) is None
    row = status(sessions, queued)
    assert row.status == JobStatus.cancelled and row.finished_at is not None and row.attempt == 0


def _in_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.update(value=fn()))
    thread.start()
    return thread, box


def test_cancel_racing_a_claim_whose_transaction_is_open_ends_cancelled(pg_sessions, tmp_path):
    """The worker's claim has run its UPDATE but not committed; the cancel arrives meanwhile. The cancel
    waits for the row, sees the committed claim, flags the running job; the worker then stops cancelled."""
    from worker.jobrunner import Reporter, _run_claimed

    sessions = pg_sessions
    job_id = new_job(sessions)
    claim_session = sessions()
    attempt = repository.claim(claim_session, job_id, "w", 60)  # row locked, not committed
    assert attempt == 1

    def cancel():
        with unit_of_work(sessions) as s:
            return repository.request_cancel(s, s.get(Job, job_id))

    thread, box = _in_thread(cancel)
    thread.join(timeout=1.0)
    assert thread.is_alive(), "the cancel should wait for the claim's row lock"
    claim_session.commit()
    claim_session.close()
    thread.join(timeout=10)
    assert box["value"] == JobStatus.running

    reporter = Reporter(sessions, job_id, attempt, "w")

    def pipeline(*_):
        reporter.check_cancelled()  # what the pipeline does between layers
        raise AssertionError("the cancel flag was lost")

    outcome = _run_claimed(job_id, None, Settings(data_dir=tmp_path), reporter, pipeline)
    assert outcome == "cancelled" and status(sessions, job_id).status == JobStatus.cancelled


def test_claim_racing_a_cancel_whose_transaction_is_open_does_not_claim(pg_sessions):
    sessions = pg_sessions
    job_id = new_job(sessions)
    cancel_session = sessions()
    assert repository.request_cancel(cancel_session, cancel_session.get(Job, job_id)) == JobStatus.cancelled

    def claim():
        with unit_of_work(sessions) as s:
            return repository.claim(s, job_id, "w", 60)

    thread, box = _in_thread(claim)
    thread.join(timeout=1.0)
    assert thread.is_alive(), "the claim should wait for the cancel's row lock"
    cancel_session.commit()
    cancel_session.close()
    thread.join(timeout=10)
    assert box["value"] is None
    row = status(sessions, job_id)
    assert row.status == JobStatus.cancelled and row.attempt == 0
