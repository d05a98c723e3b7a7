"""retry_while_unreachable: a worker's write outlives a database restart, and only that."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from app.db.session import DatabaseUnreachable, lost_connection, retry_while_unreachable


class PgError(Exception):
    """Stands in for a psycopg error: the driver's SQLSTATE, None when no server answered."""

    def __init__(self, sqlstate: str | None):
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def refused() -> OperationalError:
    return OperationalError("SELECT 1", {}, PgError(None))


def failing(*errors):
    """A unit of work that raises `errors` one per call, then returns 'written'."""
    calls = []

    def work():
        calls.append(time.monotonic())
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "written"
    return work, calls


@pytest.mark.parametrize("exc, lost", [
    (refused(), True),  # connection refused: no SQLSTATE
    (OperationalError("x", {}, PgError("57P01")), True),  # admin shutdown (a restart)
    (OperationalError("x", {}, PgError("57P03")), True),  # the server is starting up
    (OperationalError("x", {}, PgError("08006")), True),  # connection failure
    (DBAPIError("x", {}, PgError("XX000"), connection_invalidated=True), True),  # broke under a statement
    (OperationalError("x", {}, PgError("40P01")), False),  # deadlock: the statement's own trouble
    (OperationalError("x", {}, sqlite3.OperationalError("database is locked")), False),
    (IntegrityError("x", {}, PgError("23505")), False),
    (ValueError("not a database error"), False),
])
def test_what_counts_as_a_lost_connection(exc, lost):
    assert lost_connection(exc) is lost


def test_a_write_is_retried_until_the_database_answers():
    work, calls = failing(refused(), OperationalError("x", {}, PgError("57P03")))
    assert retry_while_unreachable(work, seconds=10) == "written"
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.1 and calls[2] - calls[1] >= 0.2  # backoff doubles


@pytest.mark.parametrize("error", [IntegrityError("x", {}, PgError("23505")),
                                   OperationalError("x", {}, PgError("40P01")), KeyError("job")])
def test_other_errors_are_raised_at_once(error):
    work, calls = failing(error)
    with pytest.raises(type(error)):
        retry_while_unreachable(work, seconds=10)
    assert len(calls) == 1


def test_gives_up_after_the_bound():
    work, calls = failing(*[refused()] * 100)
    started = time.monotonic()
    with pytest.raises(DatabaseUnreachable, match="unreachable for 1 s") as raised:
        retry_while_unreachable(work, seconds=1)
    assert 0.5 <= time.monotonic() - started <= 1.5
    assert 3 <= len(calls) < 10 and isinstance(raised.value.__cause__, OperationalError)
