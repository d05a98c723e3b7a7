"""The polling read path's queries (issue 17): one job, a page of jobs, a job's events, as plain rows with
the JSON columns as their stored text (app/jobs/views.py makes the responses). The write side and the
ORM reads are app/jobs/repository.py.
"""

from __future__ import annotations

import functools
import uuid
from collections import namedtuple
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Select, Text, and_, bindparam, cast, func, or_, select

from app.db.models import Job, JobEvent, JobStatus

LIKE_ESCAPE = "/"


def job_columns(listed: bool) -> tuple:
    """What the read endpoints show of a job (app/jobs/views.py), JSON columns as their stored text. listed:
    as a list item, whose metrics are listed_metrics (reading metrics would fetch every per-module table)."""
    metrics = Job.listed_metrics if listed else Job.metrics
    return (Job.id, Job.tenant_id, Job.status, Job.attempt, Job.max_attempts, Job.cancel_requested_at, Job.stage,
            Job.layer, Job.layers, Job.percent, Job.memory_class, cast(Job.spec, Text).label("spec"), Job.error,
            cast(metrics, Text).label("metrics"), cast(Job.artifacts, Text).label("artifacts"), Job.created_at,
            Job.updated_at, Job.started_at, Job.finished_at)


# A job read's row as a namedtuple: a SQLAlchemy Row's attributes cost ten times as much to read, and a
# list page reads 950 of them.
JobRow = namedtuple("JobRow", [column.key for column in job_columns(listed=False)])

# The polling reads' statements are built once per shape, with bound parameters: building a 19-column
# SELECT and its cache key on every request cost more CPU than the rest of a job read (issue 17).

@functools.cache
def _job_read(by_tenant: bool) -> Select:
    query = select(*job_columns(listed=False)).where(Job.id == bindparam("job_id"))
    return query.where(Job.tenant_id == bindparam("tenant_id")) if by_tenant else query


@functools.cache
def _job_list(by_tenant: bool, by_status: bool, by_model: bool, after_cursor: bool) -> Select:
    query = (select(*job_columns(listed=True)).order_by(Job.created_at.desc(), Job.id.desc())
             .limit(bindparam("limit")))
    if by_tenant:
        query = query.where(Job.tenant_id == bindparam("tenant_id"))
    if by_status:
        query = query.where(Job.status == bindparam("status"))
    if by_model:
        model_id = func.lower(Job.spec["model"]["id"].as_string())
        query = query.where(model_id.contains(bindparam("model"), escape=LIKE_ESCAPE))
    if after_cursor:
        created_at = bindparam("created_at")
        query = query.where(or_(Job.created_at < created_at,
                                and_(Job.created_at == created_at, Job.id < bindparam("job_id"))))
    return query


@functools.cache
def _event_read(by_tenant: bool) -> Select:
    query = (
        select(JobEvent.id, JobEvent.attempt, JobEvent.created_at, JobEvent.stage, JobEvent.level, JobEvent.message,
               JobEvent.data)
        .select_from(Job).outerjoin(JobEvent, and_(JobEvent.job_id == Job.id, JobEvent.id > bindparam("after")))
        .where(Job.id == bindparam("job_id")).order_by(JobEvent.id).limit(bindparam("limit"))
    )
    return query.where(Job.tenant_id == bindparam("tenant_id")) if by_tenant else query


def _like_escaped(text: str) -> str:
    """text matched literally inside a LIKE pattern with ESCAPE LIKE_ESCAPE (what autoescape=True does)."""
    return text.replace(LIKE_ESCAPE, 2 * LIKE_ESCAPE).replace("%", LIKE_ESCAPE + "%").replace("_", LIKE_ESCAPE + "_")


def job_row(connection: Connection, job_id: uuid.UUID, tenant_id: str | None = None) -> JobRow | None:
    """repository.get_job as job_columns(listed=False), without an ORM object."""
    params = {"job_id": job_id} if tenant_id is None else {"job_id": job_id, "tenant_id": tenant_id}
    row = connection.execute(_job_read(tenant_id is not None), params).one_or_none()
    return None if row is None else JobRow._make(row)


def list_jobs(
    connection: Connection, status: JobStatus | None, limit: int, before: tuple[datetime, uuid.UUID] | None,
    tenant_id: str | None = None, model: str = "",
) -> list[JobRow]:
    """Newest first, as rows of job_columns(listed=True); `before` is the (created_at, id) of the last job
    of the previous page; model: part of the model id, any case ("" = any)."""
    params: dict[str, Any] = {"limit": limit}
    if tenant_id is not None:
        params["tenant_id"] = tenant_id
    if status is not None:
        params["status"] = status
    if model:
        params["model"] = _like_escaped(model.lower())
    if before is not None:
        params["created_at"], params["job_id"] = before
    query = _job_list(tenant_id is not None, status is not None, bool(model), before is not None)
    return [JobRow._make(row) for row in connection.execute(query, params)]


def event_rows(connection: Connection, job_id: uuid.UUID, after: int, limit: int,
               tenant_id: str | None = None) -> list[Row] | None:
    """repository.list_events as rows of EventOut's fields, in one query with the job's check: None when the job is
    not there (or not the tenant's)."""
    params: dict[str, Any] = {"job_id": job_id, "after": after, "limit": limit}
    if tenant_id is not None:
        params["tenant_id"] = tenant_id
    rows = list(connection.execute(_event_read(tenant_id is not None), params))
    if not rows:
        return None
    return [] if rows[0].id is None else rows
