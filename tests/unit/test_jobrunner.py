"""The job lifecycle around the pipeline, without Celery: outcomes, readable reasons, lease renewal."""

from __future__ import annotations

import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from app.db.models import Job, JobStatus
from app.db.session import DatabaseUnreachable, make_engine, make_sessionmaker, unit_of_work, upgrade_database
from app.jobs import repository
from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.errors import JobCancelled, JobFailure, LostOwnership
from worker.jobrunner import Heartbeat, Reporter, _run_claimed, run_job
from worker.pipeline import PipelineResult

SPEC = {"model": {"id": "a/b"}, "quantization": {"method": "rtn"}, "calibration": {"dataset": "c/d"}}


@pytest.fixture
def env(tmp_path):
    settings = Settings(data_dir=tmp_path, lease_seconds=0.4)
    upgrade_database(settings)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    with unit_of_work(sessions) as s:
        job_id = repository.add_job(s, SPEC, 3).id
    with unit_of_work(sessions) as s:
        attempt = repository.claim(s, job_id, "me", settings.lease_seconds)
    yield settings, sessions, Reporter(sessions, job_id, attempt, "me")
    engine.dispose()


def job(sessions, job_id) -> Job:
    with unit_of_work(sessions) as s:
        return s.get(Job, job_id)


def run_with(env, pipeline):
    settings, sessions, reporter = env
    outcome = _run_claimed(reporter.job_id, JobSpec.model_validate(SPEC), settings, reporter, pipeline)
    return outcome, job(sessions, reporter.job_id)


def raising(exc):
    def pipeline(*_):
        raise exc
    return pipeline


def test_success_records_metrics_and_artifacts(env):
    outcome, row = run_with(env, lambda *_: PipelineResult(metrics={"perplexity_after": 3.0}, artifacts={"uri": "/x"}))
    assert outcome == "succeeded"
    assert row.status == JobStatus.succeeded and row.metrics == {"perplexity_after": 3.0}
    assert row.artifacts == {"uri": "/x"} and row.percent == 100.0 and row.finished_at is not None


@pytest.mark.parametrize("exc,reason", [
    (JobFailure("model 'x' not found"), "model 'x' not found"),
    (RuntimeError("boom /srv/secret/path"), "internal error (RuntimeError); the worker log has the details"),
    (SoftTimeLimitExceeded(), "time limit: the job ran longer than"),
])
def test_failures_carry_a_readable_reason(env, exc, reason):
    outcome, row = run_with(env, raising(exc))
    assert outcome == "failed" and row.status == JobStatus.failed
    assert row.error.startswith(reason)
    with unit_of_work(env[1]) as s:
        events = [(e.stage, e.message) for e in repository.list_events(s, row.id, 0, 100)]
    assert events[-1] == ("failed", row.error)
    assert not any("/srv/secret/path" in message for _, message in events)  # the exception text stays in the log


def test_cancel_between_layers_ends_cancelled(env):
    outcome, row = run_with(env, raising(JobCancelled()))
    assert outcome == "cancelled" and row.status == JobStatus.cancelled


def test_reporter_raises_cancelled_once_requested(env):
    _, sessions, reporter = env
    reporter.check_cancelled()  # nothing requested yet
    with unit_of_work(sessions) as s:
        repository.request_cancel(s, s.get(Job, reporter.job_id))
    with pytest.raises(JobCancelled):
        reporter.check_cancelled()


def test_heartbeat_keeps_the_lease_alive(env):
    settings, sessions, reporter = env
    first = job(sessions, reporter.job_id).lease_expires_at
    beat = Heartbeat(settings, reporter)
    beat.start()
    time.sleep(0.6)  # longer than the lease: without renewal it would have expired
    beat.stopped.set()
    beat.join()
    row = job(sessions, reporter.job_id)
    assert row.lease_expires_at > first
    assert not reporter.lost.is_set()


def test_a_stored_spec_that_no_longer_validates_fails_once_with_the_reason(tmp_path):
    settings = Settings(data_dir=tmp_path)
    upgrade_database(settings)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    with unit_of_work(sessions) as s:  # stored before today's rules: a field that no longer exists
        job_id = repository.add_job(s, {**SPEC, "quantization": {"method": "rtn", "bitz": 4}}, 3).id
    assert run_job(job_id, settings, sessions) == "failed"
    row = job(sessions, job_id)
    assert row.status == JobStatus.failed and row.attempt == 1
    assert row.error == "the stored job spec is no longer valid: quantization.bitz: Extra inputs are not permitted"
    assert run_job(job_id, settings, sessions) == "skipped"  # a duplicate message does not run it again
    engine.dispose()


def test_events_and_the_final_write_of_a_lost_attempt_are_refused(env):
    settings, sessions, reporter = env
    with unit_of_work(sessions) as s:  # another worker took over (attempt 2)
        s.execute(update(Job).where(Job.id == reporter.job_id).values(attempt=2, lease_owner="other"))
    with pytest.raises(LostOwnership):
        reporter.event("x", "from the stale attempt")
    assert reporter.still_owns() is False
    outcome, row = run_with(env, lambda *_: PipelineResult(metrics={}, artifacts={}))
    assert outcome == "lost" and row.status == JobStatus.running
    with unit_of_work(sessions) as s:
        assert "from the stale attempt" not in [e.message for e in repository.list_events(s, reporter.job_id, 0, 100)]


def test_a_database_outage_past_the_retry_bound_leaves_the_job_to_its_lease(env):
    outcome, row = run_with(env, raising(DatabaseUnreachable("job x: write: database unreachable for 60 s")))
    assert outcome == "lost"
    assert row.status == JobStatus.running and row.error is None  # not failed: the reaper requeues it
