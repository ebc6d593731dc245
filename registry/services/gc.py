"""Garbage collection: remove what nothing references, never bytes a commit may still need.

1. Drafts older than ``draft_ttl_seconds`` (abandoned pushes) and their staged bytes; staging
   directories with no draft row (left by a crash).
2. Blob rows that no version and no draft file references and that no claim touched within the
   grace period (abandoned drafts' claims, bytes a prune released). Each is taken with one
   conditional UPDATE to ``deleting`` — the database arbitrates against a concurrent claim, see
   :mod:`registry.services.blobs` — then its object is deleted, then the row. Rows left
   ``deleting`` by a gc that died are finished the same way.
3. Chunks of packed files that no file and no other chunk needs any more (a chunk another chunk
   is coded against stays: the foreign key refuses its removal); their payloads then become
   unreferenced blob rows, removed as in 2 (on the next pass). Raw objects of packed files that
   a pack job did not release (it died after packing) are released.
4. Store objects with no row at all, last written before the grace period (bytes from before
   blob claims existed, or written by hand): taken by inserting a ``deleting`` row, then deleted.
5. Scratch space of job attempts that no longer run (``$REGISTRY_WORK_DIR/job-{id}-{attempt}``):
   a worker killed mid-job cannot remove its own.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, exists, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from ..models import Blob, BlobSegment, BlobState, Chunk, Draft, DraftFile, Job, JobState, utcnow
from . import blobs, content, runner
from .context import RegistryContext


@dataclass
class GcReport:
    dry_run: bool
    drafts_removed: int = 0
    staging_dirs_removed: int = 0
    blob_rows_removed: int = 0
    objects_removed: int = 0
    bytes_freed: int = 0
    kept_in_use: int = 0
    chunks_removed: int = 0
    raw_released: int = 0
    work_dirs_removed: int = 0
    removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(ctx: RegistryContext, *, dry_run: bool = False, grace_seconds: int | None = None) -> GcReport:
    settings = ctx.settings
    grace = settings.gc_grace_seconds if grace_seconds is None else grace_seconds
    now = utcnow()
    cutoff = now - timedelta(seconds=grace)
    report = GcReport(dry_run=dry_run)

    # 1. abandoned drafts
    with ctx.db.read() as s:
        stale = list(s.scalars(select(Draft.id).where(
            Draft.created_at < now - timedelta(seconds=settings.draft_ttl_seconds))))
        live_drafts = set(s.scalars(select(Draft.id)))
    for draft_id in stale:
        report.drafts_removed += 1
        if not dry_run:
            with ctx.db.write() as s:
                claimed = list(s.scalars(select(DraftFile.sha256).where(DraftFile.draft_id == draft_id)))
                s.execute(delete(Draft).where(Draft.id == draft_id))
            ctx.staging.remove_draft(draft_id)
            blobs.release(ctx, claimed)
    for d in ctx.staging.draft_ids():
        try:
            mtime = (ctx.staging.root / d).stat().st_mtime
        except FileNotFoundError:  # its commit or abort removed it meanwhile
            continue
        if d not in live_drafts and mtime < time.time() - grace:
            report.staging_dirs_removed += 1
            if not dry_run:
                ctx.staging.remove_draft(d)

    # 2. unreferenced blob rows, and rows a gc that died left deleting
    with ctx.db.read() as s:
        candidates = list(s.execute(select(Blob.sha256, Blob.size, Blob.state).where(
            (Blob.state == BlobState.deleting.value) | (Blob.touched_at < cutoff), *blobs.UNREFERENCED)))
    for sha, size, state in candidates:
        if not dry_run:
            if state != BlobState.deleting.value and not blobs.take(ctx, sha, cutoff):
                report.kept_in_use += 1  # claimed or referenced meanwhile
                continue
            blobs.remove(ctx, sha)
        report.blob_rows_removed += 1
        report.objects_removed += 1
        report.bytes_freed += size
        report.removed.append(sha)

    # 3. chunks nothing needs; raw bytes of packed files left behind
    report.chunks_removed = _remove_chunks(ctx, dry_run)
    with ctx.db.read() as s:
        leftover = content.unreleased(s, cutoff)
    report.raw_released = len(leftover)
    if not dry_run:
        for sha in leftover:
            content.release_raw(ctx, sha)

    # 4. store objects no row claims
    for obj in ctx.store.list_objects():
        if obj.mtime >= cutoff.timestamp():
            continue
        with ctx.db.read() as s:
            if s.get(Blob, obj.sha256) is not None:
                continue
        report.objects_removed += 1
        report.bytes_freed += obj.size
        report.removed.append(obj.sha256)
        if dry_run:
            continue
        try:
            with ctx.db.write() as s:
                s.execute(insert(Blob.__table__).values(sha256=obj.sha256, size=obj.size, created_at=now,
                                                        touched_at=now, state=BlobState.deleting.value))
        except IntegrityError:  # somebody claimed it first: theirs
            report.objects_removed -= 1
            report.bytes_freed -= obj.size
            report.removed.pop()
            continue
        blobs.remove(ctx, obj.sha256)

    # 5. scratch space of dead job attempts
    report.work_dirs_removed = _remove_dead_work_dirs(ctx, dry_run)
    return report


def _remove_dead_work_dirs(ctx: RegistryContext, dry_run: bool) -> int:
    """Remove the scratch space of job attempts that are not running (an attempt creates it
    after it claimed the job, so a live one is always seen running)."""
    found = runner.attempt_dirs(ctx)
    if not found:
        return 0
    with ctx.db.read() as s:
        live = {(int(i), int(a)) for i, a in s.execute(
            select(Job.id, Job.attempts).where(Job.state == JobState.running.value,
                                               Job.id.in_(sorted({i for i, _ in found}))))}
    dead = [p for key, p in found.items() if key not in live]
    if not dry_run:
        for p in dead:
            shutil.rmtree(p, ignore_errors=True)
    return len(dead)


def _remove_chunks(ctx: RegistryContext, dry_run: bool) -> int:
    """Delete chunk rows no segment and no other chunk references, repeatedly (a chain frees
    from the top). A concurrent pack that starts referencing one makes the delete fail its
    foreign key: then the chunk stays."""
    coded = aliased(Chunk)
    orphan = (~exists().where(BlobSegment.chunk_sha256 == Chunk.sha256),
              ~exists().where(coded.ref_sha256 == Chunk.sha256))
    if dry_run:
        with ctx.db.read() as s:
            return int(s.scalar(select(func.count()).select_from(Chunk).where(*orphan)) or 0)
    removed = 0
    while True:
        try:
            with ctx.db.write() as s:
                n = s.execute(delete(Chunk).where(*orphan)).rowcount
        except IntegrityError:
            return removed
        if not n:
            return removed
        removed += n
