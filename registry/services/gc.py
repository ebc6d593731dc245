"""Garbage collection: remove what no version references, never what a push may still need.

1. Drafts older than ``draft_ttl_seconds`` (abandoned pushes) and their staged bytes; staging
   directories with no draft row (left by a crash).
2. Blob rows no version and no draft references, older than the grace period. Each is deleted in
   its own transaction; the foreign key from ``version_files`` (ON DELETE RESTRICT) makes the
   delete fail if a commit started referencing the blob meanwhile, and gc then keeps it.
3. Store objects without a blob row whose bytes were last written before the grace period: those
   of step 2, and those of a commit that failed after moving bytes into the store. A commit
   that needs bytes with no row writes (or touches) the object first, so gc leaves it alone.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.exc import IntegrityError

from ..models import Blob, Draft, DraftFile, VersionFile, utcnow
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
                s.execute(delete(Draft).where(Draft.id == draft_id))
            ctx.staging.remove_draft(draft_id)
    for d in ctx.staging.draft_ids():
        path = ctx.staging.root / d
        if d not in live_drafts and path.stat().st_mtime < time.time() - grace:
            report.staging_dirs_removed += 1
            if not dry_run:
                ctx.staging.remove_draft(d)

    # 2. unreferenced blob rows
    with ctx.db.read() as s:
        candidates = list(s.execute(select(Blob.sha256, Blob.size).where(
            Blob.created_at < cutoff,
            ~exists().where(VersionFile.blob_sha256 == Blob.sha256),
            ~exists().where(DraftFile.sha256 == Blob.sha256),
        )))
    for sha, size in candidates:
        report.blob_rows_removed += 1
        report.bytes_freed += size
        report.removed.append(sha)
        if dry_run:
            continue
        try:
            with ctx.db.write() as s:
                gone = s.execute(delete(Blob).where(
                    Blob.sha256 == sha, ~exists().where(VersionFile.blob_sha256 == sha),
                    ~exists().where(DraftFile.sha256 == sha))).rowcount
        except IntegrityError:
            gone = 0
        if not gone:
            report.blob_rows_removed -= 1
            report.bytes_freed -= size
            report.removed.pop()
            report.kept_in_use += 1

    # 3. store objects with no row (including those whose rows step 2 just removed). A commit
    # that needs such bytes again rewrites or touches the object first, which makes it young.
    removed_rows = set(report.removed)
    for obj in ctx.store.list_objects():
        if obj.mtime >= cutoff.timestamp():
            continue
        with ctx.db.read() as s:
            if s.get(Blob, obj.sha256) is not None:
                continue
        if obj.sha256 not in removed_rows:
            report.objects_removed += 1
            report.bytes_freed += obj.size
            report.removed.append(obj.sha256)
        else:
            report.objects_removed += 1
        if not dry_run:
            ctx.store.delete(obj.sha256)
    return report
