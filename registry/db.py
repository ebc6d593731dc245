"""Engine, sessions and migrations.

SQLite (embedded default): WAL journal, foreign keys on, a busy timeout, and write transactions
opened with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing with
"database is locked" when a read transaction tries to upgrade. Read sessions use a plain
``BEGIN`` and never block writers (WAL).

PostgreSQL (production): ``postgresql+psycopg://``; a pool sized for the API's thread pool. A pooled
connection is checked with a round trip only when it sat idle in the pool for
:data:`IDLE_PING_SECONDS` or more (:func:`_pg_setup`): a busy server sends no ping per transaction,
and after a restarted database the idle connections are found dead at checkout and replaced.

The schema is created and changed only by Alembic (:func:`upgrade`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so we can say BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("registry_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


# A connection idle in the pool this long is pinged before it is handed out (SQLAlchemy's
# ``pool_pre_ping`` pings on every checkout: a round trip per transaction under load).
IDLE_PING_SECONDS = 1.0


def _pg_setup(engine: Engine) -> None:
    """Ping a pooled connection at checkout only when it was idle for :data:`IDLE_PING_SECONDS`.

    A dead one (the database restarted, or closed idle connections) makes the pool drop every
    connection older than now and hand out a fresh one: the request goes on. A connection that
    breaks while it is in use fails its request as before, and that disconnect error also makes
    the pool drop the connections made before it (SQLAlchemy's disconnect handling)."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return  # a new connection, or one returned a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as e:
            raise exc.InvalidatePoolError(f"pooled connection is dead: {e}") from e


def create_db_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        database = u.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_setup(engine)
        return engine
    engine = create_engine(url, pool_size=20, max_overflow=20)
    _pg_setup(engine)
    return engine


class Database:
    """One engine and two session factories: ``read()`` and ``write()``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_db_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(
            self.engine.execution_options(registry_write=True), expire_on_commit=False
        )
        # PostgreSQL: statements outside a transaction (see lookup()); SQLite: a read transaction.
        self._lookup = self._read if self.is_sqlite else sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )
        # SQLite: this process's writers take turns on a lock before BEGIN IMMEDIATE (see write()).
        self._write_lock = threading.RLock() if self.is_sqlite else None

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextmanager
    def lookup(self) -> Iterator[Session]:
        """A read that writes nothing and needs no snapshot across its statements (the hot API
        reads). On PostgreSQL its statements run outside a transaction: each sees what was
        committed when it started, as it would in read()'s READ COMMITTED transaction, without the
        BEGIN and ROLLBACK round trips. On SQLite it is read() (a WAL read transaction: one snapshot)."""
        with self._lookup() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception.

        On SQLite the threads of one process queue on a lock before ``BEGIN IMMEDIATE``: the next
        writer starts as soon as the previous one commits, instead of polling the database lock
        through SQLite's busy handler, whose sleeps (up to 100 ms each) made the p99 of concurrent
        pushes seconds long. Writers in other processes still wait through the busy timeout."""
        if self._write_lock is None:
            with self._write() as session, session.begin():
                yield session
            return
        with self._write_lock, self._write() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


_upgrade_lock = threading.Lock()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creates it from empty)."""
    from alembic import command

    with _upgrade_lock:
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    with _upgrade_lock:
        command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
