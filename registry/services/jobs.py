"""Jobs: units of worker work whose state lives in the database (Celery carries only the id).

Lifecycle: ``queued`` -> (claimed by a worker) ``running`` -> ``succeeded`` | ``failed``; a
retryable failure goes back to ``queued`` with ``not_before``. Claiming and completing are
guarded updates on ``(id, state, attempts)``, so a task delivered twice, or a worker that was
presumed dead and comes back, cannot complete a job twice or record a duplicate result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from ..config import Settings
from ..errors import NotFound
from ..models import Job, JobState, utcnow
from .context import RegistryContext
from .events import emit
from .jobtypes import JobParams, job_type, parse_params, type_of
from .sql import newest_first

log = logging.getLogger("registry.jobs")

class JobSuperseded(Exception):
    """This attempt no longer owns the job (another attempt claimed or finished it)."""


class RetryLater(Exception):
    """Raised by a handler: try again after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def job_view(j: Job) -> dict[str, Any]:
    return {
        "id": j.id, "type": j.type, "state": j.state, "queue": j.queue, "params": j.params, "result": j.result,
        "error": j.error, "progress": j.progress, "message": j.message, "attempts": j.attempts,
        "max_attempts": j.max_attempts, "idempotency_key": j.idempotency_key, "celery_task_id": j.celery_task_id,
        "worker": j.worker, "mlflow_run_id": j.mlflow_run_id, "event_id": j.event_id, "policy_id": j.policy_id,
        "created_by": j.created_by, "created_at": j.created_at, "started_at": j.started_at,
        "finished_at": j.finished_at, "heartbeat_at": j.heartbeat_at,
    }


def queue_for(type: str, settings: Settings) -> str:
    """The queue a job of ``type`` goes to: math jobs to the math queue (``gpu`` when GPU workers
    are configured), the rest to ``cpu``."""
    return settings.math_queue if job_type(type).math else "cpu"


def create(s: Session, params: JobParams, *, settings: Settings, idempotency_key: str | None = None,
           created_by: str | None = None, event_id: int | None = None, policy_id: int | None = None,
           max_attempts: int = 3) -> tuple[Job, bool]:
    """Insert a job in the caller's transaction; returns (job, created). Its type is the one whose
    parameters ``params`` are (:data:`registry.services.jobtypes.JOB_TYPES`), and the parameters are
    checked to read back as that type's, as the worker will read them. An existing job with the
    same idempotency key is returned instead of a new one."""
    type = type_of(params)
    row = params.to_row()
    parse_params(type, row)
    if idempotency_key is not None:
        existing = s.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is not None:
            return existing, False
    job = Job(type=type, params=row, queue=queue_for(type, settings), idempotency_key=idempotency_key,
              created_by=created_by, event_id=event_id, policy_id=policy_id, max_attempts=max_attempts,
              state=JobState.queued.value)
    s.add(job)
    s.flush()
    return job, True


def submit(ctx: RegistryContext, build: Callable[[Session], JobParams], *, actor: str | None,
           idempotency_key: str | None = None) -> dict[str, Any]:
    """Queue a job for an API request: ``build(session)`` validates the request inside the write
    transaction (raising a 4xx on bad input: then no job exists) and returns the job's params; the
    job is sent to the broker once the transaction has committed."""
    with ctx.db.write() as s:
        params = build(s)
        job, _ = create(s, params, settings=ctx.settings, created_by=actor, idempotency_key=idempotency_key,
                        max_attempts=ctx.settings.job_max_attempts)
        view = job_view(job)
    send(ctx, [view["id"]])
    return view


def send(ctx: RegistryContext, job_ids: Sequence[int]) -> int:
    """Hand queued, unsent, due jobs to the broker (after their transaction committed). Without a
    sender (no broker configured in this process) the dispatcher sends them later."""
    if ctx.job_sender is None or not job_ids:
        return 0
    sent = 0
    now = utcnow()
    with ctx.db.read() as s:
        due = list(s.execute(select(Job.id, Job.queue).where(
            Job.id.in_(list(job_ids)), Job.state == JobState.queued.value, Job.enqueued_at.is_(None),
            or_(Job.not_before.is_(None), Job.not_before <= now))))
    for job_id, queue in due:
        try:
            task_id = ctx.job_sender(job_id, queue)
        except Exception:  # broker unreachable: the job stays queued; the dispatcher sends it later
            log.warning("could not send job %s to the broker; it stays queued", job_id, exc_info=True)
            break
        with ctx.db.write() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.queued.value)
                      .values(enqueued_at=utcnow(), celery_task_id=task_id))
        sent += 1
    return sent


def claim(ctx: RegistryContext, job_id: int, worker: str) -> int | None:
    """Take a job for this worker: returns the attempt number, or None if it is not ours to run
    (finished, running elsewhere with a live heartbeat, or not due yet)."""
    now = utcnow()
    stale = now - timedelta(seconds=ctx.settings.job_stale_seconds)
    with ctx.db.write() as s:
        row = s.execute(
            update(Job)
            .where(Job.id == job_id, or_(
                and_(Job.state == JobState.queued.value, or_(Job.not_before.is_(None), Job.not_before <= now)),
                and_(Job.state == JobState.running.value, Job.heartbeat_at < stale)))
            .values(state=JobState.running.value, attempts=Job.attempts + 1, worker=worker, started_at=now,
                    heartbeat_at=now, message="started")
            .returning(Job.attempts)
        ).first()
        return None if row is None else int(row[0])


def heartbeat(ctx: RegistryContext, job_id: int, attempt: int, progress: float | None = None,
              message: str | None = None) -> bool:
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    if message is not None:
        values["message"] = message
    with ctx.db.write() as s:
        n = s.execute(update(Job).where(Job.id == job_id, Job.attempts == attempt,
                                        Job.state == JobState.running.value).values(**values)).rowcount
    return bool(n)


def complete(s: Session, job_id: int, attempt: int, result: dict[str, Any], mlflow_run_id: str | None = None) -> None:
    """Mark the job succeeded in the caller's transaction (the one that records its result)."""
    n = s.execute(update(Job).where(Job.id == job_id, Job.attempts == attempt, Job.state == JobState.running.value)
                  .values(state=JobState.succeeded.value, result=result, progress=1.0, message="done",
                          finished_at=utcnow(), error=None, mlflow_run_id=mlflow_run_id)).rowcount
    if not n:
        raise JobSuperseded(f"job {job_id} attempt {attempt} no longer owns the job")
    job_type = s.scalar(select(Job.type).where(Job.id == job_id))
    emit(s, "job.succeeded", job_id=job_id, job_type=job_type, result=result)


def fail(ctx: RegistryContext, job_id: int, attempt: int, error: dict[str, Any], retry_in: float | None) -> str:
    """Record a failed attempt: back to ``queued`` after ``retry_in`` seconds while attempts
    remain, else ``failed``. Returns the new state."""
    with ctx.db.write() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, Job.attempts == attempt,
                                         Job.state == JobState.running.value).with_for_update())
        if job is None:
            return "superseded"
        job.error = error
        job.heartbeat_at = None
        if retry_in is not None and job.attempts < job.max_attempts:
            job.state = JobState.queued.value
            job.not_before = utcnow() + timedelta(seconds=retry_in)
            job.enqueued_at = None
            job.message = f"attempt {attempt} failed; retrying in {retry_in:.0f}s"
        else:
            job.state = JobState.failed.value
            job.finished_at = utcnow()
            job.message = error.get("message", "failed")[:500]
            emit(s, "job.failed", job_id=job.id, job_type=job.type, error=error)
        return job.state


def get(ctx: RegistryContext, job_id: int) -> dict[str, Any]:
    with ctx.db.read() as s:
        j = s.get(Job, job_id)
        if j is None:
            raise NotFound(f"job {job_id} not found", code="job_not_found")
        return job_view(j)


def list_jobs(ctx: RegistryContext, *, state: str | None = None, type: str | None = None, limit: int = 50,
              cursor: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
    with ctx.db.read() as s:
        q = select(Job)
        if state:
            q = q.where(Job.state == state)
        if type:
            q = q.where(Job.type == type)
        rows, more = newest_first(s, q, Job.id, limit, cursor)
        return [job_view(j) for j in rows], (rows[-1].id if more else None)
