"""One error hierarchy, one handler: every error renders as {"error": code, "detail": message}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db.session import lost_connection


class SqueezeError(Exception):
    code = "error"
    status_code = 500

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class InvalidSpec(SqueezeError):
    code = "invalid_spec"
    status_code = 422

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field


class NotSupportedYet(InvalidSpec):
    code = "not_supported_yet"


class Unauthorized(SqueezeError):
    code = "unauthorized"
    status_code = 401


class TooLarge(SqueezeError):
    code = "too_large"
    status_code = 413


class TooManyQueued(SqueezeError):
    code = "too_many_queued"
    status_code = 429

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail)
        self.retry_after = retry_after


class IdempotencyMismatch(SqueezeError):
    code = "idempotency_key_reused"
    status_code = 422


class JobNotFound(SqueezeError):
    code = "not_found"
    status_code = 404


class UploadNotFound(JobNotFound):
    pass


class JobStateConflict(SqueezeError):
    code = "conflict"
    status_code = 409


class ArtifactNotFound(JobNotFound):
    pass


class ArtifactElsewhere(JobStateConflict):
    """The job's artifact is in S3 or on the Hub: the API names its URI instead of proxying it."""

    code = "artifact_not_local"

    def __init__(self, detail: str, uri: str):
        super().__init__(detail)
        self.uri = uri


class BadCursor(SqueezeError):
    code = "bad_cursor"
    status_code = 400


class ServiceUnavailable(SqueezeError):
    code = "unavailable"
    status_code = 503


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SqueezeError)
    async def _domain(_: Request, exc: SqueezeError) -> JSONResponse:
        body = {"error": exc.code, "detail": exc.detail}
        headers = {}
        if isinstance(exc, InvalidSpec):
            body["fields"] = [exc.field]
        elif isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        elif isinstance(exc, TooManyQueued):
            headers["Retry-After"] = str(exc.retry_after)
        elif isinstance(exc, ArtifactElsewhere):
            body["uri"] = exc.uri
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        fields = []
        for err in exc.errors():
            loc = _location(tuple(err.get("loc", ())))
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            fields.append(loc)
            problems.append(f"{loc}: {msg}")
        return JSONResponse(
            {"error": "invalid_request", "detail": "; ".join(problems), "fields": fields}, status_code=422
        )

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        if not lost_connection(exc):
            raise exc  # a bug, not an outage: the server's own handler logs it and answers 500
        return JSONResponse({"error": ServiceUnavailable.code, "detail": "database unreachable; try again shortly"},
                            status_code=ServiceUnavailable.status_code, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                413: "too_large"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)
