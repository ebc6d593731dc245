"""The registry's relational schema (SQLAlchemy 2 typed ORM).

The schema changes only through Alembic migrations (``migrations/versions``); this module is the
source they are written against. Constraints and indexes are named explicitly so migrations can
refer to them on every backend.

Hot queries and the index serving each:
- latest ready version of a model: ``ix_versions_model_status_version``
- search by tag (``EXISTS`` per tag, never ``HAVING count``): ``ix_version_tags_key_value``
- versions pinned to a base: ``ix_versions_base``; lineage walks: ``ix_lineage_parent``/``child``
- keyset pagination over versions: primary key (``id`` descending)
- gc reference checks: ``ix_version_files_blob``
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class ModelKind(enum.StrEnum):
    base = "base"
    adapter = "adapter"
    finetune = "finetune"
    merge = "merge"


class VersionStatus(enum.StrEnum):
    pending = "pending"
    ready = "ready"
    failed = "failed"
    candidate = "candidate"


class StorageMode(enum.StrEnum):
    stored = "stored"  # the version's files are blobs
    derived_basis = "derived:basis"  # an adapter rebuilt from an RMM basis (its coefficients)
    derived_diff = "derived:diff"  # a transfer rebuilt as target base + alpha * (fine-tune - source base)
    derived_plan = "derived:plan"  # an adapter rebuilt from a compression plan (its member blob)


class Relation(enum.StrEnum):
    adapter_of = "adapter_of"
    finetune_of = "finetune_of"
    merge_of = "merge_of"
    transfer_of = "transfer_of"
    basis_member_of = "basis_member_of"
    quantized_of = "quantized_of"
    plan_member_of = "plan_member_of"


# Relations of a member to the version holding a collection's shared file (an RMM basis, a
# compression plan): the member depends on it only once it gave up its own blobs.
MEMBERSHIP_RELATIONS = (Relation.basis_member_of.value, Relation.plan_member_of.value)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text, default="")
    # Last version number handed out; bumped with an atomic UPDATE ... RETURNING in the same
    # transaction that inserts the version, so concurrent pushes get consecutive numbers.
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))

    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model", lazy="raise_on_sql")
    tags: Mapped[list[ModelTag]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="ModelTag.key"
    )

    __table_args__ = (CheckConstraint("kind in ('base','adapter','finetune','merge')", name="kind"),)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.ready.value)
    storage_mode: Mapped[str] = mapped_column(String(16), default=StorageMode.stored.value)
    # The base version this adapter/fine-tune is pinned to (also a lineage edge).
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    content_sha256: Mapped[str] = mapped_column(String(64))
    total_size: Mapped[int] = mapped_column(BigInteger, default=0)
    file_count: Mapped[int] = mapped_column(Integer, default=0)
    description: Mapped[str] = mapped_column(Text, default="")
    # Summary of what was ingested (tensor count, parameter count, adapter rank, modules, ...).
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Tensor name -> [dtype, shape, file]; large, so loaded only when asked for.
    tensor_index: Mapped[dict[str, Any]] = deferred(mapped_column(JSON, default=dict))
    # For derived versions: how to rebuild them (basis + coefficients, base + diff).
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))
    archived_at: Mapped[datetime | None] = mapped_column()
    verified_at: Mapped[datetime | None] = mapped_column()
    # Set when a read or a verify found its stored bytes missing or wrong; cleared by a verify that passes.
    corrupt_at: Mapped[datetime | None] = mapped_column()
    # Physical bytes this version added to the store: objects shared with other versions count
    # once, at the version that first stored them (updated when the version is packed).
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)

    model: Mapped[Model] = relationship(back_populates="versions", lazy="joined", innerjoin=True)
    base_version: Mapped[ModelVersion | None] = relationship(remote_side=[id], lazy="raise_on_sql")
    files: Mapped[list[VersionFile]] = relationship(
        cascade="all, delete-orphan", lazy="raise_on_sql", order_by="VersionFile.path"
    )
    tags: Mapped[list[VersionTag]] = relationship(
        cascade="all, delete-orphan", lazy="raise_on_sql", order_by="VersionTag.key"
    )

    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
        Index("ix_versions_model_status_version", "model_id", "status", "version"),
        Index("ix_versions_base", "base_version_id"),
        Index("ix_versions_content", "model_id", "content_sha256"),
        Index("ix_versions_kind_id", "kind", "id"),
        CheckConstraint("version > 0", name="version_positive"),
        CheckConstraint("status in ('pending','ready','failed','candidate')", name="status"),
        CheckConstraint("storage_mode in ('stored','derived:basis','derived:diff','derived:plan')",
                        name="storage_mode"),
    )

    @property
    def ref(self) -> str:
        return f"{self.model.name}@{self.version}"


class BlobState(enum.StrEnum):
    pending = "pending"  # claimed by a draft: the bytes are staged or being moved into the store
    ready = "ready"  # the bytes are in the blob store, fsynced and verified
    deleting = "deleting"  # gc owns it: nobody may claim it until gc removes the object and the row


class BlobForm(enum.StrEnum):
    raw = "raw"
    packed = "packed"


class Blob(Base):
    """A content-addressed file in the blob store, and the claim that keeps its bytes alive.

    The row exists *before* the bytes move into the store (``pending``, claimed by a draft) and gc
    only deletes an object after it has atomically turned the row into ``deleting`` (or inserted
    one for an object with no row), which it can do only while nothing references the row and no
    claim touched it within the grace period. See :mod:`registry.services.blobs`."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default=BlobState.ready.value)
    # Last time a draft, a commit or a link claimed the row; gc leaves younger rows alone.
    touched_at: Mapped[datetime] = mapped_column(default=utcnow)
    # How the bytes are kept: ``raw`` (the object under this sha256 is the file) or ``packed``
    # (the file is the concatenation of its :class:`BlobSegment` chunks; see
    # :mod:`registry.services.packing`).
    form: Mapped[str] = mapped_column(String(8), default=BlobForm.raw.value)
    packed_at: Mapped[datetime | None] = mapped_column()
    # Bytes the store holds under this sha256 right now (0 once a packed file's raw object is released).
    stored_size: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        CheckConstraint("state in ('pending','ready','deleting')", name="state"),
        CheckConstraint("form in ('raw','packed')", name="form"),
    )


class Chunk(Base):
    """A run of bytes (a tensor, a frame of a large tensor, a header) kept once, whatever file,
    shard or version it appears in: addressed by the sha256 of its raw bytes, held in the store as
    a coded payload (its own blob row), possibly as its XOR with a reference chunk that must then
    stay alive (the foreign key refuses to remove it while this row exists)."""

    __tablename__ = "chunks"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    object_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256", ondelete="RESTRICT"))
    ref_sha256: Mapped[str | None] = mapped_column(ForeignKey("chunks.sha256", ondelete="RESTRICT"))
    depth: Mapped[int] = mapped_column(Integer, default=0)  # length of the reference chain below it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_chunks_object", "object_sha256"),
        Index("ix_chunks_ref", "ref_sha256"),
    )


class BlobSegment(Base):
    """Bytes ``[offset, offset + length)`` of a packed file are chunk ``chunk_sha256``. ``key``
    names a tensor frame (name, dtype, shape, frame) so a later version can code its own
    tensor of the same key against this chunk."""

    __tablename__ = "blob_segments"

    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256", ondelete="CASCADE"), primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    length: Mapped[int] = mapped_column(BigInteger)
    chunk_sha256: Mapped[str] = mapped_column(ForeignKey("chunks.sha256", ondelete="RESTRICT"))
    key: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_blob_segments_chunk", "chunk_sha256"),)


class VersionFile(Base):
    """One entry of a version's manifest: a relative path and the blob holding its bytes."""

    __tablename__ = "version_files"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256", ondelete="RESTRICT"))
    size: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_version_files_blob", "blob_sha256"),)


class DerivedFile(Base):
    """A file the server generates on request instead of storing: a derived version's weights
    (``format`` "native"), or a format view of any version ("delta", "merged"). Its sha256 and
    size are computed once, when the file is first defined, and served as ETag and checksum."""

    __tablename__ = "derived_files"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    format: Mapped[str] = mapped_column(String(16), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelTag(Base):
    __tablename__ = "model_tags"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024), default="")


class VersionTag(Base):
    __tablename__ = "version_tags"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024), default="")

    __table_args__ = (Index("ix_version_tags_key_value", "key", "value", "version_id"),)


class Alias(Base):
    __tablename__ = "aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_aliases_version", "version_id"),)


class LineageEdge(Base):
    """child --relation--> parent. Multi-parent merges are several edges."""

    __tablename__ = "lineage_edges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    parent_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    relation: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("child_id", "parent_id", "relation", name="uq_lineage_edges_child_parent_relation"),
        Index("ix_lineage_parent", "parent_id"),
        Index("ix_lineage_child", "child_id"),
        CheckConstraint("child_id <> parent_id", name="no_self_edge"),
    )


class ApiToken(Base):
    """A bearer token. Only the sha256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class Draft(Base):
    """An unfinished push: files staged (not yet blobs), metadata for the version to create.

    Nothing in a draft is visible as a version or a blob; commit turns it into both atomically.
    """

    __tablename__ = "drafts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))

    files: Mapped[list[DraftFile]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="DraftFile.path"
    )
    uploads: Mapped[list[UploadSession]] = relationship(cascade="all, delete-orphan", lazy="raise_on_sql")

    __table_args__ = (Index("ix_drafts_created", "created_at"),)


class DraftFile(Base):
    """A file of a draft, fully received and hashed. ``staged`` is False when it links an existing blob."""

    __tablename__ = "draft_files"

    draft_id: Mapped[str] = mapped_column(ForeignKey("drafts.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    staged: Mapped[bool] = mapped_column(default=True)


class UploadSession(Base):
    """A resumable upload of one large file of a draft: chunks at offsets, then commit with sha256."""

    __tablename__ = "upload_sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    draft_id: Mapped[str] = mapped_column(ForeignKey("drafts.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(BigInteger)
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_upload_sessions_draft", "draft_id"),)


class Event(Base):
    """Transactional outbox: written in the same transaction as the change it describes."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(128))
    version_id: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (Index("ix_events_undispatched", "dispatched_at", "id"),)


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Job(Base):
    """One unit of worker work. The row is the truth; Celery only carries the job id.

    A worker claims a job with an atomic UPDATE (queued -> running, attempt + 1) and beats a
    heartbeat while it runs; the dispatcher re-queues jobs whose heartbeat went stale (worker
    killed) and sends queued jobs whose message was never sent or was lost."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued.value)
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    event_id: Mapped[int | None] = mapped_column(Integer)
    policy_id: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column()
    not_before: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        Index("ix_jobs_state_id", "state", "id"),
        Index("ix_jobs_type_id", "type", "id"),
        CheckConstraint("state in ('queued','running','succeeded','failed','cancelled')", name="state"),
    )


class MergeBasis(Base):
    """An RMM basis over adapter versions of one base. Its file (one safetensors holding μ, U_p, C
    per module) is the registry version ``version_id`` (kind ``merge``); members point at that
    version with ``basis_member_of`` lineage edges."""

    __tablename__ = "merge_bases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection: Mapped[str | None] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(32), default="rmm")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    p: Mapped[int | None] = mapped_column(Integer)
    max_error: Mapped[float | None] = mapped_column()
    storage_ratio: Mapped[float | None] = mapped_column()
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[int | None] = mapped_column(Integer)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))

    members: Mapped[list[BasisMember]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="BasisMember.position"
    )

    __table_args__ = (
        Index("ix_merge_bases_collection", "collection", "id"),
        Index("ix_merge_bases_job", "job_id"),
        Index("ix_merge_bases_version", "version_id"),
    )


class BasisMember(Base):
    __tablename__ = "basis_members"

    basis_id: Mapped[int] = mapped_column(ForeignKey("merge_bases.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    error: Mapped[float | None] = mapped_column()
    module_errors: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index("ix_basis_members_version", "version_id"),)


class Compression(Base):
    """A compression plan over adapter versions of one base (:mod:`registry.weights.compress`): per
    member the fewest stored bytes within ``max_error``. Its file (``save_plan`` output, one
    safetensors of uint8 blobs) is the registry version ``version_id`` (kind ``merge``); members
    point at it with ``plan_member_of`` lineage edges."""

    __tablename__ = "compressions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection: Mapped[str | None] = mapped_column(String(128))
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    max_error: Mapped[float] = mapped_column()
    methods: Mapped[list[str]] = mapped_column(JSON, default=list)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # what the plan stores for all members
    original_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # the members' adapter weights files
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[int | None] = mapped_column(Integer)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))

    members: Mapped[list[CompressionMember]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="CompressionMember.position"
    )

    __table_args__ = (
        Index("ix_compressions_collection", "collection", "id"),
        Index("ix_compressions_version", "version_id"),
    )


class CompressionMember(Base):
    """How one member is stored in a plan: ``method``, ``parameters``, ``stored_bytes`` and the
    relative delta ``error`` of its reconstruction (recomputed from the stored plan file), and
    ``served_error``, that of the PEFT files it is served as once pruned."""

    __tablename__ = "compression_members"

    compression_id: Mapped[int] = mapped_column(ForeignKey("compressions.id", ondelete="CASCADE"),
                                                primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"))
    method: Mapped[str] = mapped_column(String(32))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    original_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[float] = mapped_column()
    # The error of the PEFT files the member would be served (registry.weights.peft_delta): the plan's
    # error plus at most a rounding of the factors; a member is pruned only when this is within budget.
    served_error: Mapped[float] = mapped_column()

    __table_args__ = (Index("ix_compression_members_version", "version_id"),)


class Policy(Base):
    """An automation rule evaluated by the dispatcher for every event."""

    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        Index("ix_policies_base_model", "base_model"),
        CheckConstraint("type in ('transfer_on_base_update','refresh_basis','compress_collection')", name="type"),
    )


class Webhook(Base):
    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    secret: Mapped[str] = mapped_column(String(256))
    # how deliveries are signed: "registry" (X-Registry-Signature) or "standard-webhooks"
    # (webhook-id / webhook-timestamp / webhook-signature); services/webhooks.py holds the rule
    signature_scheme: Mapped[str] = mapped_column(String(32), default="registry")
    active: Mapped[bool] = mapped_column(default=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (CheckConstraint("signature_scheme in ('registry','standard-webhooks')",
                                      name="signature_scheme"),)


class WebhookDelivery(Base):
    """One event sent (or to be sent) to one webhook; every attempt is logged in ``log``."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        Index("ix_deliveries_webhook", "webhook_id", "id"),
        Index("ix_deliveries_due", "status", "next_attempt_at"),
    )


class PredictionSet(Base):
    """Predictions of one version on one labelled evaluation set (for MUSCLE compatibility)."""

    __tablename__ = "prediction_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    dataset: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # "classification" or "generative"
    count: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("version_id", "dataset", name="uq_prediction_sets_version_dataset"),
    )
