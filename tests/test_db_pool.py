"""The PostgreSQL connection pool against a real server: a pooled connection is pinged only after
it sat idle (no round trip per transaction under load), and connections killed by the server (a
restarted database) are replaced at checkout instead of failing requests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from registry import db as registry_db
from registry.db import Database

from .conftest import PG_ADMIN_URL, need_postgres, new_pg_database


@pytest.fixture
def pg(pg_databases: list[str]) -> Iterator[Database]:
    need_postgres()
    database = Database(new_pg_database(pg_databases))
    try:
        yield database
    finally:
        database.dispose()


def _pid(database: Database) -> int:
    with database.read() as s:
        return int(s.execute(text("select pg_backend_pid()")).scalar_one())


def _kill_backends(database: Database) -> int:
    name = database.engine.url.database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            return int(c.execute(text("select count(pg_terminate_backend(pid)) from pg_stat_activity "
                                      "where datname = :d and pid <> pg_backend_pid()"), {"d": name}).scalar_one())
    finally:
        admin.dispose()


def _count_pings(database: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pings: list[int] = []
    real = database.engine.dialect.do_ping

    def counting(dbapi_conn):  # type: ignore[no-untyped-def]
        pings.append(1)
        return real(dbapi_conn)

    monkeypatch.setattr(database.engine.dialect, "do_ping", counting)
    return pings


def test_busy_pool_sends_no_pings(pg: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_db, "IDLE_PING_SECONDS", 3600.0)  # never idle long enough
    pings = _count_pings(pg, monkeypatch)
    for _ in range(20):
        _pid(pg)
        with pg.write() as s:
            s.execute(text("select 1"))
    assert pings == []


def test_idle_connection_killed_by_the_server_is_replaced(pg: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_db, "IDLE_PING_SECONDS", 0.0)  # every reused connection counts as idle
    pings = _count_pings(pg, monkeypatch)
    first = _pid(pg)
    assert _kill_backends(pg) >= 1  # what a restarted database does to the pool
    second = _pid(pg)  # pinged at checkout, found dead, replaced: the request goes on
    assert second != first and pings
    with pg.write() as s:
        assert s.execute(text("select 1")).scalar_one() == 1


def test_connection_killed_while_fresh_fails_once_then_pool_recovers(pg: Database,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the idle window nothing is pinged: the first use of a dead connection fails, and
    that disconnect makes the pool drop every older connection, so the next request works."""
    monkeypatch.setattr(registry_db, "IDLE_PING_SECONDS", 3600.0)
    with pg.read() as a, pg.read() as b:  # two pooled connections
        a.execute(text("select 1"))
        b.execute(text("select 1"))
    _kill_backends(pg)
    with pytest.raises(Exception, match="(?i)terminat|closed|connection"):
        _pid(pg)
    assert _pid(pg) > 0
    assert _pid(pg) > 0  # the other pooled connection was dropped too, not handed out dead
