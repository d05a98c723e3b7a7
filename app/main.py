"""The FastAPI application."""

from __future__ import annotations

from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI, Request
from sqlalchemy import text

from app.auth import KeyCache
from app.dashboard.router import install_dashboard
from app.db.session import make_engine, make_sessionmaker, upgrade_database
from app.errors import ServiceUnavailable, install_error_handlers
from app.http_guards import install_guards
from app.jobs.artifacts_router import router as artifacts_router
from app.jobs.router import router as jobs_router
from app.queue import Dispatcher
from app.reaper import Reaper
from app.settings import Settings
from app.webhooks.router import router as webhooks_router


def create_app(settings: Settings | None = None, *, run_reaper: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.embedded:
            upgrade_database(settings)  # embedded mode makes its own schema; distributed runs alembic
        # Sync endpoints run in anyio's thread pool (40 threads by default): no more at once than there are
        # pooled connections, or the rest would wait for one while holding a thread and the GIL's attention.
        to_thread.current_default_thread_limiter().total_tokens = settings.database_pool_size
        engine = make_engine(settings)
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessions = make_sessionmaker(engine)
        app.state.key_cache = KeyCache(settings.auth_cache_seconds)
        app.state.dispatcher = Dispatcher(settings, app.state.sessions)
        reaper = Reaper(settings, app.state.sessions, app.state.dispatcher) if run_reaper else None
        if reaper:
            reaper.start()
        try:
            yield
        finally:
            if reaper:
                reaper.stop()
            app.state.dispatcher.close()
            engine.dispose()

    app = FastAPI(
        title="Squeeze",
        description="LLM compression as a service: quantization, pruning and EoRA compensation.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_guards(app, settings)
    app.include_router(jobs_router)
    app.include_router(artifacts_router)
    app.include_router(webhooks_router)
    install_dashboard(app)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(request: Request) -> dict:
        state = request.app.state
        try:
            with state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise ServiceUnavailable(f"database unreachable: {exc.__class__.__name__}") from exc
        try:
            state.dispatcher.ping()
        except Exception as exc:
            raise ServiceUnavailable(f"broker unreachable: {exc.__class__.__name__}") from exc
        return {"status": "ready", "database": "ok", "broker": "ok"}

    return app
