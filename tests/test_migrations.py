"""Alembic migrations upgrade from empty and downgrade, on SQLite and PostgreSQL, and match the ORM."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from registry import db
from registry.models import Base

from .conftest import new_pg_database

TABLES = {"models", "model_versions", "aliases", "lineage_edges", "blobs", "version_files", "model_tags",
          "version_tags", "api_tokens", "drafts", "draft_files", "upload_sessions", "events", "jobs", "merge_bases",
          "basis_members", "policies", "webhooks", "webhook_deliveries", "prediction_sets", "derived_files",
          "chunks", "blob_segments", "compressions", "compression_members"}


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path, pg_databases: list[str]) -> str:
    if request.param == "postgres":
        return new_pg_database(pg_databases)
    return f"sqlite:///{tmp_path / 'm.db'}"


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    assert _tables(empty_db) == set()
    db.upgrade(empty_db)
    assert _tables(empty_db) == TABLES
    assert db.current_revision(empty_db) is not None
    db.downgrade(empty_db, "base")
    assert _tables(empty_db) == set()
    assert db.current_revision(empty_db) is None
    db.upgrade(empty_db)
    assert _tables(empty_db) == TABLES


def test_migrations_match_the_orm(empty_db: str) -> None:
    db.upgrade(empty_db)
    engine = db.create_db_engine(empty_db)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
