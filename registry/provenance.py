"""MLflow provenance.

- Every job that works on versions (basis, transfer, merge, prune, verify) is an MLflow **run** in
  the experiment ``registry/<model>``, with params (operation, method, p, α, member refs with their
  content sha256), metrics (errors, storage ratio, duration) and artifacts (``lineage.json``); the
  job and the version it creates store the run id. The run is opened before the job loads its
  inputs, so a failure there leaves a FAILED run with the error.
- Every registry version is also registered in the **MLflow Model Registry** (registered model
  = registry model name) with tags ``registry.ref``, ``registry.sha256``, ``registry.kind``,
  ``registry.parents``, ``registry.status``; its ``source`` is the registry URL of its files, so
  the MLflow UI shows the registry's contents and links each version to the run that made it.

Embedded default: a SQLite store under ``REGISTRY_HOME`` (the UI is started by ``registry up``);
production: ``REGISTRY_MLFLOW_TRACKING_URI=http://mlflow:5000``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Settings

MAX_PARAM = 6000  # MLflow's limit on a param value


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        out[prefix] = json.dumps(value, default=str)[:MAX_PARAM]
    elif value is not None:
        out[prefix] = str(value)[:MAX_PARAM]


@dataclass
class RunHandle:
    client: Any
    run_id: str
    started: float = field(default_factory=time.monotonic)
    finished: bool = False

    def finish(self) -> None:
        """Log the duration and mark the run FINISHED (once). Jobs call this just before they
        publish their output, so a version never becomes visible while its run still says
        RUNNING; if publishing then fails, the run is turned FAILED."""
        if self.finished:
            return
        from mlflow.entities import RunTag

        self.log_metrics({"duration_seconds": time.monotonic() - self.started})
        self.client.log_batch(self.run_id, tags=[RunTag("registry.status", "finished")])
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def fail(self, error: BaseException) -> None:
        """Mark the run FAILED with the error's text (tags ``registry.status`` and ``registry.error``),
        so the MLflow UI says why a job failed, not only that it did."""
        from mlflow.entities import RunTag

        text = f"{type(error).__name__}: {getattr(error, 'message', None) or error}"[:5000]
        try:
            self.client.log_batch(self.run_id, tags=[RunTag("registry.status", "failed"),
                                                     RunTag("registry.error", text)])
        finally:
            self.client.set_terminated(self.run_id, "FAILED")

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 900])

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (nested dicts flattened to ``a.b`` keys, lists as JSON). A job logs what its
        request says when it opens its run, and what it resolved (inputs with their sha256) later."""
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flat("", params, flat)
        items = [Param(k[:250], v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i:i + 90])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _sqlite_lock_path(uri: str, settings: Settings) -> Path:
    """The lock file that serialises set-up of the SQLite store at ``uri``: beside the database
    file, so every process using that file takes the same lock whatever its ``REGISTRY_HOME``
    (workers with their own homes sharing one MLflow file migrated it at once and left it broken)."""
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return settings.home / "mlflow.lock"
    return Path(database).resolve().with_name(Path(database).name + ".lock")


def _mlflow_client(settings: Settings) -> Any:
    """This process's MLflow client for ``settings``' tracking URI, made once (jobs of a worker
    share it; building one per job repeated the store set-up and, for SQLite, the lock)."""
    uri = settings.resolved_mlflow_uri
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(uri)
        if client is not None:
            return client
        from mlflow import MlflowClient

        if not uri.startswith("sqlite:"):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        else:
            # MLflow creates and migrates a SQLite store on first use, already in MlflowClient's
            # constructor (tracking store) and on the first registry call (registry store);
            # several workers doing that at once collide ("duplicate column", then a
            # half-migrated file). So one process at a time, under a file lock, from construction on.
            import fcntl

            lock_path = _sqlite_lock_path(uri, settings)
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                    client.search_experiments(max_results=1)
                    client.search_registered_models(max_results=1)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        _CLIENTS[uri] = client
        return client


# The MLflow UI (3.x) decides from this experiment tag whether an experiment shows training runs
# (model development) or GenAI traces and evaluations.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class Provenance:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uri = settings.resolved_mlflow_uri

    @property
    def client(self) -> Any:
        return _mlflow_client(self.settings)

    def experiment_id(self, model_name: str) -> str:
        """The experiment ``registry/<model>``, created on first use and marked as model
        development, so the MLflow UI lists its runs as training runs (not GenAI evaluations)."""
        name = f"registry/{model_name}"
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older registry
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return str(exp.experiment_id)
        location = None
        if not self.uri.startswith(("http://", "https://", "databricks")):
            location = f"{self.settings.mlflow_artifact_root}/{model_name}"
        try:
            return str(self.client.create_experiment(name, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
        except Exception:  # created concurrently by another worker
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    @contextmanager
    def run(self, model_name: str, run_name: str, params: dict[str, Any],
            tags: dict[str, str] | None = None) -> Iterator[RunHandle]:
        """An MLflow run for one job; FINISHED on success, FAILED on an exception."""
        exp = self.experiment_id(model_name)
        run = self.client.create_run(exp, run_name=run_name, tags={"registry.model": model_name, **(tags or {})})
        handle = RunHandle(self.client, run.info.run_id)
        try:
            handle.log_params(params)
            yield handle
        except BaseException as e:
            handle.fail(e)
            raise
        handle.finish()

    def register_version(self, view: dict[str, Any]) -> tuple[str, str]:
        """Register a registry version (its API view) in the MLflow Model Registry; idempotent:
        a version already registered under the same ref is returned, with its tags refreshed."""
        name, ref = view["model"], view["ref"]
        client = self.client
        try:
            client.create_registered_model(name, tags={"registry.kind": view["kind"]})
        except Exception as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) and "already exists" not in str(e):
                raise
        tags = {
            "registry.ref": ref, "registry.sha256": view["content_sha256"], "registry.kind": view["kind"],
            "registry.status": view["status"], "registry.storage_mode": view["storage_mode"],
            "registry.parents": json.dumps([f"{p['relation']}:{p['ref']}" for p in view["parents"]]),
            "registry.base": view.get("base") or "",
        }
        tags.update({k: str(v) for k, v in (view.get("tags") or {}).items() if not k.startswith("registry.")})
        existing = client.search_model_versions(f"name='{name}' and tags.`registry.ref` = '{ref}'")
        if existing:
            mv = existing[0]
            for k, v in tags.items():
                if mv.tags.get(k) != v:
                    client.set_model_version_tag(name, mv.version, k, v)
            for k in set(mv.tags) - set(tags):  # a user tag deleted in the registry
                if not k.startswith("registry.") and not k.startswith("mlflow."):
                    client.delete_model_version_tag(name, mv.version, k)
        else:
            source = f"{self.settings.resolved_public_url}/api/v1/models/{name}/versions/{view['version']}/files"
            mv = client.create_model_version(name, source=source, run_id=view.get("mlflow_run_id"), tags=tags,
                                             description=view.get("description") or None)
        self._mirror_aliases(name, str(mv.version), view.get("aliases") or [])
        return name, str(mv.version)

    def _mirror_aliases(self, name: str, mlflow_version: str, aliases: list[str]) -> None:
        """The registry's aliases of this version as MLflow aliases of its MLflow version (MLflow moves
        an alias set elsewhere by itself; one the registry removed is removed). Names MLflow refuses
        (it allows letters, digits, ``_`` and ``-`` only) are skipped."""
        client = self.client
        current = {a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == mlflow_version}
        for alias in aliases:
            if alias not in current and re.fullmatch(r"[\w-]+", alias) and not re.fullmatch(r"v\d+", alias):
                client.set_registered_model_alias(name, alias, mlflow_version)
        for alias in current - set(aliases):
            client.delete_registered_model_alias(name, alias)
