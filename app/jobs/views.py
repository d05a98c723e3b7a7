"""The read endpoints' responses, built from selected columns (issue 17): no ORM objects and no response
models on the polling path, and a conditional GET (ETag, If-None-Match -> 304) for a job and a job list.

The bodies are the bytes JobOut / JobPage / EventPage.model_dump_json() give (tests/integration/test_read_views.py
compares them): pydantic-core's to_json serialises these dicts with the same rules. A job's JSON columns
come as their stored text (reads.job_columns) and are parsed only when a body is sent; its ETag is
a hash of the row as read, so an unchanged job or page is answered without parsing or serialising.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request, Response
from pydantic_core import from_json, to_json

from app.jobs.schemas import JobPage, job_fields

# A change to what the API returns for the same rows (a new field) must change every ETag: the hash
# starts from the response schema.
_SCHEMA = json.dumps(JobPage.model_json_schema(), sort_keys=True).encode()
# Browsers keep the body and ask again with If-None-Match every time (fetch's HTTP cache).
CACHE_CONTROL = "private, no-cache"


def _parsed(text: str | None) -> Any:
    return None if text is None else from_json(text)


def job_item(row: Any) -> dict[str, Any]:
    return job_fields(row, _parsed(row.spec), _parsed(row.metrics), _parsed(row.artifacts))


def job_body(row: Any) -> bytes:
    return to_json(job_item(row))


def page_body(rows: Sequence[Any], next_cursor: str | None) -> bytes:
    return to_json({"items": [job_item(row) for row in rows], "next_cursor": next_cursor})


def event_body(rows: Sequence[Any], next_after: int) -> bytes:
    return to_json({"items": [row._asdict() for row in rows], "next_after": next_after})


def etag(rows: Sequence[Any], *extra: str | None) -> str:
    """A weak tag of the rows as read (every column the body is made of) and of what else the body holds.
    pickle, because it is the fastest deterministic serialisation of these values (a third of repr's time
    for a page); another Python or code version may give other tags for the same rows: a 200, not a 304."""
    values = pickle.dumps(([tuple(row) for row in rows], extra), protocol=5)
    return f'W/"{hashlib.sha1(_SCHEMA + values, usedforsecurity=False).hexdigest()}"'


def _matches(request: Request, tag: str) -> bool:
    """If-None-Match, compared weakly (RFC 9110 13.1.2): any listed tag, or *."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    listed = {candidate.strip().removeprefix("W/") for candidate in header.split(",")}
    return "*" in listed or tag.removeprefix("W/") in listed


def conditional(request: Request, tag: str, body: Callable[[], bytes]) -> Response:
    """304 without a body when the client holds this tag, else the body (made only then) with the tag."""
    headers = {"ETag": tag, "Cache-Control": CACHE_CONTROL}
    if _matches(request, tag):
        return Response(status_code=304, headers=headers)
    return Response(body(), media_type="application/json", headers=headers)
