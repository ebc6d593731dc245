"""Blob rows as claims: why gc can never remove bytes that a commit references.

A blob row is written *before* its bytes move into the store, and gc removes an object only
after it has taken the row for itself; both steps are single statements the database arbitrates.

- :func:`claim` (in the transaction that adds a file to a draft): insert the row as ``pending``
  if it is new, and touch it (``touched_at = now``) unless gc owns it (``deleting``). The draft's
  file row references it from then on.
- A commit moves the staged bytes into the store (fsynced) and, in its transaction, turns its
  pending rows ``ready`` (:func:`mark_ready`) and locks the rows it reuses (:func:`lock_ready`).
- gc (:mod:`registry.services.gc`) turns a row into ``deleting`` with one conditional UPDATE —
  nothing references it, nobody touched it within the grace period, it is not ``deleting``
  already — then deletes the object, then the row. A claim that meets a ``deleting`` row waits
  for gc to finish (:func:`retrying`) and then starts a fresh row. An object with no row at all
  is taken by inserting a ``deleting`` row (the primary key makes that exclusive).

On PostgreSQL the touch matters: gc's UPDATE waits for the claim's row lock and then re-checks
``touched_at`` on the new row version, so a concurrent claim always wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import Conflict, Unavailable
from ..models import Blob, BlobState, Chunk, DraftFile, VersionFile, utcnow
from .context import RegistryContext
from .sql import insert_ignore

T = TypeVar("T")
BLOBS = Blob.__table__  # statements on the table itself: no ORM session bookkeeping

CLAIM_PATIENCE_SECONDS = 30.0  # how long a claim waits for gc to finish removing an object


class BlobBusy(Unavailable):
    """gc is removing these bytes right now; the same request succeeds a moment later."""

    status = 503
    code = "blob_busy"


def claim(s: Session, blobs: dict[str, int]) -> None:
    """Claim ``blobs`` (sha256 -> size) for the caller's transaction: new rows are ``pending``,
    existing ones are touched. Raises :class:`BlobBusy` when gc owns one of them."""
    if not blobs:
        return
    now = utcnow()
    insert_ignore(s, BLOBS, [
        {"sha256": sha, "size": size, "created_at": now, "touched_at": now, "state": BlobState.pending.value}
        for sha, size in sorted(blobs.items())])
    touched = dict(s.execute(
        update(BLOBS).where(BLOBS.c.sha256.in_(sorted(blobs)), BLOBS.c.state != BlobState.deleting.value)
        .values(touched_at=now).returning(BLOBS.c.sha256, BLOBS.c.size)).all())
    busy = sorted(set(blobs) - set(touched))
    if busy:
        raise BlobBusy("these bytes are being garbage-collected; retry", details={"sha256": busy})
    wrong = sorted(sha for sha, size in blobs.items() if touched[sha] != size)
    if wrong:
        raise Conflict("a blob with this sha256 has another size", code="size_mismatch", details={"sha256": wrong})


def claim_ready(s: Session, sha256: str) -> int | None:
    """Claim bytes already in the store (a link to a known blob): touches the row and returns its
    size, or None when the registry does not hold those bytes (unknown, still pending, or being
    removed)."""
    return s.execute(
        update(BLOBS).where(BLOBS.c.sha256 == sha256, BLOBS.c.state == BlobState.ready.value)
        .values(touched_at=utcnow()).returning(BLOBS.c.size)).scalar_one_or_none()


def ready(s: Session, shas: Iterable[str]) -> set[str]:
    """Which of ``shas`` have their bytes in the store."""
    shas = sorted(set(shas))
    if not shas:
        return set()
    return set(s.scalars(select(Blob.sha256).where(Blob.sha256.in_(shas), Blob.state == BlobState.ready.value)))


def ready_rows(s: Session, shas: Iterable[str]) -> dict[str, tuple[int, str]]:
    """sha256 -> (size, form) of those of ``shas`` whose bytes are in the store (the ``known`` rows
    of :mod:`registry.services.content`)."""
    shas = sorted(set(shas))
    if not shas:
        return {}
    return {sha: (int(size), str(form)) for sha, size, form in s.execute(
        select(Blob.sha256, Blob.size, Blob.form).where(Blob.sha256.in_(shas), Blob.state == BlobState.ready.value))}


def mark_ready(s: Session, blobs: dict[str, int]) -> None:
    """The bytes of ``blobs`` (sha256 -> size) are now in the store, fsynced: call in the commit's
    transaction. Their rows were claimed when the files joined the draft (a row missing for any
    reason is written here)."""
    if not blobs:
        return
    now = utcnow()
    insert_ignore(s, BLOBS, [{"sha256": sha, "size": size, "created_at": now, "touched_at": now,
                              "state": BlobState.ready.value, "stored_size": size}
                             for sha, size in sorted(blobs.items())])
    done = set(s.scalars(
        update(BLOBS).where(BLOBS.c.sha256.in_(sorted(blobs)), BLOBS.c.state != BlobState.deleting.value)
        .values(state=BlobState.ready.value, touched_at=now, stored_size=BLOBS.c.size).returning(BLOBS.c.sha256)))
    if set(blobs) - done:  # impossible while a draft file references them; refuse rather than lose
        raise Conflict("stored bytes of this version were claimed by gc meanwhile; push again", code="blob_missing",
                       details={"sha256": sorted(set(blobs) - done)})


def lock_ready(s: Session, shas: Iterable[str]) -> None:
    """Lock the rows of reused bytes until the caller's transaction commits (so gc cannot take
    them meanwhile); every one must be ``ready``."""
    shas = sorted(set(shas))
    if not shas:
        return
    present = set(s.scalars(select(Blob.sha256).where(Blob.sha256.in_(shas), Blob.state == BlobState.ready.value)
                            .with_for_update(read=True)))
    if set(shas) - present:
        raise Conflict("stored bytes of this version were garbage-collected meanwhile; push again",
                       code="blob_missing", details={"sha256": sorted(set(shas) - present)})


def retrying(fn: Callable[[], T], patience: float = CLAIM_PATIENCE_SECONDS) -> T:
    """Run ``fn`` (a whole transaction), again while gc holds a blob it claims."""
    deadline = time.monotonic() + patience
    delay = 0.02
    while True:
        try:
            return fn()
        except BlobBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


# ----------------------------------------------------------------------------- removal (gc's side)

UNREFERENCED = (~exists().where(VersionFile.blob_sha256 == BLOBS.c.sha256),
                ~exists().where(DraftFile.sha256 == BLOBS.c.sha256),
                ~exists().where(Chunk.object_sha256 == BLOBS.c.sha256))


def take(ctx: RegistryContext, sha256: str, cutoff: datetime, *, pending_only: bool = False) -> bool:
    """Make the row ``deleting`` if nothing references it and no claim touched it since
    ``cutoff`` (one statement: a concurrent claim either commits first and keeps it, or waits and
    then finds it ``deleting``). True when the caller now owns it and must :func:`remove` it."""
    states = (BlobState.pending.value,) if pending_only else (BlobState.pending.value, BlobState.ready.value)
    try:
        with ctx.db.write() as s:
            return bool(s.execute(update(BLOBS).where(
                BLOBS.c.sha256 == sha256, BLOBS.c.state.in_(states), BLOBS.c.touched_at < cutoff, *UNREFERENCED,
            ).values(state=BlobState.deleting.value, touched_at=utcnow())).rowcount)
    except IntegrityError:
        return False


def remove(ctx: RegistryContext, sha256: str) -> None:
    """Delete the object of a row the caller owns (``deleting``), then the row."""
    ctx.store.delete(sha256)
    with ctx.db.write() as s:
        s.execute(delete(BLOBS).where(BLOBS.c.sha256 == sha256, BLOBS.c.state == BlobState.deleting.value))


def release(ctx: RegistryContext, shas: Iterable[str]) -> int:
    """Remove at once the ``pending`` claims (and any bytes) that a discarded draft held and
    nothing else references. Returns how many were removed."""
    cutoff = utcnow()
    removed = 0
    for sha in sorted(set(shas)):
        if take(ctx, sha, cutoff, pending_only=True):
            remove(ctx, sha)
            removed += 1
    return removed
