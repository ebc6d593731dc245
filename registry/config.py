"""Settings, from environment variables ``REGISTRY_*`` (and a ``.env`` file), with embedded defaults.

Everything else reads configuration through :func:`get_settings`; nothing reads ``os.environ``
for ``REGISTRY_*`` directly (the one exception is :mod:`registry.weights.device`, which honours
``REGISTRY_DEVICE`` so the library behaves the same outside the service).

Embedded default: everything lives under ``REGISTRY_HOME`` (``./.registry``): a SQLite database,
a local blob directory, an upload staging directory, and (with the workers) the MLflow store.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REGISTRY_", env_file=".env", extra="ignore")

    home: Path = Field(Path(".registry"), description="Data directory of the embedded default.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///$REGISTRY_HOME/registry.db"
    )

    storage: Literal["local", "s3"] = Field("local", description="Blob store backend.")
    blob_dir: Path | None = Field(None, description="Local blob directory; default $REGISTRY_HOME/blobs")
    staging_dir: Path | None = Field(
        None, description="Upload staging directory; default $REGISTRY_HOME/staging"
    )
    s3_bucket: str | None = None
    s3_prefix: str = "blobs/"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    host: str = "127.0.0.1"
    port: int = 8080
    url: str | None = Field(None, description="Server URL used by the CLI and client.")
    token: str | None = Field(None, description="Bearer token used by the CLI and client.")
    client_retry_seconds: float = Field(
        120.0, ge=0, description="How long the CLI and client keep retrying an unreachable server (connection "
        "errors, 502/503/504) before giving up, per outage; 0 disables retries."
    )
    api_workers: int = Field(1, ge=1, description="API server processes `registry up` runs (uvicorn workers).")
    auth: Literal["off", "required"] = Field(
        "off", description="'off' is only allowed when the server binds to a loopback address."
    )

    max_header_bytes: int = Field(16 * 1024 * 1024, description="Largest safetensors header accepted.")
    max_file_bytes: int = Field(1 << 40, description="Largest single file accepted.")
    check_finite: Literal["all", "adapters", "off"] = Field(
        "all", description="Scan floating tensors for NaN/Inf at ingest."
    )
    max_tags: int = Field(256, ge=0, description="Most tags one model or one version may hold.")
    max_tag_bytes: int = Field(
        64 * 1024, ge=0, description="Most bytes (UTF-8 keys + values) of the tags of one model or version."
    )
    max_json_body_bytes: int = Field(
        1 << 20, ge=1, description="Largest JSON request body (413 above it); file uploads have their own limit."
    )
    body_timeout_seconds: float = Field(
        60.0, gt=0, description="A streamed upload that sends nothing for this long is refused (408)."
    )
    draft_ttl_seconds: int = Field(24 * 3600, description="Unfinished pushes older than this are removed by gc.")
    gc_grace_seconds: int = Field(3600, description="gc never removes blobs younger than this.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(
        0, ge=0, description="torch CPU threads per worker / API process; 0 = auto (half the cores, at least 1)."
    )

    # Workers and automation
    broker_url: str | None = Field(
        None, description="Celery broker; default sqla+sqlite:///$REGISTRY_HOME/broker.db (no server)."
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; default db+sqlite:///$REGISTRY_HOME/celery-results.db."
    )
    gpu_workers: bool = Field(False, description="Send weight math to the 'gpu' queue (GPU workers run it).")
    broker_visibility_timeout: int = Field(
        3600, description="Redis: seconds before an unacknowledged task is redelivered."
    )
    job_stale_seconds: int = Field(60, description="A running job whose heartbeat is older is re-queued.")
    job_max_attempts: int = 3
    dispatch_interval: float = Field(1.0, description="Seconds between dispatcher passes.")
    embedded_workers: int = Field(1, description="Workers `registry up` starts beside the API.")
    embedded_dispatcher: bool = Field(True, description="Whether `registry up` starts the dispatcher.")
    work_dir: Path | None = Field(None, description="Scratch space for jobs; default $REGISTRY_HOME/work")
    job_start_delay: float = Field(
        0.0, description="Seconds a worker waits after claiming a job (fault injection for crash drills)."
    )

    # Packed storage
    pack: Literal["auto", "off"] = Field(
        "auto", description="auto: a worker packs every new version losslessly (tensor-level deduplication, "
        "delta against its base or previous version, zstd) and releases the raw bytes once the packed form "
        "reads back byte-exact; off: files stay as uploaded (`registry pack` still packs on request).")

    # Derived versions and format views
    cache_dir: Path | None = Field(None, description="Cache of generated files; default $REGISTRY_HOME/cache")
    derived_cache_bytes: int = Field(20 << 30, description="Size limit of the generated-file cache (0: no cache).")
    merged_shard_bytes: int = Field(5 << 30, description="Largest shard of a 'merged' format download.")
    prune_budget: float | None = Field(
        None, description="Default error budget for pruning basis members (unset: never prune unless asked)."
    )
    verify_interval_seconds: int = Field(0, description="Re-verify one version's checksums this often (0: off).")
    verify_reads: bool = Field(
        True, description="Hash every whole-file download as it streams and cut the response if the stored bytes "
        "do not match their sha256 (the version is then marked corrupt).")

    # Provenance
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI; default sqlite:///$REGISTRY_HOME/mlflow.db."
    )
    mlflow_ui: bool = Field(True, description="Whether `registry up` starts the MLflow UI.")
    mlflow_ui_port: int = 5000
    mlflow_ui_url: str | None = Field(
        None, description="The MLflow UI's address as a browser reaches it (the web UI links runs there); default: "
        "the tracking URI when it is http(s), else http://127.0.0.1:$REGISTRY_MLFLOW_UI_PORT.")
    public_url: str | None = Field(None, description="The registry's URL as MLflow and webhooks should show it.")

    # Webhooks
    webhook_allow_private: bool = Field(
        False, description="Allow webhook targets on loopback/private networks (off: refused, against SSRF)."
    )
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_seconds: float = Field(2.0, description="First retry delay; doubles each attempt (max 1 h).")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'registry.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.home / "blobs").resolve()

    @property
    def resolved_staging_dir(self) -> Path:
        return (self.staging_dir or self.home / "staging").resolve()

    def env_for(self, *fields: str) -> dict[str, str]:
        """``REGISTRY_*`` variables carrying these settings' current values to a child process (what
        ``registry up --port 8282`` hands its workers, so the URLs they publish are the real ones)."""
        return {f"REGISTRY_{f.upper()}": str(getattr(self, f)) for f in fields}

    @property
    def client_url(self) -> str:
        return self.url or f"http://{self.host}:{self.port}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.home / 'broker.db').resolve()}"

    @property
    def resolved_result_backend(self) -> str:
        return self.result_backend or f"db+sqlite:///{(self.home / 'celery-results.db').resolve()}"

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def resolved_mlflow_ui_url(self) -> str:
        uri = self.resolved_mlflow_uri
        default = uri if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{self.mlflow_ui_port}"
        return (self.mlflow_ui_url or default).rstrip("/")

    @property
    def mlflow_artifact_root(self) -> str:
        return (self.home / "mlartifacts").resolve().as_uri()

    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.home / "cache").resolve()

    @property
    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "work").resolve()

    @property
    def resolved_public_url(self) -> str:
        return (self.public_url or self.client_url).rstrip("/")

    @property
    def math_queue(self) -> str:
        return "gpu" if self.gpu_workers else "cpu"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
