"""Engines and the unit of work. The boundary (request dependency, worker step) owns the transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pydantic_core import from_json
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_engine(settings: Settings, **options) -> Engine:
    """options: more create_engine arguments (e.g. poolclass)."""
    url = settings.sqlalchemy_url
    # JSON columns (specs, metrics, events) are read with pydantic-core's parser: the same values as
    # json.loads, about 3x faster, and decoding them was most of a job list's time (issue 17).
    options.setdefault("json_deserializer", from_json)
    if "poolclass" not in options:
        options.setdefault("pool_size", settings.database_pool_size)
        options.setdefault("max_overflow", settings.database_max_overflow)
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL: readers never block the worker's writes
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # pre-ping: a pooled connection that died with a database restart is replaced at checkout
    return create_engine(url, pool_pre_ping=True, **options)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def read_only(engine: Engine) -> Iterator[Connection]:
    """Reads of one statement each, on a Core connection in autocommit: each SELECT is a transaction of its
    own (one snapshot per statement: not for reads that must agree with each other). The polling reads
    need neither an ORM session, whose bookkeeping added 0.1-0.2 ms of CPU to each, nor BEGIN and
    ROLLBACK, two more round trips to the database (issue 17)."""
    with engine.connect() as connection:
        yield connection.execution_options(isolation_level="AUTOCOMMIT")


class DatabaseUnreachable(Exception):
    """The database stayed unreachable for longer than a retrying caller waits."""


def lost_connection(exc: BaseException) -> bool:
    """The database went away (restart, failover, network), as opposed to an error of the statement."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:  # the connection broke under a statement
        return True
    # No connection to be had: refused or reset (no SQLSTATE), class 08 (connection exception) or
    # 57P (the server is shutting down or starting up). SQLite's errors carry no sqlstate attribute.
    sqlstate = getattr(exc.orig, "sqlstate", "")
    return isinstance(exc, OperationalError) and (sqlstate is None or sqlstate.startswith(("08", "57P")))


def retry_while_unreachable(work: Callable[[], T], seconds: float, what: str = "database call") -> T:
    """work(), repeated with backoff (0.1 s doubling to 2 s) while the database is unreachable, for up to
    `seconds`; then DatabaseUnreachable. Any other error is raised at once. `work` must be a whole unit
    of work (each try a fresh transaction on a fresh connection) that is safe to repeat: a read, or a
    conditional UPDATE that a repeat cannot apply twice."""
    deadline = time.monotonic() + seconds
    delay = 0.1
    while True:
        try:
            return work()
        except DBAPIError as exc:
            if not lost_connection(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise DatabaseUnreachable(f"{what}: database unreachable for {seconds:g} s "
                                          f"({exc.orig.__class__.__name__})") from exc
            log.warning("%s: database unreachable (%s), retrying in %.1f s", what, exc.orig.__class__.__name__,
                        delay)
        time.sleep(delay)
        delay = min(2 * delay, 2.0)


MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(settings: Settings, revision: str = "head") -> None:
    from alembic import command

    if settings.sqlalchemy_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings.sqlalchemy_url), revision)
