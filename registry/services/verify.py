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
from . import content, jobs
from .context import RegistryContext
from .derive import job_run, model_of, skipped
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
    ctx, prm = run.ctx, run.params
    with job_run(run, model_of(prm.ref or ""), f"verify {prm.ref}", {"operation": "verify", "ref": prm.ref,
                                                                      "job_id": run.job_id}) as mr:
        with ctx.db.read() as s:
            v = s.get(ModelVersion, prm.version_id)
            if v is None:
                return skipped(mr, "version no longer exists")
            s.expunge(v)
        mr.log_params({"sha256": v.content_sha256, "storage_mode": v.storage_mode})
        result = _check(run, v)
        bad = [c["path"] for c in result["files"] if not c["ok"]]
        mr.log_metrics({"files": len(result["files"]), "mismatches": len(bad), "ok": float(result["ok"])})
        mr.log_dict(result, "verify.json")
        mr.set_tag("registry.verified", "true" if result["ok"] else "false")
        mr.finish()
        with ctx.db.write() as s:
            row = s.get(ModelVersion, v.id)
            if row is not None:
                row.verified_at = utcnow()
                row.corrupt_at = None if result["ok"] else (row.corrupt_at or row.verified_at)
                emit(s, "version.verified" if result["ok"] else "version.corrupt", model_name=row.model.name,
                     version_id=row.id, ref=row.ref, bad=bad)
            run.complete(s, result)
    return result


def _check(run: JobRun[VerifyParams], v: ModelVersion) -> dict[str, Any]:
    """Every file of ``v``, re-read (stored) or regenerated (derived), against its recorded sha256."""
    ctx = run.ctx
    checks = []
    files = served_files(ctx, v.id, "native")
    gen = None
    try:
        for i, f in enumerate(files):
            run.progress(i / max(1, len(files)), f"checking {f.path}")
            if f.blob:
                source = content.describe(ctx, f.sha256)
                try:
                    actual = _sha(content.iter_range(ctx, f.sha256))
                except OSError as e:  # missing object, damaged payload
                    actual = None
                    source += f" ({e})"
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
    return {"ref": v.ref, "ok": all(c["ok"] for c in checks), "files": checks}


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
