"""Download a finished job's local artifact: list its files, stream one. Tenant-checked like every job
endpoint (another tenant's job is 404)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.auth import Caller, authenticate
from app.db.models import Job
from app.db.session import unit_of_work
from app.jobs import artifacts, service
from app.jobs.schemas import ERRORS, ArtifactFileOut, ArtifactListOut

router = APIRouter(prefix="/v1", tags=["artifacts"], responses=ERRORS)
CallerDep = Annotated[Caller, Depends(authenticate)]
CHUNK = 1 << 20


def _job(request: Request, job_id: uuid.UUID, caller: Caller) -> Job:
    with unit_of_work(request.app.state.sessions) as session:
        job = service.get_job(session, job_id, caller)
        return job


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactListOut)
def list_artifact_files(job_id: uuid.UUID, request: Request, caller: CallerDep) -> ArtifactListOut:
    """The files of a succeeded job's local artifact, with sizes and sha256. 409 `artifact_not_local`
    (with its `uri`) when the artifact went to S3 or the Hub."""
    uri, files = artifacts.list_files(request.app.state.settings, _job(request, job_id, caller))
    return ArtifactListOut(uri=uri, files=[ArtifactFileOut(path=f.path, bytes=f.bytes, sha256=f.sha256)
                                           for f in files])


def _chunks(fd: int) -> Iterator[bytes]:
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(CHUNK):
            yield block


@router.get("/jobs/{job_id}/artifacts/{path:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}})
def download_artifact_file(job_id: uuid.UUID, path: str, request: Request, caller: CallerDep) -> StreamingResponse:
    """One file the listing names (its `path`), streamed."""
    fd, size = artifacts.open_file(request.app.state.settings, _job(request, job_id, caller), path)
    return StreamingResponse(_chunks(fd), media_type="application/octet-stream",
                             headers={"Content-Length": str(size)})
