"""The polling read path (app/jobs/views.py) on PostgreSQL and SQLite: the bodies are the response models'
bytes, and a conditional GET is 304 only for what the caller may see and what has not changed since."""

from __future__ import annotations

import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth import create_key
from app.client import SqueezeClient
from app.db.models import Job, JobEvent
from app.db.session import make_engine, make_sessionmaker, unit_of_work, upgrade_database
from app.jobs import repository
from app.jobs.schemas import EventOut, EventPage, JobOut, JobPage, job_fields
from app.jobs.service import encode_cursor
from app.main import create_app
from app.settings import Settings
from tests.services import REDIS_URL, bearer, fresh_postgres_database

SPEC = {"model": {"id": "org/Model-ü"}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
        "calibration": {"dataset": "org/data"}}
# What a finished job records, with the values whose spelling a serialiser could change: small and large
# floats, big integers, non-ASCII text. (No NaN: PostgreSQL's json refuses it.)
METRICS = {"perplexity_before": 12.345678901234567, "perplexity_after": 1e-05, "tiny": 5e-324, "huge": 1.5e300,
           "count": 2**62, "note": "Größe ✓",
           "compression": {"modules": 2, "per_module": {"a": {"error_before": 0.1, "rank": 4}}}}


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def settings(request, tmp_path_factory):
    data = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        settings = Settings(data_dir=data, auth="on")
        upgrade_database(settings)
        yield settings
        return
    with fresh_postgres_database() as url:
        settings = Settings(data_dir=data, database_url=url, broker_url=REDIS_URL, auth="on")
        upgrade_database(settings)
        yield settings


@pytest.fixture(scope="module")
def sessions(settings):
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def clients(settings, sessions):
    """A client for tenant-a and one for tenant-b, on one app."""
    with unit_of_work(sessions) as session:
        keys = {tenant: create_key(session, tenant) for tenant in ("tenant-a", "tenant-b")}
    with TestClient(create_app(settings, run_reaper=False)) as a, TestClient(a.app) as b:
        a.headers.update(bearer(keys["tenant-a"]))
        b.headers.update(bearer(keys["tenant-b"]))
        yield a, b


def add_jobs(sessions, tenant: str) -> dict[str, uuid.UUID]:
    """A job of the tenant in each state, the running one with events."""
    with unit_of_work(sessions) as session:
        jobs = {state: repository.add_job(session, SPEC, 3, tenant_id=tenant).id
                for state in ("queued", "running", "succeeded", "failed", "cancelled")}
        for state in ("running", "succeeded", "failed"):
            repository.claim(session, jobs[state], "w1", 60)
        repository.report_progress(session, jobs["running"], 1, "w1", stage="compress", layer=3, layers=7,
                                   percent=42.5)
        repository.add_event(session, jobs["running"], 1, "compress", "layer 3/7 — done", data={"seconds": 1e-05})
        repository.succeed(session, jobs["succeeded"], 1, "w1", METRICS, {"uri": "file:///a", "files": {"x": 1}})
        repository.fail(session, jobs["failed"], 1, "w1", "CUDA out of memory — ünïcode")
        repository.request_cancel(session, session.get(Job, jobs["cancelled"]))
    return jobs


def test_the_read_bodies_are_the_response_models_bytes(sessions, clients):
    a, _ = clients
    ids = add_jobs(sessions, "tenant-a")
    with unit_of_work(sessions) as session:
        jobs = list(session.scalars(select(Job).where(Job.tenant_id == "tenant-a")
                                    .order_by(Job.created_at.desc(), Job.id.desc())))
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == ids["running"]).order_by(JobEvent.id)))
        for job in jobs:
            assert a.get(f"/v1/jobs/{job.id}").content == JobOut.of(job).model_dump_json().encode()
        listed = [JobOut.model_validate(job_fields(job, job.spec, job.listed_metrics, job.artifacts)) for job in jobs]
    assert a.get(f"/v1/jobs/{ids['succeeded']}").json()["metrics"]["note"] == "Größe ✓"

    first = a.get("/v1/jobs?limit=3")
    assert first.content == JobPage(items=listed[:3], next_cursor=encode_cursor(jobs[2])).model_dump_json().encode()
    rest = a.get("/v1/jobs", params={"limit": 50, "cursor": first.json()["next_cursor"]})
    assert rest.content == JobPage(items=listed[3:], next_cursor=None).model_dump_json().encode()
    search = a.get("/v1/job-search?model=MODEL-Ü&limit=50")
    assert search.content == JobPage(items=listed, next_cursor=None).model_dump_json().encode()

    page = EventPage(items=[EventOut.model_validate({name: getattr(e, name) for name in EventOut.model_fields})
                            for e in events], next_after=events[-1].id)
    assert a.get(f"/v1/jobs/{ids['running']}/events").content == page.model_dump_json().encode()
    after = a.get(f"/v1/jobs/{ids['running']}/events?after={events[-1].id}")
    assert after.content == EventPage(items=[], next_after=events[-1].id).model_dump_json().encode()
    assert len(events) == 3  # queued, claimed, the layer


def test_an_unchanged_job_is_304_and_a_changed_one_200_with_a_new_tag(sessions, clients):
    a, _ = clients
    running = add_jobs(sessions, "tenant-a")["running"]
    first = a.get(f"/v1/jobs/{running}")
    tag = first.headers["etag"]
    assert tag.startswith('W/"') and first.headers["cache-control"] == "private, no-cache"
    for sent in (tag, tag.removeprefix("W/"), f'"other", {tag}', "*"):
        again = a.get(f"/v1/jobs/{running}", headers={"If-None-Match": sent})
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", tag)
    stale = a.get(f"/v1/jobs/{running}", headers={"If-None-Match": 'W/"0123"'})
    assert (stale.status_code, stale.content) == (200, first.content)

    with unit_of_work(sessions) as session:
        assert repository.report_progress(session, running, 1, "w1", stage="compress", layer=4, layers=7, percent=50.0)
    changed = a.get(f"/v1/jobs/{running}", headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.json()["progress"]["layer"] == 4
    assert changed.headers["etag"] not in (tag, None)
    assert a.get(f"/v1/jobs/{running}", headers={"If-None-Match": changed.headers["etag"]}).status_code == 304


def test_a_list_page_is_304_until_the_tenant_s_jobs_change(sessions, clients):
    a, b = clients
    add_jobs(sessions, "tenant-a")
    for path in ("/v1/jobs?limit=4", "/v1/job-search?model=org&limit=4"):
        tag = a.get(path).headers["etag"]
        assert a.get(path, headers={"If-None-Match": tag}).status_code == 304
        add_jobs(sessions, "tenant-b")  # another tenant's jobs change nothing in this one's list
        assert a.get(path, headers={"If-None-Match": tag}).status_code == 304
        with unit_of_work(sessions) as session:
            repository.add_job(session, SPEC, 3, tenant_id="tenant-a")
        newer = a.get(path, headers={"If-None-Match": tag})
        assert newer.status_code == 200 and newer.headers["etag"] != tag


def test_another_tenant_s_tag_gives_nothing_away(sessions, clients):
    a, b = clients
    job = add_jobs(sessions, "tenant-a")["succeeded"]
    tag = a.get(f"/v1/jobs/{job}").headers["etag"]
    for sent in (tag, "*"):
        theirs = b.get(f"/v1/jobs/{job}", headers={"If-None-Match": sent})
        assert theirs.status_code == 404 and "etag" not in theirs.headers
        assert theirs.json()["error"] == "not_found"
    page_tag = a.get("/v1/jobs").headers["etag"]
    own = b.get("/v1/jobs", headers={"If-None-Match": page_tag})
    assert own.status_code == 200 and own.headers["etag"] != page_tag
    assert {item["tenant"] for item in own.json()["items"]} == {"tenant-b"}


class Recording(httpx.BaseTransport):
    """The test app's transport, noting the status of every answer."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner, self.statuses = inner, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.statuses.append(response.status_code)
        return httpx.Response(response.status_code, headers=response.headers, content=response.read())


def test_the_python_client_polls_with_if_none_match(sessions, clients, settings):
    a, _ = clients
    running = add_jobs(sessions, "tenant-a")["running"]
    transport = Recording(a._transport)
    with SqueezeClient("http://testserver", a.headers["authorization"].removeprefix("Bearer "),
                       transport=transport) as client:
        first, again = client.job(running), client.job(running)
        assert transport.statuses == [200, 304] and again == first and again is not first
        with unit_of_work(sessions) as session:
            repository.report_progress(session, running, 1, "w1", stage="compress", layer=5, layers=7, percent=60.0)
        assert client.job(running).progress.layer == 5 and transport.statuses[-1] == 200
        assert client.job(running).progress.layer == 5 and transport.statuses[-1] == 304

        page = client.jobs(limit=2)
        assert client.jobs(limit=2) == page and transport.statuses[-2:] == [200, 304]
        assert client.jobs(limit=3).items[:2] == page.items and transport.statuses[-1] == 200  # another URL
