"""Running one job: claim it, keep a heartbeat, call its handler, record the outcome.

Each job type's handler is named in :data:`registry.services.jobtypes.JOB_TYPES`. A handler gets
a :class:`JobRun` whose ``params`` are the job row's parameters parsed with the type's params model
(parameters that do not fit fail the job at once) and returns the job's result; when it creates
things (versions, bases) it records them and calls :meth:`JobRun.complete` inside the same
transaction, so the result and the job's success commit together or not at all (a second attempt
then cannot add a duplicate).

Errors: bad input (:class:`RegistryError`, :class:`WeightsError`) fails the job at once, with
the error's code and message; :class:`RetryLater` and unexpected exceptions are retried with
exponential backoff until ``max_attempts``.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import update
from sqlalchemy.orm import Session

from ..errors import RegistryError
from ..models import Job
from . import jobs
from .context import RegistryContext
from .jobtypes import JOB_TYPES, JobParams, parse_params

log = logging.getLogger("registry.jobs")

P = TypeVar("P", bound=JobParams)
Handler = Callable[["JobRun[Any]"], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}  # job type -> its handler, once loaded


@dataclass
class JobRun(Generic[P]):
    ctx: RegistryContext
    job_id: int
    attempt: int
    type: str
    params: P
    created_by: str | None
    work_dir: Path
    completed: bool = False
    lost: threading.Event = field(default_factory=threading.Event)
    mlflow_run_id: str | None = None  # the job's MLflow run, once it has opened one (services.derive.job_run)
    _progress: float = 0.0
    _message: str = ""

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1); written with the next heartbeat."""
        self._progress, self._message = fraction, message
        if not jobs.heartbeat(self.ctx, self.job_id, self.attempt, fraction, message):
            self.lost.set()

    def complete(self, s: Session, result: dict[str, Any], mlflow_run_id: str | None = None) -> None:
        """Mark the job succeeded inside the caller's transaction (with its MLflow run, when it opened one)."""
        jobs.complete(s, self.job_id, self.attempt, result, mlflow_run_id or self.mlflow_run_id)
        self.completed = True


class _Heartbeat:
    def __init__(self, run: JobRun[Any], interval: float) -> None:
        self.run = run
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{run.job_id}", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                if not jobs.heartbeat(self.run.ctx, self.run.job_id, self.run.attempt):
                    self.run.lost.set()
            except Exception:  # a missed beat is not fatal; the next one may succeed
                log.warning("heartbeat for job %s failed", self.run.job_id, exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def backoff(attempt: int, base: float = 5.0, cap: float = 600.0) -> float:
    return float(min(cap, base * 2 ** (attempt - 1)))


def _error(e: BaseException) -> dict[str, Any]:
    from ..weights.errors import WeightsError

    if isinstance(e, RegistryError):
        return {"code": e.code, "message": e.message, "details": e.details, "type": type(e).__name__}
    if isinstance(e, WeightsError):
        return {"code": "invalid_weights", "message": str(e), "details": {}, "type": type(e).__name__}
    return {"code": "internal", "message": f"{type(e).__name__}: {e}", "details": {},
            "traceback": traceback.format_exc()[-4000:]}


_ATTEMPT_DIR = re.compile(r"job-(\d+)-(\d+)")


def attempt_dir(ctx: RegistryContext, job_id: int, attempt: int) -> Path:
    """Scratch space of one attempt of a job (removed when the attempt ends)."""
    return ctx.settings.resolved_work_dir / f"job-{job_id}-{attempt}"


def attempt_dirs(ctx: RegistryContext) -> dict[tuple[int, int], Path]:
    """(job id, attempt) -> scratch space, for every attempt that left one (a killed worker's)."""
    root = ctx.settings.resolved_work_dir
    found: dict[tuple[int, int], Path] = {}
    for p in root.iterdir() if root.is_dir() else []:
        m = _ATTEMPT_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found[(int(m[1]), int(m[2]))] = p
    return found


def run(ctx: RegistryContext, job_id: int, worker: str) -> str:
    """Execute job ``job_id`` if this worker can claim it. Returns the outcome."""
    _load_handlers(ctx)
    attempt = jobs.claim(ctx, job_id, worker)
    if attempt is None:
        return "skipped"
    with ctx.db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None
        jtype, row, created_by = job.type, dict(job.params), job.created_by
    work = attempt_dir(ctx, job_id, attempt)
    fn = HANDLERS.get(jtype)
    started = time.monotonic()
    try:
        if fn is None:
            raise RegistryError(f"no handler for job type {jtype!r}", code="unknown_job_type")
        jr: JobRun[Any] = JobRun(ctx, job_id, attempt, jtype, parse_params(jtype, row), created_by, work)
        work.mkdir(parents=True, exist_ok=True)
        with _Heartbeat(jr, max(0.5, ctx.settings.job_stale_seconds / 4)):
            if ctx.settings.job_start_delay:
                time.sleep(ctx.settings.job_start_delay)
            result = fn(jr)
            if not jr.completed:
                with ctx.db.write() as s:
                    jr.complete(s, result)
        log.info("job %s (%s) attempt %s succeeded in %.1fs", job_id, jtype, attempt, time.monotonic() - started)
        return "succeeded"
    except jobs.JobSuperseded:
        log.warning("job %s attempt %s was superseded by another attempt", job_id, attempt)
        return "superseded"
    except jobs.RetryLater as e:
        return jobs.fail(ctx, job_id, attempt, {"code": "retry", "message": str(e), "details": {}}, e.delay)
    except BaseException as e:  # noqa: BLE001 - every failure is recorded on the job
        from ..weights.errors import WeightsError

        final = isinstance(e, RegistryError | WeightsError)
        if not final:
            log.exception("job %s (%s) attempt %s crashed", job_id, jtype, attempt)
        state = jobs.fail(ctx, job_id, attempt, _error(e), None if final else backoff(attempt))
        if jr.mlflow_run_id is not None:  # the failed attempt's run (FAILED, with the error) is the job's
            _record_run(ctx, job_id, attempt, jr.mlflow_run_id)
        if not isinstance(e, Exception):
            raise
        return state
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _record_run(ctx: RegistryContext, job_id: int, attempt: int, mlflow_run_id: str) -> None:
    try:
        with ctx.db.write() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.attempts == attempt).values(mlflow_run_id=mlflow_run_id))
    except Exception:  # the failure itself is recorded; the link to its run is a convenience
        log.warning("could not record MLflow run %s on job %s", mlflow_run_id, job_id, exc_info=True)


_loaded = False


def load_handler(job_type: str) -> Handler:
    """The handler :data:`registry.services.jobtypes.JOB_TYPES` names for ``job_type``."""
    import importlib

    module, _, name = JOB_TYPES[job_type].handler.partition(":")
    fn: Handler = getattr(importlib.import_module(module), name)
    return fn


def _load_handlers(ctx: RegistryContext) -> None:
    """Import every job type's handler (kept lazy: their modules import torch, mlflow...) and
    size torch's CPU thread pool (``REGISTRY_TORCH_THREADS``)."""
    global _loaded
    if _loaded:
        return
    from ..weights.device import set_cpu_threads

    set_cpu_threads(ctx.settings.torch_threads)
    for job_type in JOB_TYPES:
        HANDLERS[job_type] = load_handler(job_type)
    _loaded = True
