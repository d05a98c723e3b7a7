"""HTTP endpoints for jobs and uploads. Each endpoint is the boundary: it owns its unit of work.

Every endpoint acts for the caller (app/auth.py): another tenant's job or upload is 404, as if it
did not exist.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response, UploadFile, status

from app.auth import Caller, authenticate
from app.db.models import JobStatus
from app.db.session import read_only, unit_of_work
from app.jobs import routing, service, uploads, views
from app.jobs.schemas import ERRORS, EventPage, JobOut, JobPage, UploadOut, UploadPage
from app.jobs.spec import JobSpec

router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)
CallerDep = Annotated[Caller, Depends(authenticate)]
# Event ids are 64-bit (BigInteger): a larger `after` is a 422, not a database error.
MAX_EVENT_ID = 2**63 - 1
NOT_MODIFIED = {304: {"description": "Unchanged since the ETag sent in If-None-Match (no body)"}}


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobOut,
             responses={200: {"model": JobOut, "description": "The job an earlier request with this Idempotency-Key made"}})
def create_job(
    spec: JobSpec, request: Request, response: Response, caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255, description=(
        "Retries with the same key and body return the first job (200); the same key with another body is 422. "
        "Keys are kept as long as the job."))] = None,
) -> JobOut:
    state = request.app.state
    route = routing.route_job(state.settings, spec)  # may ask the Hub for config.json: before the transaction
    with unit_of_work(state.sessions) as session:
        job, created = service.create_job(session, state.settings, spec, caller, idempotency_key, route)
        out = JobOut.of(job)
    if created:
        state.dispatcher.dispatch(job.id, job.queue)  # strictly after commit; the reaper re-sends if this fails
    else:
        response.status_code = status.HTTP_200_OK
    return out


@router.get("/jobs", response_model=JobPage, responses=NOT_MODIFIED)
def list_jobs(
    request: Request, caller: CallerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    with read_only(request.app.state.engine) as connection:
        jobs, next_cursor = service.list_jobs(connection, caller, status, limit, cursor)
    return views.conditional(request, views.etag(jobs, next_cursor), lambda: views.page_body(jobs, next_cursor))


@router.get("/jobs/{job_id}", response_model=JobOut, responses=NOT_MODIFIED)
def get_job(job_id: uuid.UUID, request: Request, caller: CallerDep) -> Response:
    with read_only(request.app.state.engine) as connection:
        job = service.job_row(connection, job_id, caller)
    return views.conditional(request, views.etag([job]), lambda: views.job_body(job))


@router.get("/jobs/{job_id}/events", response_model=EventPage)
def list_events(
    job_id: uuid.UUID, request: Request, caller: CallerDep,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Only events with a larger id (for polling).")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Response:
    with read_only(request.app.state.engine) as connection:
        events = service.list_events(connection, job_id, caller, after, limit)
    return Response(views.event_body(events, events[-1].id if events else after), media_type="application/json")


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: uuid.UUID, request: Request, caller: CallerDep) -> JobOut:
    with unit_of_work(request.app.state.sessions) as session:
        return JobOut.of(service.cancel_job(session, job_id, caller))


@router.post("/uploads", status_code=status.HTTP_201_CREATED, response_model=UploadOut, tags=["uploads"])
def upload_calibration_file(file: UploadFile, request: Request, caller: CallerDep) -> UploadOut:
    """Store a calibration text file (.txt, .jsonl, .parquet); use the returned `dataset` in a job spec."""
    state = request.app.state
    with unit_of_work(state.sessions) as session:
        return UploadOut.of(uploads.store(session, state.settings, caller, file.filename or "", file.file),
                            state.settings)


@router.get("/uploads", response_model=UploadPage, tags=["uploads"])
def list_uploads(request: Request, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> UploadPage:
    state = request.app.state
    with unit_of_work(state.sessions) as session:
        return UploadPage(items=[UploadOut.of(u, state.settings) for u in uploads.list_for(session, caller, limit)])


@router.get("/uploads/{upload_id}", response_model=UploadOut, tags=["uploads"])
def get_upload(upload_id: uuid.UUID, request: Request, caller: CallerDep) -> UploadOut:
    state = request.app.state
    with unit_of_work(state.sessions) as session:
        return UploadOut.of(uploads.get(session, caller, upload_id.hex), state.settings)


@router.delete("/uploads/{upload_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["uploads"])
def delete_upload(upload_id: uuid.UUID, request: Request, caller: CallerDep) -> Response:
    state = request.app.state
    with unit_of_work(state.sessions) as session:
        uploads.remove(session, state.settings, uploads.get(session, caller, upload_id.hex))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
