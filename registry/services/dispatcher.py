"""The dispatcher: turns outbox events into jobs, and keeps jobs moving.

Each pass:
1. **events** — for every undispatched event, in order, the subscribers (policies, webhooks,
   provenance) create jobs; the jobs and the event's ``dispatched_at`` commit in one transaction,
   and job idempotency keys are derived from the event id, so a crash anywhere re-runs the pass
   without losing or duplicating work;
2. **reap** — a running job whose heartbeat is older than ``job_stale_seconds`` (its worker was
   killed) goes back to ``queued`` (or ``failed`` when out of attempts);
3. **send** — queued jobs that are due and were never sent (committed while the broker was down,
   a retry's backoff elapsed, the dispatcher crashed after commit) are handed to the broker; jobs
   sent long ago but never started are sent again (a lost message; claiming makes a double
   delivery harmless).

Several dispatchers may run: event rows are locked while processed (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; SQLite serialises writers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from ..config import Settings
from ..models import Event, Job, JobState, utcnow
from . import jobs
from .context import RegistryContext

log = logging.getLogger("registry.dispatcher")

# A subscriber sees each event once, inside the dispatching transaction, and creates jobs.
Subscriber = Callable[[Session, Event, Settings], list[Job]]
SUBSCRIBERS: list[Subscriber] = []


def subscriber(fn: Subscriber) -> Subscriber:
    SUBSCRIBERS.append(fn)
    return fn


# A periodic task runs once per dispatcher pass and returns the ids of jobs it created.
Periodic = Callable[[RegistryContext], list[int]]
PERIODIC: list[Periodic] = []


def periodic(fn: Periodic) -> Periodic:
    PERIODIC.append(fn)
    return fn


@dataclass
class PassStats:
    events: int = 0
    jobs_created: int = 0
    reaped: int = 0
    sent: int = 0


def _load_subscribers() -> None:
    import importlib

    for mod in ("policies", "webhooks", "provenance", "verify", "packing"):
        try:
            importlib.import_module(f"registry.services.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"registry.services.{mod}":
                raise


def process_events(ctx: RegistryContext, limit: int = 100) -> tuple[int, list[int]]:
    _load_subscribers()
    created: list[int] = []
    n = 0
    with ctx.db.write() as s:
        q = select(Event).where(Event.dispatched_at.is_(None)).order_by(Event.id).limit(limit)
        if not ctx.db.is_sqlite:
            q = q.with_for_update(skip_locked=True)
        events = list(s.scalars(q))
        for ev in events:
            for sub in SUBSCRIBERS:
                for job in sub(s, ev, ctx.settings):
                    created.append(job.id)
            ev.dispatched_at = utcnow()
            n += 1
    return n, created


def reap(ctx: RegistryContext) -> int:
    stale = utcnow() - timedelta(seconds=ctx.settings.job_stale_seconds)
    with ctx.db.write() as s:
        dead = list(s.scalars(select(Job).where(Job.state == JobState.running.value, Job.heartbeat_at < stale)
                              .with_for_update()))
        for job in dead:
            log.warning("job %s: worker %s stopped beating; re-queueing", job.id, job.worker)
            if job.attempts < job.max_attempts:
                job.state = JobState.queued.value
                job.enqueued_at = None
                job.not_before = None
                job.message = f"worker {job.worker} lost during attempt {job.attempts}; re-queued"
            else:
                job.state = JobState.failed.value
                job.finished_at = utcnow()
                job.error = {"code": "worker_lost", "message": f"worker lost on the last attempt ({job.attempts})",
                             "details": {}}
        return len(dead)


def send_due(ctx: RegistryContext, limit: int = 500) -> int:
    if ctx.job_sender is None:
        return 0
    now = utcnow()
    resend_before = now - timedelta(seconds=10 * ctx.settings.job_stale_seconds)
    with ctx.db.write() as s:
        # messages sent long ago whose job never started are presumed lost
        s.execute(update(Job).where(Job.state == JobState.queued.value, Job.enqueued_at < resend_before)
                  .values(enqueued_at=None))
    with ctx.db.read() as s:
        due = list(s.scalars(select(Job.id).where(
            Job.state == JobState.queued.value, Job.enqueued_at.is_(None),
            or_(Job.not_before.is_(None), Job.not_before <= now)).order_by(Job.id).limit(limit)))
    return jobs.send(ctx, due)


def dispatch_once(ctx: RegistryContext) -> PassStats:
    stats = PassStats()
    stats.events, created = process_events(ctx)
    for task in PERIODIC:
        created += task(ctx)
    stats.jobs_created = len(created)
    stats.reaped = reap(ctx)
    stats.sent = send_due(ctx)
    return stats


def run_forever(ctx: RegistryContext, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    interval = ctx.settings.dispatch_interval
    log.info("dispatcher running every %.1fs", interval)
    while not stop.is_set():
        try:
            stats = dispatch_once(ctx)
            if stats.events or stats.reaped or stats.sent:
                log.info("dispatch: %s", stats)
        except Exception:  # the broker or database may be down for a while: keep trying
            log.exception("dispatch pass failed; retrying")
        stop.wait(interval)
