"""A typed Python client for the Squeeze REST API (the `squeeze submit/status/jobs/cancel/logs/download`
commands use it).

    client = SqueezeClient("http://127.0.0.1:8000", api_key="sqz_...")
    job = client.submit({"model": {"id": "HuggingFaceTB/SmolLM2-135M"}, "quantization": {"bits": 4}})
    job = client.wait(job.id)
    client.download(job.id, Path("out"))

Every call returns the API's own response models (app.jobs.schemas). A refused request raises
ApiError (status, code, detail); a server that cannot be reached raises Unreachable.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx

from app.db.models import JobStatus
from app.jobs.schemas import ArtifactListOut, EventOut, EventPage, JobOut, JobPage
from app.webhooks.router import DeliveryPage, SecretOut


class ClientError(Exception):
    """Anything that kept a client call from its answer."""


class Unreachable(ClientError):
    """No answer: connection refused, timeout, DNS, or a 5xx from the server."""


class ApiError(ClientError):
    """The server refused the request (HTTP 4xx) and said why."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.body = status, code, detail, body or {}


class ChecksumMismatch(ClientError):
    """A downloaded file's bytes do not match the sha256 the server listed."""


class SqueezeClient:
    # How many answers the client keeps for conditional GETs (a poll re-reads the same few).
    KEPT_ANSWERS = 64

    def __init__(self, server: str, api_key: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self._kept: dict[str, tuple[str, bytes]] = {}  # request URL: (its ETag, the body that came with it)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SqueezeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"{self._http.base_url}: {exc.__class__.__name__}: {exc}") from exc
        _raise_for(response)
        return response

    def _get_kept(self, path: str, params: dict[str, Any] | None = None) -> bytes:
        """GET with If-None-Match when an earlier answer to the same URL is kept: an unchanged job or page
        is a 304 without a body (almost no work for the server), answered here from the kept body."""
        url = str(self._http.build_request("GET", path, params=params).url)
        kept = self._kept.get(url)
        headers = {"If-None-Match": kept[0]} if kept else {}
        response = self._request("GET", path, params=params, headers=headers)
        if response.status_code == 304 and kept:
            return kept[1]
        self._kept.pop(url, None)
        if "etag" in response.headers:
            if len(self._kept) >= self.KEPT_ANSWERS:
                del self._kept[next(iter(self._kept))]  # the oldest
            self._kept[url] = (response.headers["etag"], response.content)
        return response.content

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> JobOut:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobOut.model_validate(self._request("POST", "/v1/jobs", json=spec, headers=headers).json())

    def job(self, job_id: uuid.UUID | str) -> JobOut:
        return JobOut.model_validate_json(self._get_kept(f"/v1/jobs/{job_id}"))

    def jobs(self, *, status: JobStatus | str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = JobStatus(status).value
        if cursor is not None:
            params["cursor"] = cursor
        return JobPage.model_validate_json(self._get_kept("/v1/jobs", params))

    def cancel(self, job_id: uuid.UUID | str) -> JobOut:
        return JobOut.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def events(self, job_id: uuid.UUID | str, *, after: int = 0, limit: int = 500) -> EventPage:
        page = self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})
        return EventPage.model_validate(page.json())

    def follow(self, job_id: uuid.UUID | str, *, poll_seconds: float = 1.0,
               on_job: Callable[[JobOut], None] | None = None) -> Iterator[EventOut]:
        """Every event of the job as it is written, ending once the job has ended and its last event
        was read. on_job sees the job after each poll (for a progress bar)."""
        after = 0
        while True:
            job = self.job(job_id)  # read before the events: an event written before the end is not missed
            if on_job is not None:
                on_job(job)
            while True:
                page = self.events(job_id, after=after)
                yield from page.items
                after = page.next_after
                if not page.items:
                    break
            if job.status.terminal:
                return
            time.sleep(poll_seconds)

    def wait(self, job_id: uuid.UUID | str, *, poll_seconds: float = 1.0, timeout: float | None = None,
             on_job: Callable[[JobOut], None] | None = None) -> JobOut:
        """Poll until the job ends; returns it. TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_job is not None:
                on_job(job)
            if job.status.terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout:g} s")
            time.sleep(poll_seconds)

    def webhooks(self, job_id: uuid.UUID | str) -> DeliveryPage:
        return DeliveryPage.model_validate(self._request("GET", f"/v1/jobs/{job_id}/webhooks").json())

    def webhook_secret(self, *, rotate: bool = False) -> str:
        """The secret that signs this tenant's webhooks; rotate=True replaces it first."""
        response = self._request("POST", "/v1/webhook-secret/rotate") if rotate else \
            self._request("GET", "/v1/webhook-secret")
        return SecretOut.model_validate(response.json()).secret

    def artifacts(self, job_id: uuid.UUID | str) -> ArtifactListOut:
        return ArtifactListOut.model_validate(self._request("GET", f"/v1/jobs/{job_id}/artifacts").json())

    def download(self, job_id: uuid.UUID | str, folder: Path,
                 on_file: Callable[[str, int], None] | None = None) -> list[Path]:
        """Every file of a succeeded job's local artifact into folder (made when missing), each checked
        against its listed sha256; returns the paths written. on_file(path, bytes) after each file."""
        listing = self.artifacts(job_id)
        folder = Path(folder)
        written = []
        for entry in listing.files:
            relative = PurePosixPath(entry.path)
            if relative.is_absolute() or ".." in relative.parts:  # never write outside folder
                raise ClientError(f"the server listed a file outside the artifact: {entry.path!r}")
            target = folder.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fetch(f"/v1/jobs/{job_id}/artifacts/{quote(entry.path)}", target, entry.sha256)
            written.append(target)
            if on_file is not None:
                on_file(entry.path, entry.bytes)
        return written

    def _fetch(self, path: str, target: Path, sha256: str) -> None:
        digest = hashlib.sha256()
        partial = target.with_name(target.name + ".part")
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                with partial.open("wb") as out:
                    for block in response.iter_bytes(1 << 20):
                        digest.update(block)
                        out.write(block)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise Unreachable(f"{self._http.base_url}: {exc.__class__.__name__}: {exc}") from exc
        if digest.hexdigest() != sha256:
            partial.unlink()
            raise ChecksumMismatch(f"{target.name}: sha256 {digest.hexdigest()} but the server listed {sha256}")
        partial.replace(target)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    code, detail = str(body.get("error", "http_error")), str(body.get("detail", response.text[:500]))
    if response.status_code >= 500:
        raise Unreachable(f"{response.status_code} {code}: {detail}")
    raise ApiError(response.status_code, code, detail, body)
