"""The dashboard: its pages and static files, and the read-only queries only it needs.

The pages are one static HTML file whose script picks the view from the path, so every view has
its own URL (`/jobs/<id>` can be opened directly). Job data come from the public API; this module
adds a model search over the job list and a queue/workers summary, both scoped to the caller's tenant.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from sqlalchemy import func, or_, select

from app.db.base import utcnow
from app.db.models import Job, JobStatus
from app.db.session import read_only, unit_of_work
from app.jobs import service, views
from app.jobs.router import NOT_MODIFIED, CallerDep
from app.jobs.schemas import ERRORS, JobPage

HERE = Path(__file__).parent
STATIC = HERE / "static"
PAGE = HERE / "index.html"
WORKERS_SEEN_WINDOW = timedelta(minutes=10)
# Scripts and styles come only from this server, nothing inline; job text is inserted as text (app.js).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

pages = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/v1", tags=["dashboard"], responses=ERRORS)


def _page() -> FileResponse:
    return FileResponse(PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


@pages.get("/")
def dashboard() -> FileResponse:
    return _page()


@pages.get("/jobs/{job_id}")
def job_page(job_id: uuid.UUID) -> FileResponse:
    return _page()


@pages.get("/submit")
def submit_page() -> FileResponse:
    return _page()


@pages.get("/compare")
def compare_page() -> FileResponse:
    return _page()


class Stats(BaseModel):
    queued: int
    running: int
    workers_recent: list[str]
    workers_window_seconds: int


@api.get("/stats", response_model=Stats)
def stats(request: Request, caller: CallerDep) -> Stats:
    """Queued and running jobs, and the worker hosts that ran or renewed one of them in the last 10
    minutes, for the caller's tenant (an admin: every tenant). A lease owner is host:pid:nonce and each
    job runs in a fresh pool process, so hosts, not owners, are what "workers" means here."""
    scope = [] if caller.admin else [Job.tenant_id == caller.tenant_id]
    since = utcnow() - WORKERS_SEEN_WINDOW
    with unit_of_work(request.app.state.sessions) as session:
        counts = dict(session.execute(
            select(Job.status, func.count()).where(Job.status.in_([JobStatus.queued, JobStatus.running]), *scope)
            .group_by(Job.status)).all())
        owners = session.scalars(
            select(Job.lease_owner).distinct().where(
                Job.lease_owner.is_not(None), *scope,
                or_(Job.status == JobStatus.running, Job.updated_at >= since))
            .order_by(Job.lease_owner)).all()
    hosts = sorted({owner.split(":", 1)[0] for owner in owners})
    return Stats(queued=counts.get(JobStatus.queued, 0), running=counts.get(JobStatus.running, 0),
                 workers_recent=hosts, workers_window_seconds=int(WORKERS_SEEN_WINDOW.total_seconds()))


@api.get("/job-search", response_model=JobPage, responses=NOT_MODIFIED)
def search_jobs(
    request: Request, caller: CallerDep,
    model: Annotated[str, Query(max_length=512, description="Part of the model id, any case.")] = "",
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """GET /v1/jobs with a model filter: newest first, the same cursors and ETags."""
    with read_only(request.app.state.engine) as connection:
        jobs, next_cursor = service.list_jobs(connection, caller, status, limit, cursor, model)
    return views.conditional(request, views.etag(jobs, next_cursor), lambda: views.page_body(jobs, next_cursor))


def install_dashboard(app: FastAPI) -> None:
    app.include_router(pages)
    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC), name="dashboard-static")
