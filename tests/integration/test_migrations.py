"""Alembic is the only way the schema is made: upgrade from empty, downgrade to base, on PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db.base import Base
from app.db.session import alembic_config
from tests.services import fresh_postgres_database


def test_upgrade_from_empty_and_downgrade_to_base_on_postgres():
    with fresh_postgres_database() as url:
        config = alembic_config(url)
        command.upgrade(config, "head")
        engine = create_engine(url)
        try:
            assert {"jobs", "job_events", "alembic_version"} <= set(inspect(engine).get_table_names())
            with engine.connect() as conn:  # the migration builds exactly what the models declare
                diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == []
            command.downgrade(config, "base")
            assert set(inspect(engine).get_table_names()) == {"alembic_version"}
            command.upgrade(config, "head")  # and back up again
            assert "jobs" in inspect(engine).get_table_names()
        finally:
            engine.dispose()


def test_upgrade_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'squeeze.db'}"
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def _job_made_before_tenants_gets_the_default_tenant(url: str) -> None:
    import uuid

    from sqlalchemy import text

    config = alembic_config(url)
    command.upgrade(config, "0002")
    engine = create_engine(url)
    job_id = uuid.uuid4()
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, status, spec, attempt, max_attempts, stage, percent, created_at, updated_at) "
                "VALUES (:id, 'queued', '{}', 0, 3, 'queued', 0, :now, :now)"),
                {"id": job_id.hex if url.startswith("sqlite") else str(job_id), "now": "2026-11-30 12:00:00+00:00"})
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT tenant_id FROM jobs")).scalar_one() == "default"
            assert conn.execute(text("SELECT id FROM tenants")).scalars().all() == ["default"]
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        command.downgrade(config, "0002")
        assert "tenant_id" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def test_existing_jobs_belong_to_the_default_tenant_on_postgres():
    with fresh_postgres_database() as url:
        _job_made_before_tenants_gets_the_default_tenant(url)


def test_existing_jobs_belong_to_the_default_tenant_on_sqlite(tmp_path):
    _job_made_before_tenants_gets_the_default_tenant(f"sqlite:///{tmp_path / 'squeeze.db'}")


def _finished_jobs_get_their_listed_metrics(url: str) -> None:
    import json
    import uuid

    from sqlalchemy import text

    config = alembic_config(url)
    command.upgrade(config, "0005")
    engine = create_engine(url)
    metrics = {"perplexity_after": 12.5, "compression": {"modules": 1, "per_module": {"a": {"rank": 4}}}}
    rows = {uuid.uuid4(): json.dumps(metrics), uuid.uuid4(): "null", uuid.uuid4(): json.dumps({"perplexity_after": 3})}
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, created_at) VALUES ('t', :now)"),
                         {"now": "2026-11-30 12:00:00+00:00"})
            for job_id, stored in rows.items():
                conn.execute(text(
                    "INSERT INTO jobs (id, tenant_id, status, spec, attempt, max_attempts, stage, percent, metrics, "
                    "created_at, updated_at) VALUES (:id, 't', 'succeeded', '{}', 1, 3, 'done', 100, :metrics, :now, :now)"),
                    {"id": job_id.hex if url.startswith("sqlite") else str(job_id), "metrics": stored,
                     "now": "2026-11-30 12:00:00+00:00"})
        command.upgrade(config, "head")
        with engine.connect() as conn:
            listed = {json.dumps(json.loads(m)) if isinstance(m, str) else json.dumps(m) for m in
                      conn.execute(text("SELECT listed_metrics FROM jobs")).scalars()}
        assert listed == {json.dumps({"perplexity_after": 12.5, "compression": {"modules": 1}}), "null",
                          json.dumps({"perplexity_after": 3})}
        command.downgrade(config, "0005")
        assert "listed_metrics" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def test_finished_jobs_get_their_listed_metrics_on_postgres():
    with fresh_postgres_database() as url:
        _finished_jobs_get_their_listed_metrics(url)


def test_finished_jobs_get_their_listed_metrics_on_sqlite(tmp_path):
    _finished_jobs_get_their_listed_metrics(f"sqlite:///{tmp_path / 'squeeze.db'}")
