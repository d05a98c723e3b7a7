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
