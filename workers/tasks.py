"""Celery tasks: thin shells that load a job and run it through the registry's services."""

from __future__ import annotations

from celery import current_task

from registry.services.context import RegistryContext
from registry.services.runner import run

from .app import TASK_NAME, celery_app

_ctx: RegistryContext | None = None


def context() -> RegistryContext:
    global _ctx
    if _ctx is None:
        _ctx = RegistryContext.open()
    return _ctx


@celery_app.task(name=TASK_NAME)
def run_job(job_id: int) -> str:
    return run(context(), job_id, worker=current_task.request.hostname or "worker")
