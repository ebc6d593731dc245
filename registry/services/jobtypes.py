"""The job types: for each, the parameters that cross the job boundary, the queue it runs on,
and its handler. :data:`JOB_TYPES` is the one table; :func:`registry.services.jobs.create`
refuses a type or parameters it does not describe, and the runner parses a job's parameters with
the same model before the handler sees them.

A job row keeps its parameters as JSON: the fields its creator set (``exclude_unset``), under
the field names below. A field a row leaves out reads as its default, so rows written before a
field existed still run; renaming a field would strand queued rows of the old name.

Adding a job type: a :class:`JobParams` subclass here, a row in :data:`JOB_TYPES` naming the
handler (``module:function``, taking a :class:`registry.services.runner.JobRun` and returning the
job's result), and callers that create it with an instance of the params model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import InvalidInput


class JobParams(BaseModel):
    """What a job type's handler needs, written by whoever creates the job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_row(self) -> dict[str, Any]:
        """The JSON kept in the job row: the fields set when the parameters were made."""
        return self.model_dump(mode="json", exclude_unset=True)


def _exactly_one(params: JobParams, a: str, b: str, job: str) -> None:
    if (getattr(params, a) is None) == (getattr(params, b) is None):
        raise ValueError(f"a {job} job takes exactly one of {a} or {b}")


class BasisQuery(JobParams):
    """A collection named by a query, resolved when the job runs: the live, ready adapters pinned
    to ``base`` that carry ``tags`` (a tag whose value is None matches any value)."""

    base: str
    tags: dict[str, str | None] = {}


class BasisParams(JobParams):
    """An RMM basis over ``members`` (refs), or over the adapters ``query`` finds when the job runs
    (a refresh_basis policy)."""

    members: list[str] | None = None
    query: BasisQuery | None = None
    p: int | None = None
    max_error: float | None = None
    name: str | None = None
    collection: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BasisParams:
        _exactly_one(self, "members", "query", "basis")
        return self


class TransferParams(JobParams):
    finetune: str
    target_base: str
    alpha: float = 1.0
    storage: Literal["stored", "derived"] = "stored"


class MergeParams(JobParams):
    method: str
    inputs: list[str]
    name: str
    params: dict[str, Any] = {}
    rank: int | None = None


class PruneParams(JobParams):
    """Members of an RMM basis (``basis_id``) or of a compression plan (``compression_id``) within
    ``max_error`` give up their own blobs."""

    basis_id: int | None = None
    compression_id: int | None = None
    max_error: float

    @model_validator(mode="after")
    def _one_source(self) -> PruneParams:
        _exactly_one(self, "basis_id", "compression_id", "prune")
        return self


class CompressParams(JobParams):
    """A compression plan over ``members`` (refs), or over the collection ``query`` finds when the
    job runs (a compress_collection policy); ``prune``: the members then give up their own blobs
    (a prune job queued when the plan is recorded)."""

    members: list[str] | None = None
    query: BasisQuery | None = None
    max_error: float
    methods: list[str] | None = None
    name: str | None = None
    collection: str | None = None
    prune: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> CompressParams:
        _exactly_one(self, "members", "query", "compress")
        return self


class VerifyParams(JobParams):
    version_id: int
    ref: str | None = None


class PackParams(JobParams):
    version_id: int
    ref: str | None = None


class MlflowSyncParams(JobParams):
    version_id: int


class WebhookParams(JobParams):
    """A delivery to make; ``webhook_id`` and ``event_id`` tell a reused delivery id apart."""

    delivery_id: int
    webhook_id: int | None = None
    event_id: int | None = None


@dataclass(frozen=True)
class JobType:
    params: type[JobParams]
    # True: the math queue (``gpu`` when GPU workers are configured, else ``cpu``); False: ``cpu``
    math: bool
    # "module:function", imported when a worker first runs jobs (these modules import torch, mlflow)
    handler: str


JOB_TYPES: dict[str, JobType] = {
    "basis": JobType(BasisParams, math=True, handler="registry.services.bases:compute_basis"),
    "transfer": JobType(TransferParams, math=True, handler="registry.services.transfers:compute_transfer"),
    "merge": JobType(MergeParams, math=True, handler="registry.services.merges:compute_merge"),
    "prune": JobType(PruneParams, math=True, handler="registry.services.pruning:prune"),
    "compress": JobType(CompressParams, math=True, handler="registry.services.compressions:compress"),
    "verify": JobType(VerifyParams, math=False, handler="registry.services.verify:verify"),
    "pack": JobType(PackParams, math=False, handler="registry.services.packing:pack_job"),
    "mlflow_sync": JobType(MlflowSyncParams, math=False, handler="registry.services.provenance:sync_version"),
    "webhook": JobType(WebhookParams, math=False, handler="registry.services.webhooks:deliver"),
}


def type_of(params: JobParams) -> str:
    """The job type whose parameters ``params`` are."""
    for name, jt in JOB_TYPES.items():
        if type(params) is jt.params:
            return name
    raise InvalidInput(f"{type(params).__name__} is not the parameters of a job type", code="invalid_job_type")


def job_type(name: str) -> JobType:
    jt = JOB_TYPES.get(name)
    if jt is None:
        raise InvalidInput(f"unknown job type {name!r}", code="invalid_job_type")
    return jt


def parse_params(name: str, row: dict[str, Any]) -> JobParams:
    """A job row's parameters as its type's model (422 ``invalid_job_params`` if they do not fit)."""
    try:
        return job_type(name).params.model_validate(row)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors())
        raise InvalidInput(f"parameters of a {name} job do not fit its type: {problems}", code="invalid_job_params",
                           details={"job_type": name}) from None
