"""The Celery application.

Production: Redis broker and result backend (``REGISTRY_BROKER_URL=redis://...``). Embedded
default: kombu's SQLAlchemy transport on a SQLite file under ``REGISTRY_HOME`` (no server).
Queues: ``cpu`` and ``gpu`` (weight math goes to ``gpu`` when ``REGISTRY_GPU_WORKERS=true``).

Tasks carry only a job id; the job row in the registry database is the truth (see
:mod:`registry.services.jobs`). ``acks_late`` + ``reject_on_worker_lost``: a message is
acknowledged only after the job ran, so a killed worker's job is delivered again; the
dispatcher also re-queues jobs whose heartbeat stopped, for brokers that do not redeliver.
"""

from __future__ import annotations

import threading
import time

from celery import Celery
from kombu import Queue

from registry.config import Settings, get_settings

TASK_NAME = "registry.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("registry", broker=settings.resolved_broker_url, backend=settings.resolved_result_backend,
                 include=["workers.tasks"])
    if settings.resolved_broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its options to create_engine: wait on SQLite locks.
        transport_options: dict[str, object] = {"connect_args": {"timeout": 30}}
    else:
        transport_options = {"visibility_timeout": settings.broker_visibility_timeout}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="cpu",
        task_queues=(Queue("cpu"), Queue("gpu")),
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


celery_app = make_celery(get_settings())

_prepared = threading.Event()
_prepare_lock = threading.Lock()
PREPARE_TRIES = 5


def prepare_broker(app: Celery = celery_app) -> None:
    """Declare the registry's queues once in this process, before a worker consumes or a job is sent.

    kombu's SQLAlchemy transport (the embedded broker) creates its tables and queue rows on first
    use with a check-then-insert that is safe between threads but not between processes: a worker,
    a second worker and the dispatcher starting together on a fresh ``broker.db`` collide ("table
    kombu_queue already exists", "UNIQUE constraint failed: kombu_queue.name") and the loser's
    consumer never received a job. A collision means another process has just created what we
    wanted, so a fresh connection's second try finds it; every later declare is then a lookup.
    Redis declares are idempotent and take one try."""
    if _prepared.is_set():
        return
    from sqlalchemy.exc import SQLAlchemyError

    with _prepare_lock:
        for attempt in range(1, PREPARE_TRIES + 1):
            if _prepared.is_set():
                return
            try:
                with app.connection_for_write() as conn:
                    channel = conn.default_channel
                    for queue in app.conf.task_queues:
                        queue.bind(channel).declare()
                _prepared.set()
            except SQLAlchemyError:
                if attempt == PREPARE_TRIES:
                    raise
                time.sleep(0.05 * attempt)


def send_job(job_id: int, queue: str) -> str:
    """Put a job on the broker; returns the Celery task id."""
    prepare_broker()
    return str(celery_app.send_task(TASK_NAME, args=[job_id], queue=queue).id)
