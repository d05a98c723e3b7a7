"""HTTP endpoints for jobs. Each endpoint is the boundary: it owns its unit of work."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, UploadFile, status

from app.db.models import JobStatus
from app.db.session import unit_of_work
from app.errors import InvalidSpec
from app.jobs import service
from app.jobs.schemas import EventOut, EventPage, JobOut, JobPage, UploadOut
from app.jobs.spec import JobSpec

router = APIRouter(prefix="/v1", tags=["jobs"])
UPLOAD_SUFFIXES = {".txt", ".jsonl", ".parquet"}


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def create_job(spec: JobSpec, request: Request) -> JobOut:
    state = request.app.state
    with unit_of_work(state.sessions) as session:
        job = service.create_job(session, state.settings, spec)
        out = JobOut.of(job)
    state.dispatcher.dispatch(job.id)  # strictly after commit; the reaper re-sends if this fails
    return out


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    request: Request,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobPage:
    with unit_of_work(request.app.state.sessions) as session:
        jobs, next_cursor = service.list_jobs(session, status, limit, cursor)
        return JobPage(items=[JobOut.of(job) for job in jobs], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: uuid.UUID, request: Request) -> JobOut:
    with unit_of_work(request.app.state.sessions) as session:
        return JobOut.of(service.get_job(session, job_id))


@router.get("/jobs/{job_id}/events", response_model=EventPage)
def list_events(
    job_id: uuid.UUID, request: Request,
    after: Annotated[int, Query(ge=0, description="Only events with a larger id (for polling).")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> EventPage:
    with unit_of_work(request.app.state.sessions) as session:
        events = service.list_events(session, job_id, after, limit)
        return EventPage(items=[EventOut.of(e) for e in events], next_after=events[-1].id if events else after)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: uuid.UUID, request: Request) -> JobOut:
    with unit_of_work(request.app.state.sessions) as session:
        return JobOut.of(service.cancel_job(session, job_id))


@router.post("/uploads", status_code=status.HTTP_201_CREATED, response_model=UploadOut)
def upload_calibration_file(file: UploadFile, request: Request) -> UploadOut:
    """Store a calibration text file (.txt, .jsonl, .parquet); use the returned `dataset` in a job spec."""
    suffix = Path(file.filename or "").suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise InvalidSpec("file", f"calibration uploads must be one of {', '.join(sorted(UPLOAD_SUFFIXES))}")
    settings = request.app.state.settings
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    upload_id = uuid.uuid4().hex
    partial = settings.uploads_dir / f".{upload_id}{suffix}.partial"
    with partial.open("wb") as out:
        shutil.copyfileobj(file.file, out)
    size = partial.stat().st_size
    if size == 0:
        partial.unlink()
        raise InvalidSpec("file", "the uploaded file is empty")
    partial.rename(settings.uploads_dir / f"{upload_id}{suffix}")
    return UploadOut(id=upload_id, dataset=f"{service.UPLOAD_PREFIX}{upload_id}", bytes=size)
