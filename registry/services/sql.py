"""Small dialect-aware SQL helpers (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Table
from sqlalchemy.orm import Session


def insert_ignore(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on either backend."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(table).on_conflict_do_nothing(), rows)


MAX_PAGE = 1000


def check_limit(limit: int) -> int:
    """A page size a list endpoint accepts (1 … MAX_PAGE), else 422."""
    from ..errors import InvalidInput

    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", code="invalid_limit")
    return limit


def newest_first(session: Session, query: Select[Any], id_column: Any, limit: int, cursor: int | None,
                 *, entities: bool = True) -> tuple[list[Any], bool]:
    """One keyset page of ``query`` ordered by ``id_column`` descending: the rows with an id below
    ``cursor`` (all when None), at most ``limit`` of them, and whether more follow (the caller's next
    cursor is then the last row's id). ``entities``: scalars (one ORM entity per row) or whole rows."""
    check_limit(limit)
    if cursor is not None:
        query = query.where(id_column < cursor)
    query = query.order_by(id_column.desc()).limit(limit + 1)
    rows = list(session.scalars(query) if entities else session.execute(query))
    return rows[:limit], len(rows) > limit
