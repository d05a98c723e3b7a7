"""ASGI guards in front of every route: request body size, and no cross-site writes from browsers."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.settings import Settings

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
UPLOAD_PATH = "/v1/uploads"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an upload's bytes


class BodySizeLimit:
    """413 once a body passes its limit, counted as it streams (a missing or false Content-Length
    does not help). Uploads get max_upload_bytes, every other request max_request_bytes."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.request_limit = settings.max_request_bytes
        self.upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == UPLOAD_PATH else self.request_limit
        too_large = HTTPException(413, f"the request body is larger than this server accepts ({limit} bytes)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reply(scope, receive, send, 413, "too_large", too_large.detail)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large  # inside a route: rendered by the HTTP error handler
            return message

        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await _reply(scope, receive, send, 413, "too_large", exc.detail)


class CrossSiteGuard:
    """A write (POST, DELETE, ...) must come from this origin or a configured one. With auth off it must
    also carry what a cross-site HTML form cannot send without a CORS preflight: a bearer header or a
    JSON body. (With auth on the API key is that header: a request without it is 401.)"""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.allowed_origins = set(settings.cors_origins)
        self.require_header = not settings.auth_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        origin = headers.get("origin")
        same_origin = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        if origin is not None and origin != same_origin and origin not in self.allowed_origins:
            return await _reply(scope, receive, send, 403, "cross_site",
                                f"requests from origin {origin!r} are not allowed to change anything here")
        bearer = headers.get("authorization", "").lower().startswith("bearer ")
        json_body = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        if self.require_header and not (bearer or json_body):
            return await _reply(scope, receive, send, 403, "cross_site",
                                "a request that changes something needs 'Authorization: Bearer <key>' or "
                                "'Content-Type: application/json'")
        await self.app(scope, receive, send)


async def _reply(scope: Scope, receive: Receive, send: Send, status: int, code: str, detail: str) -> None:
    await JSONResponse({"error": code, "detail": detail}, status_code=status)(scope, receive, send)


def install_guards(app: FastAPI, settings: Settings) -> None:
    """Outermost first: Host check, CORS (only when origins are configured), cross-site writes, body size."""
    app.add_middleware(BodySizeLimit, settings=settings)
    app.add_middleware(CrossSiteGuard, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
