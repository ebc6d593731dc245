"""Provenance in MLflow for every version: the dispatcher turns the events of :data:`SYNC_EVENTS`
(created, promoted, archived, pruned, tags and aliases changed) into ``mlflow_sync`` jobs, which
register or refresh the version in the MLflow Model Registry: status, storage mode, parents, tags
and aliases. See :mod:`registry.provenance`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import Session

from ..config import Settings
from ..models import Event, Job, ModelVersion
from . import jobs
from .dispatcher import subscriber
from .jobtypes import MlflowSyncParams
from .runner import JobRun
from .views import version_view

# Everything the MLflow mirror shows of a version: its existence, status, storage mode and parents
# (prune), tags and aliases.
SYNC_EVENTS = ("version.created", "version.promoted", "version.archived", "version.pruned", "version.tags_set",
               "version.tag_deleted", "alias.set", "alias.deleted")


@subscriber
def on_event(s: Session, ev: Event, settings: Settings) -> list[Job]:
    if ev.type not in SYNC_EVENTS or ev.version_id is None:
        return []
    job, created = jobs.create(s, MlflowSyncParams(version_id=ev.version_id), settings=settings,
                               idempotency_key=f"mlflow_sync:event:{ev.id}", event_id=ev.id, max_attempts=10)
    return [job] if created else []


def sync_version(run: JobRun[MlflowSyncParams]) -> dict[str, Any]:
    """The ``mlflow_sync`` job."""
    from ..provenance import Provenance

    with run.ctx.db.read() as s:
        v = s.get(ModelVersion, run.params.version_id)
        if v is None:
            return {"skipped": "version no longer exists"}
        view = asdict(version_view(s, v, with_files=False))
    name, number = Provenance(run.ctx.settings).register_version(view)
    return {"mlflow_model": name, "mlflow_version": number, "ref": view["ref"]}
