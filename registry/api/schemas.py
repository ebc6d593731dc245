"""Request and response bodies (pydantic), distinct from the ORM classes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ORM(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileOut(ORM):
    path: str
    sha256: str
    size: int


class ParentOut(ORM):
    ref: str
    relation: str
    params: dict[str, Any]


class VersionOut(ORM):
    id: int
    model: str
    version: int
    ref: str
    kind: str
    status: str
    storage_mode: str
    base: str | None
    fingerprint: str | None
    content_sha256: str
    size: int
    file_count: int
    description: str
    summary: dict[str, Any]
    tags: dict[str, str]
    aliases: list[str]
    parents: list[ParentOut]
    mlflow_run_id: str | None
    created_at: datetime
    created_by: str | None
    archived: bool
    archived_at: datetime | None
    corrupt: bool = False
    stored_bytes: int = Field(0, description="Physical bytes this version added to the store: objects shared "
                              "with other versions count once, at the version that first stored them.")
    files: list[FileOut] | None = None


class VersionPage(BaseModel):
    items: list[VersionOut]
    next_cursor: str | None


class ModelOut(ORM):
    id: int
    name: str
    kind: str
    description: str
    tags: dict[str, str]
    latest_version: int | None
    version_count: int
    aliases: dict[str, int]
    created_at: datetime | None
    created_by: str | None


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None


class ModelCreate(BaseModel):
    name: str
    kind: str
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)


class ModelUpdate(BaseModel):
    description: str | None = None


class ParentIn(BaseModel):
    ref: str
    relation: str = "merge_of"
    params: dict[str, Any] = Field(default_factory=dict)


class VersionSpec(BaseModel):
    """What a new version says about itself, however its bytes arrive (a draft or a manifest)."""

    kind: str | None = None
    base: str | None = Field(None, description="Ref of the base version an adapter/fine-tune is pinned to.")
    tags: dict[str, str] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    parents: list[ParentIn] = Field(default_factory=list)


class DraftCreate(VersionSpec):
    model: str


class ManifestFile(BaseModel):
    path: str
    sha256: str
    size: int | None = Field(None, description="Checked against the held bytes when given.")


class VersionCreate(VersionSpec):
    """A version made in one request from bytes the registry already holds."""

    files: list[ManifestFile]


class DraftFileOut(BaseModel):
    path: str
    sha256: str
    size: int
    deduplicated: bool = False


class DraftOut(BaseModel):
    id: str
    model: str
    kind: str | None
    base: str | None
    tags: dict[str, str]
    aliases: list[str]
    description: str
    parents: list[ParentIn]
    files: list[FileOut]
    created_at: datetime


class LinkFile(BaseModel):
    path: str
    sha256: str
    size: int | None = None


class ProbeFile(BaseModel):
    size: int
    sample: str  # hex sha256: registry.formats.inspect.sample_digest of the file


class ProbeOut(BaseModel):
    maybe_held: bool  # false: certainly new bytes (upload them); true: hash the file and link it
    candidates: int  # stored files of this size that were compared


class UploadCreate(BaseModel):
    path: str
    size: int | None = None


class UploadOut(BaseModel):
    id: str
    draft: str
    path: str
    size: int | None
    received: int


class UploadCommit(BaseModel):
    sha256: str


class AliasSet(BaseModel):
    version: str = Field(description="Version number, or a ref of the same model.")


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int
    ref: str


class TagsSet(BaseModel):
    tags: dict[str, str]


class TagValue(BaseModel):
    value: str


class LineageNode(BaseModel):
    id: int
    ref: str
    model: str
    version: int
    kind: str
    status: str
    storage_mode: str
    archived: bool


class LineageEdgeOut(BaseModel):
    child: str
    parent: str
    relation: str
    params: dict[str, Any]


class LineageOut(BaseModel):
    root: str
    nodes: list[LineageNode]
    edges: list[LineageEdgeOut]
    truncated: bool


class TokenCreate(BaseModel):
    name: str
    scope: str = "read"
    expires_days: int | None = None


class TokenOut(BaseModel):
    id: int
    name: str
    scope: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked: bool
    last_used_at: datetime | None
    token: str | None = Field(None, description="The secret; only in the response that creates it.")


# --------------------------------------------------------------------------- jobs, bases, policies
# (the response bodies of every operation: registry.client parses its results with these models)


class JobOut(BaseModel):
    id: int
    type: str
    state: str
    queue: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    progress: float
    message: str
    attempts: int
    max_attempts: int
    idempotency_key: str | None
    celery_task_id: str | None
    worker: str | None
    mlflow_run_id: str | None
    event_id: int | None
    policy_id: int | None
    created_by: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class BasisMemberOut(BaseModel):
    position: int
    ref: str
    error: float | None
    module_errors: dict[str, Any] | None = None


class BasisOut(BaseModel):
    id: int
    collection: str | None
    method: str
    status: str
    p: int | None
    max_error: float | None
    storage_ratio: float | None
    summary: dict[str, Any] | None
    job_id: int | None
    mlflow_run_id: str | None
    created_at: datetime | None
    ref: str | None
    base: str | None
    members: list[BasisMemberOut]


class PolicyOut(BaseModel):
    id: int
    name: str
    type: str
    base_model: str
    params: dict[str, Any]
    active: bool
    created_at: datetime | None
    created_by: str | None


# --------------------------------------------------------------------------- webhooks


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str]
    active: bool
    description: str
    signature_scheme: str = Field("registry", description="registry or standard-webhooks.")
    created_at: datetime | None
    created_by: str | None


class WebhookCreated(WebhookOut):
    secret: str = Field(description="The signing secret; shown only in this response.")


class DeliveryOut(BaseModel):
    id: int
    webhook_id: int
    event_id: int
    event_type: str | None
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime | None
    delivered_at: datetime | None


class DeliveryDetail(DeliveryOut):
    log: list[dict[str, Any]]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None


class RedeliveryOut(BaseModel):
    delivery: DeliveryOut
    job: JobOut


# --------------------------------------------------------------------------- system, compatibility


class HealthOut(BaseModel):
    status: str
    version: str
    database: str
    storage: str
    auth: str


class EventOut(BaseModel):
    id: int
    type: str
    model: str | None
    version_id: int | None
    payload: dict[str, Any] | None
    created_at: datetime | None


class EventPage(BaseModel):
    items: list[EventOut]


class ModelStorageOut(BaseModel):
    model: str
    versions: int
    logical_bytes: int
    stored_bytes: int
    ratio: float


class StorageTotalOut(BaseModel):
    logical_bytes: int
    stored_bytes: int
    ratio: float
    objects: int
    object_bytes: int
    packed_files: int
    chunks: int
    chunk_bytes: int


class StorageOut(BaseModel):
    models: list[ModelStorageOut]
    total: StorageTotalOut
    pack: str


class PredictionsOut(BaseModel):
    ref: str
    dataset: str
    kind: str
    count: int
    created_at: datetime | None = None


class CompatOut(BaseModel):
    old: str
    new: str
    dataset: str
    kind: str
    metrics: dict[str, Any]


class UpdateReportOut(BaseModel):
    """One update a version takes part in (old -> new on a dataset): the MUSCLE metrics, or why the
    two prediction sets cannot be compared (``error``)."""

    old: str
    new: str
    dataset: str
    new_status: str
    kind: str | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None


# --------------------------------------------------------------------------- compression plans


class CompressionMemberOut(BaseModel):
    position: int
    ref: str | None
    method: str
    parameters: dict[str, Any]
    stored_bytes: int
    original_bytes: int
    error: float
    served_error: float
    prunable: bool
    pruned: bool


class CompressionOut(BaseModel):
    id: int
    collection: str | None
    ref: str | None
    base: str | None
    max_error: float
    methods: list[str]
    stored_bytes: int
    original_bytes: int
    ratio: float
    summary: dict[str, Any] | None
    job_id: int | None
    mlflow_run_id: str | None
    created_at: datetime | None
    created_by: str | None
    members: list[CompressionMemberOut]
