"""Constrained types for integer path and query parameters: the one place that says which
integers the API accepts, so a value no column can hold is a 422, never a database error (500).

Every table's id is an ``INTEGER`` column (32-bit on PostgreSQL), so an id, an ``after`` event id
or a keyset cursor (the id the next page starts below) outside 1 … 2³¹−1 names nothing that can
exist.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query

from ..errors import InvalidInput
from ..services import names

MAX_ID = 2**31 - 1

Id = Annotated[int, Path(ge=1, le=MAX_ID, description="A numeric id (1 … 2³¹−1).")]
"""An id in the URL path (``/jobs/{job_id}``)."""


def parse_id_cursor(cursor: str | None) -> int | None:
    """A keyset cursor that is an id (``next_cursor`` of a list ordered by id), else 422 ``invalid_cursor``."""
    if cursor is None:
        return None
    value = names.ascii_uint(cursor) if len(cursor) <= 10 else None
    if value is None or not 1 <= value <= MAX_ID:
        raise InvalidInput(f"bad cursor {cursor[:40]!r}: pass the next_cursor of the previous page",
                           code="invalid_cursor")
    return value


def _id_cursor(cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
               ) -> int | None:
    return parse_id_cursor(cursor)


IdCursor = Annotated[int | None, Depends(_id_cursor)]
"""The keyset cursor of a list ordered by id, newest first (opaque to clients: a string)."""

AfterId = Annotated[int, Query(ge=0, le=MAX_ID, description="Only items with a larger id (0: from the start).")]
"""``?after=``: items with an id above this one, oldest first."""
