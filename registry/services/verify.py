"""Verification: recompute the sha256 of every file of a version, stored or derived.

Stored files are re-read from the blob store; generated files are generated again (bypassing
the cache; a cached copy is checked too and dropped if it differs). The result lands on the job
and as an event (``version.verified`` or ``version.corrupt``); ``verified_at`` is updated.
With ``REGISTRY_VERIFY_INTERVAL_SECONDS`` set, the dispatcher schedules a check of the least
recently verified version at that interval (a background scrub).
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..formats.safetensors import iter_file
from ..models import ModelVersion, utcnow
from . import jobs
from .context import RegistryContext
from .derived import cache, generator, served_files
from .dispatcher import periodic
from .events import emit
from .jobtypes import VerifyParams
from .refs import resolve
from .runner import JobRun


def request_verify(ctx: RegistryContext, ref: str, actor: str | None = None) -> dict[str, Any]:

    def build(s: Session) -> VerifyParams:
        v = resolve(s, ref)
        return VerifyParams(version_id=v.id, ref=v.ref)

    return jobs.submit(ctx, build, actor=actor)


def _sha(chunks: Any) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def verify(run: JobRun[VerifyParams]) -> dict[str, Any]:
    """The ``verify`` job."""
    ctx = run.ctx
    with ctx.db.read() as s:
        v = s.get(ModelVersion, run.params.version_id)
        if v is None:
            return {"skipped": "version no longer exists"}
        s.expunge(v)
    checks = []
    files = served_files(ctx, v.id, "native")
    gen = None
    try:
        for i, f in enumerate(files):
            run.progress(i / max(1, len(files)), f"checking {f.path}")
            if f.blob:
                actual = _sha(ctx.store.iter_range(f.sha256)) if ctx.store.exists(f.sha256) else None
                source = "blob"
            else:
                if gen is None:
                    gen = generator(ctx, v, "native", run.work_dir)
                actual = _sha(gen.read_range(f.path, 0, f.size))
                source = "generated"
                cached = cache(ctx).get(f.sha256)
                if cached is not None and _sha(iter_file(cached)) != f.sha256:
                    cached.unlink(missing_ok=True)
                    source = "generated (a corrupt cached copy was dropped)"
            checks.append({"path": f.path, "expected": f.sha256, "actual": actual, "ok": actual == f.sha256,
                           "source": source, "size": f.size})
    finally:
        if gen is not None:
            gen.close()
    ok = all(c["ok"] for c in checks)
    result = {"ref": v.ref, "ok": ok, "files": checks}
    with ctx.db.write() as s:
        row = s.get(ModelVersion, v.id)
        if row is not None:
            row.verified_at = utcnow()
            row.corrupt_at = None if ok else (row.corrupt_at or row.verified_at)
            emit(s, "version.verified" if ok else "version.corrupt", model_name=row.model.name, version_id=row.id,
                 ref=row.ref, bad=[c["path"] for c in checks if not c["ok"]])
        run.complete(s, result)
    return result


@periodic
def schedule_scrub(ctx: RegistryContext) -> list[int]:
    interval = ctx.settings.verify_interval_seconds
    if interval <= 0:
        return []
    bucket = int(utcnow().timestamp() // interval)
    with ctx.db.write() as s:
        v = s.scalar(select(ModelVersion).where(ModelVersion.archived_at.is_(None))
                     .order_by(ModelVersion.verified_at.is_not(None), ModelVersion.verified_at, ModelVersion.id)
                     .limit(1))
        if v is None:
            return []
        job, created = jobs.create(s, VerifyParams(version_id=v.id, ref=v.ref), settings=ctx.settings,
                                   created_by="scrub", idempotency_key=f"scrub:{bucket}")
        return [job.id] if created else []
