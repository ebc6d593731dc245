"""The runtime context every service function receives: settings, database, blob store, staging."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings, get_settings
from ..db import Database, upgrade
from ..storage import BlobStore, StagingArea, open_store


@dataclass
class RegistryContext:
    settings: Settings
    db: Database
    store: BlobStore
    staging: StagingArea
    # Sends a job id to the broker (queue name -> task id). Set by processes that can reach the
    # broker (API, dispatcher); None elsewhere: the dispatcher then sends queued jobs.
    job_sender: Callable[[int, str], str] | None = None

    @classmethod
    def open(cls, settings: Settings | None = None, *, migrate: bool = False) -> RegistryContext:
        settings = settings or get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        if migrate:
            upgrade(url)
        return cls(
            settings=settings,
            db=Database(url),
            store=open_store(settings),
            staging=StagingArea(settings.resolved_staging_dir),
        )

    def close(self) -> None:
        self.db.dispose()
