"""Fixtures of the in-process service tests (``tests/services``): a real registry context per test,
no HTTP server, no subprocess, no broker.

``reg`` (an :class:`~tests.services.inproc.InProcess`) runs every test twice:

- ``sqlite``: a fresh SQLite database in the test's ``tmp_path``, with the local blob store and
  staging area beside it. Running the migrations from empty for every test would cost a third of
  the run, so they run once per session, into a template, by ``RegistryContext.open(settings,
  migrate=True)`` — the call the API makes at start-up — and each test gets a copy of that file;
- ``postgres`` (marked ``postgres``): one fresh PostgreSQL database per test module (as
  ``new_pg_database`` makes them for the server tests), migrated once by the same
  ``registry.db.upgrade``; before each test every row but the migration state is deleted (id
  sequences restarted), so each test still starts from an empty registry. Blob store and staging
  are the test's own directories.

Either way the test's context is ``RegistryContext.open(settings)`` on a database at head, with
``job_sender`` recording job ids instead of publishing them (see ``inproc.py``).

``pytest tests/services -m "not postgres"`` runs the SQLite half alone. MLflow (the provenance of
basis and transfer jobs) uses one file store per session (see ``mlflow_uri``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine

from registry.config import Settings
from registry.db import upgrade
from registry.services.context import RegistryContext

from ..conftest import new_pg_database
from .inproc import InProcess


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "services: in-process tests of the service layer (no HTTP, no subprocess)")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow store for the whole session, file-based: a SQLite store runs MLflow's own
    migrations on first use (seconds), a file store starts at once. (The servers of the HTTP
    tests keep the default SQLite store.)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        yield (tmp_path_factory.mktemp("mlflow") / "mlruns").as_uri()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> Path:
    """An empty registry database migrated to head the way the server does it, to be copied."""
    home = tmp_path_factory.mktemp("sqlite-template")
    db = home / "registry.db"
    RegistryContext.open(service_settings(home, f"sqlite:///{db}", mlflow_uri), migrate=True).close()
    assert not db.with_name(db.name + "-wal").exists()  # checkpointed on close: one file holds it all
    return db


@dataclass
class PgModuleDatabase:
    """A fresh PostgreSQL database for one test module, migrated to head; :meth:`empty` clears it."""

    url: str
    tables: list[str]  # children before parents

    def empty(self) -> None:
        """Delete every row (but the migration state) and restart the id sequences. DELETE, not
        TRUNCATE: on tables this small it is twenty times faster."""
        engine = create_engine(self.url)
        try:
            with engine.begin() as conn:
                for t in self.tables:
                    conn.exec_driver_sql(f'DELETE FROM "{t}"')
                for seq in conn.exec_driver_sql(
                        "SELECT sequence_name FROM information_schema.sequences "
                        "WHERE sequence_schema = current_schema()").scalars().all():
                    conn.exec_driver_sql(f'ALTER SEQUENCE "{seq}" RESTART')
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def pg_module_db(pg_databases: list[str]) -> PgModuleDatabase:
    url = new_pg_database(pg_databases)
    upgrade(url)
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        tables = [t.name for t in reversed(meta.sorted_tables) if t.name != "alembic_version"]
    finally:
        engine.dispose()
    return PgModuleDatabase(url, tables)


def service_settings(home: Path, database_url: str, mlflow_uri: str, **overrides: object) -> Settings:
    """Settings of an in-process registry: everything explicit, nothing read from a ``.env`` file."""
    values: dict[str, object] = {
        "home": home, "database_url": database_url, "storage": "local", "mlflow_tracking_uri": mlflow_uri,
        "public_url": "http://registry.test", "device": "cpu", "torch_threads": 1, "gc_grace_seconds": 3600,
        "job_stale_seconds": 60, "job_max_attempts": 3, "webhook_allow_private": False,
        "webhook_timeout_seconds": 5.0, "webhook_max_attempts": 3, "webhook_backoff_seconds": 2.0,
        "verify_interval_seconds": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reg(request: pytest.FixtureRequest, tmp_path: Path, mlflow_uri: str,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcess]:
    """A registry in this process, on SQLite or PostgreSQL (see the module docstring)."""
    for key in list(os.environ):  # a REGISTRY_* variable of the shell must not change the test
        if key.startswith("REGISTRY_") and not key.startswith("REGISTRY_TEST_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    if request.param == "postgres":
        pg: PgModuleDatabase = request.getfixturevalue("pg_module_db")
        pg.empty()
        url = pg.url
    else:
        home.mkdir(parents=True)
        shutil.copyfile(request.getfixturevalue("sqlite_template"), home / "registry.db")
        url = f"sqlite:///{home / 'registry.db'}"
    ctx = RegistryContext.open(service_settings(home, url, mlflow_uri))  # at head already (see above)
    harness = InProcess(ctx, request.param, tmp_path / "models")
    ctx.job_sender = harness.send
    try:
        yield harness
    finally:
        ctx.close()


@pytest.fixture
def ctx(reg: InProcess) -> RegistryContext:
    return reg.ctx
