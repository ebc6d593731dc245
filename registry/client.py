"""Python client for the registry's HTTP API: typed results, one exception per error kind, sync and async.

    from registry.client import AsyncRegistryClient, NotFound, RegistryClient

    with RegistryClient("http://127.0.0.1:8080", token=None) as rc:
        v = rc.push("demo/base", name="demo-base")                  # -> Version(ref="demo-base@1", ...)
        rc.push("demo/adapter-sql", name="sql-lora", base=v.ref)
        rc.pull("sql-lora@1", "out/sql-lora")                        # verifies every sha256
        rc.search_versions(kind="adapter", base="demo-base@1").items

    async with AsyncRegistryClient() as arc:                         # the same methods, awaited
        v = await arc.get_version("sql-lora@1")

Results are pydantic models: the API's own response schemas (``registry.api.schemas``), under the
names below (``Version``, ``Job``, ``Webhook``, …), so the shape of every answer lives in one
place. Errors raise the exceptions of :mod:`registry.client_errors` (re-exported here): all are
:class:`RegistryClientError`; what the server refused is a :class:`RegistryAPIError` chosen by the
status (:class:`NotFound`, :class:`Conflict`, :class:`InvalidInput`, :class:`Unauthorized`,
:class:`Forbidden`, …), a failed job :class:`JobFailed`, an unreachable server
:class:`ServerUnreachable` (``RegistryConnectionError``).

Every method is written once, as a flow of effects (:mod:`registry.transport`) that
:class:`RegistryClient` (``httpx.Client``) and :class:`AsyncRegistryClient` (``httpx.AsyncClient``)
run; pages are iterators (``iter_versions``), async iterators on the async client.

A server that cannot be reached (connection errors, 502/503/504) is retried with exponential backoff
for up to ``retry_seconds`` (``REGISTRY_CLIENT_RETRY_SECONDS``, 120) per outage, with a message on
stderr before each wait. Only what is safe to repeat is repeated: idempotent requests (GET, HEAD,
PUT, DELETE), any request that never reached the server (connection refused), and the steps of a
push and a pull, which resume where they were: chunks of a resumable upload continue at the offset
the server acknowledged, downloads continue their ``.part`` file, a push keeps its draft, and a
commit whose answer was lost is looked up (the draft is gone and a version holds exactly its files)
before it is sent again, so a retried push never makes two versions. 4xx answers are never retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from . import client_io
from .api import schemas
from .client_errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    DataCorrupt,
    Forbidden,
    Gone,
    InvalidInput,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RegistryAPIError,
    RegistryClientError,
    RegistryConnectionError,
    RequestTimeout,
    ServerError,
    ServerUnreachable,
    Unauthorized,
    Unavailable,
)
from .config import get_settings
from .formats import oci
from .formats.inspect import content_hash, sample_digest
from .transport import (
    AsyncDriver,
    Blocking,
    Core,
    Flow,
    Send,
    Sleep,
    Stream,
    SyncDriver,
    check,
    operation,
    paged,
    parse,
    transient,
    unreachable,
)

__all__ = [
    "AsyncRegistryClient", "RegistryClient", "iter_folder",
    # results
    "Alias", "Basis", "CompatReport", "Compression", "Delivery", "DeliveryDetail", "Draft", "DraftFile", "Event",
    "FileEntry", "Health", "Job", "Lineage", "Model", "ModelPage", "OciExport", "Policy", "Predictions", "Redelivery",
    "StorageReport", "Token", "UpdateReport", "Upload", "Version", "VersionPage", "Webhook", "WebhookCreated",
    # errors
    "BadRequest", "ChecksumMismatch", "Conflict", "DataCorrupt", "Forbidden", "Gone", "InvalidInput", "JobFailed",
    "NotFound", "PayloadTooLarge", "RangeNotSatisfiable", "RegistryAPIError", "RegistryClientError",
    "RegistryConnectionError", "RequestTimeout", "ServerError", "ServerUnreachable", "Unauthorized", "Unavailable",
]

# The results: the API's response schemas.
Alias = schemas.AliasOut
Basis = schemas.BasisOut
CompatReport = schemas.CompatOut
Compression = schemas.CompressionOut
Delivery = schemas.DeliveryOut
DeliveryDetail = schemas.DeliveryDetail
Draft = schemas.DraftOut
DraftFile = schemas.DraftFileOut
Event = schemas.EventOut
FileEntry = schemas.FileOut
Health = schemas.HealthOut
Job = schemas.JobOut
Lineage = schemas.LineageOut
Model = schemas.ModelOut
ModelPage = schemas.ModelPage
Policy = schemas.PolicyOut
Probe = schemas.ProbeOut
Predictions = schemas.PredictionsOut
Redelivery = schemas.RedeliveryOut
StorageReport = schemas.StorageOut
Token = schemas.TokenOut
UpdateReport = schemas.UpdateReportOut
Upload = schemas.UploadOut
Version = schemas.VersionOut
VersionPage = schemas.VersionPage
Webhook = schemas.WebhookOut
WebhookCreated = schemas.WebhookCreated
OciExport = oci.OciExport

CHUNK = 4 << 20
RESUMABLE_THRESHOLD = 64 << 20  # files larger than this go through resumable upload sessions
UPLOAD_CHUNK = 64 << 20
OFFSET_RESYNCS = 20  # 409 offset_mismatch answers in a row before a resumable upload gives up
_transient = transient  # the retry rule (tests/test_faults.py checks it)

# httpcore reads responses 64 KiB at a time; 1 MiB reads move large downloads ~40% faster on
# loopback (bench/RESULTS.md). Only ever raised, never lowered.
try:
    import httpcore._async.http11 as _ah11
    import httpcore._sync.http11 as _h11

    for _conn in (_h11.HTTP11Connection, _ah11.AsyncHTTP11Connection):
        _conn.READ_NUM_BYTES = max(_conn.READ_NUM_BYTES, 1 << 20)
except (ImportError, AttributeError):  # pragma: no cover - other httpcore layouts
    pass

Progress = Callable[[str, int], None]  # (phase, bytes) -> None; phases: "hash", "upload", "download"
LocalFile = tuple[str, Path, str | None]  # (path in the version, local file, its sha256 when known)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _version_path(ref: str) -> str:
    name, _, selector = ref.partition("@")
    return f"/models/{_q(name)}/versions/{_q(selector or 'latest')}"


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _hash_file(path: Path, progress: Progress | None = None) -> str:
    return client_io.sha256_file(path, (lambda n: progress("hash", n)) if progress else None)


def _hash_prefix(path: Path) -> tuple[Any, int]:
    """(sha256 object over the bytes of ``path``, their count); (empty, 0) when it does not exist."""
    h = hashlib.sha256()
    n = 0
    if path.exists():
        with open(path, "rb") as f:
            while chunk := f.read(4 * CHUNK):
                h.update(chunk)
                n += len(chunk)
    return h, n


def _sample(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return sample_digest(read_at, size)


def _holds(target: Path, size: int, sha256: str) -> bool:
    return target.exists() and target.stat().st_size == size and _hash_file(target) == sha256


def iter_folder(folder: Path) -> list[tuple[str, Path]]:
    """Files to push: every regular file below ``folder`` (symlinks followed), skipping hidden
    names and ``__pycache__``; as (relative POSIX path, local path), sorted."""
    folder = Path(folder)
    if folder.is_file():
        return [(folder.name, folder)]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            out.append((p.relative_to(folder).as_posix(), p))
    return sorted(out)


class Operations(Core):
    """Every API operation, once (a flow per method); the drivers make them sync or async."""

    def _setup(self, url: str | None, token: str | None, retry_seconds: float | None,
               on_retry: Callable[[str], None] | None) -> dict[str, Any]:
        """Settings shared by both clients; returns the httpx client's keyword arguments."""
        settings = get_settings()
        self.url = (url or settings.client_url).rstrip("/")
        self.retry_seconds = settings.client_retry_seconds if retry_seconds is None else retry_seconds
        self._on_retry = on_retry or _stderr
        token = token if token is not None else settings.token
        headers = {"User-Agent": "registry-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return {"base_url": self.url + "/api/v1", "headers": headers}

    # ------------------------------------------------------------------ models

    @operation
    def health(self) -> Flow[Health]:
        return (yield from self.call(Health, "GET", "/health"))

    @operation
    def create_model(self, name: str, kind: str, description: str = "",
                     tags: dict[str, str] | None = None) -> Flow[Model]:
        return (yield from self.call(Model, "POST", "/models", json={
            "name": name, "kind": kind, "description": description, "tags": tags or {}}))

    @operation
    def get_model(self, name: str) -> Flow[Model]:
        return (yield from self.call(Model, "GET", f"/models/{_q(name)}"))

    @operation
    def list_models(self, prefix: str | None = None, kind: str | None = None, tags: list[str] | None = None,
                    limit: int = 50, cursor: str | None = None) -> Flow[ModelPage]:
        params = _params(prefix=prefix, kind=kind, tag=tags or None, limit=limit, cursor=cursor)
        return (yield from self.call(ModelPage, "GET", "/models", params=params))

    @operation
    def set_model_tag(self, name: str, key: str, value: str) -> Flow[Model]:
        return (yield from self.call(Model, "PUT", f"/models/{_q(name)}/tags/{_q(key)}", json={"value": value}))

    # ------------------------------------------------------------------ versions

    @operation
    def get_version(self, ref: str) -> Flow[Version]:
        return (yield from self.call(Version, "GET", _version_path(ref)))

    @operation
    def search_versions(self, *, model: str | None = None, prefix: str | None = None, kind: str | None = None,
                        tags: list[str] | None = None, base: str | None = None, status: str | None = None,
                        archived: bool = False, limit: int = 50, cursor: str | None = None) -> Flow[VersionPage]:
        """One page of versions matching every filter (``tags``: ``key=value`` or ``key``)."""
        params = _params(model=model, prefix=prefix, kind=kind, tag=tags or None, base=base, status=status,
                         archived=archived or None, limit=limit, cursor=cursor)
        return (yield from self.call(VersionPage, "GET", "/versions", params=params))

    @paged
    def iter_versions(self, **filters: Any) -> Callable[[str | None], Flow[tuple[list[Version], str | None]]]:
        """Every version matching the filters (those of ``search_versions``), following ``next_cursor``."""
        params = _params(**filters)
        if "tags" in params:
            params["tag"] = params.pop("tags")

        def page(cursor: str | None) -> Flow[tuple[list[Version], str | None]]:
            got = yield from self.call(VersionPage, "GET", "/versions", params={**params, **_params(cursor=cursor)})
            return got.items, got.next_cursor

        return page

    @operation
    def archive(self, ref: str) -> Flow[Version]:
        return (yield from self.call(Version, "DELETE", _version_path(ref)))

    @operation
    def set_tags(self, ref: str, tags: dict[str, str]) -> Flow[Version]:
        return (yield from self.call(Version, "POST", _version_path(ref) + "/tags", json={"tags": tags}))

    @operation
    def delete_tag(self, ref: str, key: str) -> Flow[Version]:
        return (yield from self.call(Version, "DELETE", _version_path(ref) + f"/tags/{_q(key)}"))

    @operation
    def lineage(self, ref: str, direction: str = "both", depth: int = 25) -> Flow[Lineage]:
        return (yield from self.call(Lineage, "GET", _version_path(ref) + "/lineage",
                                     params={"direction": direction, "depth": depth}))

    @operation
    def set_alias(self, name: str, alias: str, version: str | int) -> Flow[Alias]:
        return (yield from self.call(Alias, "PUT", f"/models/{_q(name)}/aliases/{_q(alias)}",
                                     json={"version": str(version)}))

    @operation
    def delete_alias(self, name: str, alias: str) -> Flow[None]:
        yield from self.call(None, "DELETE", f"/models/{_q(name)}/aliases/{_q(alias)}")

    @operation
    def list_aliases(self, name: str) -> Flow[list[Alias]]:
        return (yield from self.call(list[Alias], "GET", f"/models/{_q(name)}/aliases"))

    @operation
    def events(self, after: int = 0, limit: int = 100) -> Flow[list[Event]]:
        page = yield from self.call(schemas.EventPage, "GET", "/events", params={"after": after, "limit": limit})
        return page.items

    @operation
    def promote(self, ref: str, alias: str | None = None) -> Flow[Version]:
        """Candidate -> ready, optionally pointing ``alias`` at it."""
        return (yield from self.call(Version, "POST", _version_path(ref) + "/promote", json={"alias": alias}))

    # ------------------------------------------------------------------ jobs and derived artifacts

    @operation
    def get_job(self, job_id: int) -> Flow[Job]:
        return (yield from self.call(Job, "GET", f"/jobs/{job_id}"))

    @operation
    def list_jobs(self, state: str | None = None, type: str | None = None, limit: int = 50) -> Flow[list[Job]]:
        page = yield from self.call(schemas.JobPage, "GET", "/jobs", params=_params(state=state, type=type,
                                                                                    limit=limit))
        return page.items

    @paged
    def iter_jobs(self, state: str | None = None, type: str | None = None,
                  limit: int = 100) -> Callable[[str | None], Flow[tuple[list[Job], str | None]]]:
        """Every job matching the filters, newest first, ``limit`` per request."""
        params = _params(state=state, type=type, limit=limit)

        def page(cursor: str | None) -> Flow[tuple[list[Job], str | None]]:
            got = yield from self.call(schemas.JobPage, "GET", "/jobs", params={**params, **_params(cursor=cursor)})
            return got.items, got.next_cursor

        return page

    @operation
    def wait_job(self, job_id: int, timeout: float = 3600, poll: float = 0.5,
                 on_update: Callable[[Job], None] | None = None) -> Flow[Job]:
        """Poll a job until it succeeds (its result) or fails (raises :class:`JobFailed`)."""
        deadline = time.monotonic() + timeout
        while True:
            job = yield from Operations.get_job(self, job_id)
            if on_update:
                on_update(job)
            if job.state == "succeeded":
                return job
            if job.state in ("failed", "cancelled"):
                err = job.error or {}
                raise JobFailed(0, err.get("code", "job_failed"), f"job {job_id} {job.state}: "
                                f"{err.get('message', '')}", err.get("details"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout}s")
            yield Sleep(poll)

    @operation
    def create_basis(self, members: list[str], *, p: int | None = None, max_error: float | None = None,
                     name: str | None = None, collection: str | None = None) -> Flow[Job]:
        """Queue an RMM basis job; returns the job (``wait_job`` for its result)."""
        return (yield from self.call(Job, "POST", "/bases", json={
            "members": members, "p": p, "max_error": max_error, "name": name, "collection": collection}))

    @operation
    def get_basis(self, basis_id: int) -> Flow[Basis]:
        return (yield from self.call(Basis, "GET", f"/bases/{basis_id}"))

    @operation
    def list_bases(self, collection: str | None = None) -> Flow[list[Basis]]:
        return (yield from self.call(list[Basis], "GET", "/bases", params=_params(collection=collection or None)))

    @operation
    def compress(self, members: list[str] | None = None, *, max_error: float, base: str | None = None,
                 tags: dict[str, str | None] | None = None, methods: list[str] | None = None,
                 name: str | None = None, collection: str | None = None, prune: bool = False) -> Flow[Job]:
        """Queue a compression plan over ``members`` (or the adapters of ``base`` carrying ``tags``):
        every member within ``max_error``; ``prune``: then served rebuilt from the plan. Returns the
        job (``wait_job`` for its result)."""
        body = {"members": members, "base": base, "tags": tags, "max_error": max_error, "methods": methods,
                "name": name, "collection": collection, "prune": prune}
        return (yield from self.call(Job, "POST", "/compressions", json={k: v for k, v in body.items()
                                                                          if v is not None}))

    @operation
    def get_compression(self, compression_id: int) -> Flow[Compression]:
        return (yield from self.call(Compression, "GET", f"/compressions/{compression_id}"))

    @operation
    def list_compressions(self, collection: str | None = None) -> Flow[list[Compression]]:
        return (yield from self.call(list[Compression], "GET", "/compressions",
                                     params=_params(collection=collection or None)))

    @operation
    def prune_compression(self, compression_id: int, max_error: float | None = None) -> Flow[Job]:
        """Queue pruning of a plan's members (within ``max_error``, default the plan's budget): they
        give up their own blobs and are served rebuilt from the plan (a job)."""
        return (yield from self.call(Job, "POST", f"/compressions/{compression_id}/prune",
                                     json={"max_error": max_error}))

    @operation
    def transfer(self, finetune: str, target_base: str, alpha: float = 1.0, storage: str = "stored") -> Flow[Job]:
        """Queue a fine-tuning transfer; the job's result is a candidate version (``storage``:
        "stored" keeps its weights, "derived" keeps only the recipe target + α(fine-tune − source))."""
        return (yield from self.call(Job, "POST", "/transfers", json={
            "finetune": finetune, "target_base": target_base, "alpha": alpha, "storage": storage}))

    @operation
    def prune(self, basis_id: int, max_error: float | None = None) -> Flow[Job]:
        """Queue pruning of a basis' members within the error budget (a job)."""
        return (yield from self.call(Job, "POST", f"/bases/{basis_id}/prune", json={"max_error": max_error}))

    @operation
    def verify(self, ref: str) -> Flow[Job]:
        """Queue a checksum verification of every file of a version (a job)."""
        return (yield from self.call(Job, "POST", _version_path(ref) + "/verify"))

    @operation
    def pack(self, ref: str) -> Flow[Job]:
        """Queue packing a version losslessly (a job)."""
        return (yield from self.call(Job, "POST", _version_path(ref) + "/pack"))

    @operation
    def storage(self) -> Flow[StorageReport]:
        """Logical vs physical bytes per model and in total."""
        return (yield from self.call(StorageReport, "GET", "/storage"))

    @operation
    def merge(self, method: str, inputs: list[str], name: str, params: dict[str, Any] | None = None,
              rank: int | None = None) -> Flow[Job]:
        return (yield from self.call(Job, "POST", "/merges", json={
            "method": method, "inputs": inputs, "name": name, "params": params or {}, "rank": rank}))

    @operation
    def create_policy(self, name: str, type: str, base_model: str,
                      params: dict[str, Any] | None = None) -> Flow[Policy]:
        return (yield from self.call(Policy, "POST", "/policies", json={
            "name": name, "type": type, "base_model": base_model, "params": params or {}}))

    @operation
    def list_policies(self) -> Flow[list[Policy]]:
        return (yield from self.call(list[Policy], "GET", "/policies"))

    @operation
    def delete_policy(self, name: str) -> Flow[None]:
        yield from self.call(None, "DELETE", f"/policies/{_q(name)}")

    # ------------------------------------------------------------------ webhooks

    @operation
    def create_webhook(self, url: str, events: list[str], secret: str | None = None, description: str = "",
                       signature_scheme: str = "registry") -> Flow[WebhookCreated]:
        """Subscribe ``url`` to events matching the patterns; the result holds ``secret`` (shown once).
        ``signature_scheme``: "registry" (``X-Registry-Signature``) or "standard-webhooks"."""
        return (yield from self.call(WebhookCreated, "POST", "/webhooks", json={
            "url": url, "events": events, "secret": secret, "description": description,
            "signature_scheme": signature_scheme}))

    @operation
    def list_webhooks(self) -> Flow[list[Webhook]]:
        return (yield from self.call(list[Webhook], "GET", "/webhooks"))

    @operation
    def get_webhook(self, webhook_id: int) -> Flow[Webhook]:
        return (yield from self.call(Webhook, "GET", f"/webhooks/{webhook_id}"))

    @operation
    def update_webhook(self, webhook_id: int, *, url: str | None = None, events: list[str] | None = None,
                       active: bool | None = None, description: str | None = None) -> Flow[Webhook]:
        body = _params(url=url, events=events, active=active, description=description)
        return (yield from self.call(Webhook, "PATCH", f"/webhooks/{webhook_id}", json=body))

    @operation
    def delete_webhook(self, webhook_id: int) -> Flow[None]:
        yield from self.call(None, "DELETE", f"/webhooks/{webhook_id}")

    @operation
    def list_deliveries(self, webhook_id: int, status: str | None = None, limit: int = 50) -> Flow[list[Delivery]]:
        """A webhook's deliveries, newest first (without the per-attempt log: see get_delivery)."""
        page = yield from self.call(schemas.DeliveryPage, "GET", f"/webhooks/{webhook_id}/deliveries",
                                    params=_params(status=status, limit=limit))
        return page.items

    @operation
    def get_delivery(self, delivery_id: int) -> Flow[DeliveryDetail]:
        return (yield from self.call(DeliveryDetail, "GET", f"/deliveries/{delivery_id}"))

    @operation
    def redeliver(self, delivery_id: int) -> Flow[Redelivery]:
        """Send a delivery again; returns the delivery and the job that sends it."""
        return (yield from self.call(Redelivery, "POST", f"/deliveries/{delivery_id}/redeliver"))

    @operation
    def store_predictions(self, ref: str, dataset: str, *, predictions: list[Any] | None = None,
                          labels: list[Any] | None = None, scores: list[float] | None = None,
                          kind: str = "classification", replace: bool = False) -> Flow[Predictions]:
        """Store a version's predictions on a labelled dataset (for compatibility reports)."""
        body = {"dataset": dataset, "kind": kind, "predictions": predictions, "labels": labels, "scores": scores,
                "replace": replace}
        return (yield from self.call(Predictions, "POST", _version_path(ref) + "/predictions", json=body))

    @operation
    def update_reports(self, ref: str) -> Flow[list[UpdateReport]]:
        """The compatibility reports of the updates ``ref`` takes part in (to its same-model successors
        and from its same-model parents), one per dataset both sides have predictions for."""
        return (yield from self.call(list[UpdateReport], "GET", _version_path(ref) + "/compat"))

    @operation
    def compat(self, old: str, new: str, dataset: str) -> Flow[CompatReport]:
        """MUSCLE metrics (negative flip rate, ...) of updating ``old`` to ``new``."""
        return (yield from self.call(CompatReport, "GET", "/compat",
                                     params={"old": old, "new": new, "dataset": dataset}))

    # ------------------------------------------------------------------ tokens

    @operation
    def create_token(self, name: str, scope: str = "read", expires_days: int | None = None) -> Flow[Token]:
        return (yield from self.call(Token, "POST", "/tokens", json={
            "name": name, "scope": scope, "expires_days": expires_days}))

    @operation
    def list_tokens(self) -> Flow[list[Token]]:
        return (yield from self.call(list[Token], "GET", "/tokens"))

    @operation
    def revoke_token(self, token_id: int) -> Flow[Token]:
        return (yield from self.call(Token, "DELETE", f"/tokens/{token_id}"))

    # ------------------------------------------------------------------ push

    @operation
    def push(self, folder: str | Path, name: str, *, kind: str | None = None, base: str | None = None,
             tags: dict[str, str] | None = None, aliases: list[str] | None = None, description: str = "",
             parents: list[dict[str, Any]] | None = None, dedup: bool = True,
             progress: Progress | None = None) -> Flow[Version]:
        """Upload a folder (or one file) as the next version of ``name``; returns the version.

        With ``dedup`` bytes the registry already holds are linked, not sent: a file is hashed
        first, unless it is over 64 MiB and the server, asked with a sample of a few KiB, holds no
        file like it (then it is hashed while it is sent). Files over 64 MiB use a resumable
        upload. While the server is unreachable (restarting) every step is retried and resumes
        where it was, with the same draft; a commit whose answer was lost is looked up before it
        is repeated. On a failure that is not retried the draft is
        aborted: nothing becomes visible."""
        files = iter_folder(Path(folder))
        if not files:
            raise ValueError(f"{folder}: no files to push")
        return (yield from self._push_files([(rel, path, None) for rel, path in files], name, kind=kind, base=base,
                                            tags=tags, aliases=aliases, description=description, parents=parents,
                                            dedup=dedup, progress=progress))

    @operation
    def create_version(self, name: str, files: list[dict[str, Any]] | list[FileEntry], *, kind: str | None = None,
                       base: str | None = None, tags: dict[str, str] | None = None,
                       aliases: list[str] | None = None, description: str = "",
                       parents: list[dict[str, Any]] | None = None) -> Flow[Version]:
        """Create the next version of ``name`` in one request from bytes the registry already holds.

        ``files``: the manifest, ``{"path", "sha256", "size"}`` per file (size optional; a
        :class:`FileEntry` works too, e.g. another version's ``files``). The server runs the same
        checks as a push's commit; files whose bytes it does not hold are refused with
        :class:`InvalidInput` ``blob_not_found`` (``details["missing"]`` lists them) and nothing is
        recorded. Repeated while the server is unreachable; when an answer was lost, the repeat's
        ``duplicate_content`` refusal means the first try created it, and that version is returned."""
        manifest = [f.model_dump() if isinstance(f, FileEntry) else
                    {"path": f["path"], "sha256": f["sha256"], "size": f.get("size")} for f in files]
        body = {"files": manifest, "kind": kind, "base": base, "tags": tags or {}, "aliases": aliases or [],
                "description": description, "parents": parents or []}
        retry = self._retry(f"create of {name}")
        retried = False
        while True:
            try:
                return parse(Version, check((yield Send("POST", f"/models/{_q(name)}/versions", json=body))))
            except (httpx.TransportError, RegistryAPIError) as e:
                if retried and isinstance(e, RegistryAPIError) and e.code == "duplicate_content":
                    return (yield from Operations.get_version(self, str((e.details or {})["existing"])))
                if not transient(e, idempotent=True):  # a repeat adds nothing: duplicates are refused
                    raise self._fail(e) from e
                yield from retry.wait(e)
                retried = True

    def _push_files(self, files: list[LocalFile], name: str, *, kind: str | None, base: str | None,
                    tags: dict[str, str] | None, aliases: list[str] | None, description: str,
                    parents: list[dict[str, Any]] | None, dedup: bool, progress: Progress | None) -> Flow[Version]:
        """Push ``files`` (path in the version, local file, sha256 if known: then it is not hashed
        again, and the server checks the bytes against it)."""
        # Repeated after a broken connection too: at worst an empty draft is left, invisible, removed by gc.
        draft = yield from self.call(Draft, "POST", "/drafts", idempotent=True, what="start of the push", json={
            "model": name, "kind": kind, "base": base, "tags": tags or {}, "aliases": aliases or [],
            "description": description, "parents": parents or []})
        manifest: dict[str, str] = {}
        try:
            for rel, path, known in files:
                sha = known
                size = path.stat().st_size
                if sha is None and dedup and (size <= RESUMABLE_THRESHOLD or
                                              (yield from self._maybe_held(draft.id, path, size))):
                    sha = yield Blocking(lambda path=path: _hash_file(path, progress))  # type: ignore[misc]
                if sha is not None:
                    try:  # linking a path again replaces the link: safe to repeat
                        yield from self.request("POST", f"/drafts/{draft.id}/links", idempotent=True,
                                                what=f"link of {rel}", json={"path": rel, "sha256": sha, "size": size})
                        manifest[rel] = sha
                        if progress:
                            progress("upload", size)
                        continue
                    except RegistryAPIError as e:
                        if e.code != "blob_not_found":
                            raise
                if size > RESUMABLE_THRESHOLD:
                    got = yield from self._upload_resumable(draft.id, rel, path, size, sha, progress)
                    if sha is None and dedup and progress:
                        progress("hash", size)  # hashed while it was sent
                else:
                    got = yield from self._upload_simple(draft.id, rel, path, sha, progress)
                manifest[rel] = got.sha256
            return (yield from self._commit_draft(draft.id, name, manifest))
        except BaseException as e:
            if not isinstance(e, GeneratorExit):
                with contextlib.suppress(Exception):  # best effort; gc removes abandoned drafts anyway
                    yield Send("DELETE", f"/drafts/{draft.id}", timeout=10)
            raise

    def _maybe_held(self, draft_id: str, path: Path, size: int) -> Flow[bool]:
        """Whether the registry may hold ``path``'s bytes, asked with a sample of a few KiB: when
        it certainly does not, the file is uploaded at once and hashed while it is sent, instead of
        being read twice (hashed for deduplication, then sent). A server without the question: True."""
        sample = yield Blocking(lambda: _sample(path, size))
        try:
            probe = yield from self.call(Probe, "POST", f"/drafts/{draft_id}/probe", idempotent=True,
                                         what="deduplication probe", json={"size": size, "sample": sample})
        except RegistryAPIError as e:
            if e.status in (404, 405) and e.code != "draft_not_found":
                return True
            raise
        return bool(probe.maybe_held)

    def _commit_draft(self, draft_id: str, name: str, manifest: dict[str, str]) -> Flow[Version]:
        """Commit a draft; after a lost answer find out whether the commit happened. The server deletes
        the draft in the transaction that creates the version, so a draft that still exists was not
        committed (commit again), and a draft that is gone was, into the newest version of ``name``
        holding exactly ``manifest`` (never a second version: the server refuses duplicate content)."""
        retry = self._retry("commit")
        chash = content_hash(manifest)
        retried = False
        while True:
            try:
                return parse(Version, check((yield Send("POST", f"/drafts/{draft_id}/commit"))))
            except (httpx.TransportError, RegistryAPIError) as e:
                if retried and isinstance(e, RegistryAPIError) and e.code in ("draft_not_found", "duplicate_content"):
                    # an earlier try committed meanwhile (or, with the draft still there, a true duplicate)
                    exists = yield from self._draft_exists(draft_id)
                    found = None if exists else (yield from self._version_holding(name, chash))
                    if found is not None:
                        return found
                    raise
                if not transient(e, idempotent=True):
                    raise self._fail(e) from e
                yield from retry.wait(e)
                retried = True
                if (yield from self._draft_exists(draft_id)):
                    continue
                found = yield from self._version_holding(name, chash)
                if found is not None:
                    self._on_retry(f"registry: commit: {found.ref} was committed before the connection broke")
                    return found
                raise NotFound(404, "draft_not_found", f"draft {draft_id} is gone and no version of "
                               f"{name} holds its files (aborted or expired meanwhile); push again") from e

    def _draft_exists(self, draft_id: str) -> Flow[bool]:
        try:
            yield from self.request("GET", f"/drafts/{draft_id}", what="draft lookup")
            return True
        except RegistryAPIError as e:
            if e.status == 404:
                return False
            raise

    def _version_holding(self, name: str, chash: str) -> Flow[Version | None]:
        """The newest live version of ``name`` whose files are exactly those of content sha256 ``chash``."""
        try:
            page = yield from Operations.search_versions(self, model=name, limit=20)
        except RegistryAPIError as e:
            if e.status == 404:
                return None
            raise
        for v in page.items:
            if v.content_sha256 == chash:
                return (yield from Operations.get_version(self, v.ref))
        return None

    def _read_chunks(self, path: Path, start: int, length: int, progress: Progress | None,
                     hasher: Any = None) -> Iterator[bytes]:
        """An upload body: ``hasher`` (if any) is fed on a helper thread while the chunks are sent."""
        return client_io.read_hashing(path, start, length, CHUNK, hasher,
                                      (lambda n: progress("upload", n)) if progress else None)

    def _upload_simple(self, draft_id: str, rel: str, path: Path, sha: str | None,
                       progress: Progress | None) -> Flow[DraftFile]:
        """One PUT (idempotent: a repeat replaces the file in the draft); a retry sends the file again."""
        size = path.stat().st_size
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if sha:
            headers["X-Checksum-Sha256"] = sha
        sent = 0

        def count(phase: str, n: int) -> None:
            nonlocal sent
            sent += n
            if progress:
                progress(phase, n)

        def body() -> Iterator[bytes]:
            nonlocal sent
            if sent and progress:
                progress("upload", -sent)  # this try starts over
            sent = 0
            return self._read_chunks(path, 0, size, count)

        return (yield from self.call(DraftFile, "PUT", f"/drafts/{draft_id}/files/{quote(rel)}", headers=headers,
                                     content=body, what=f"upload of {rel}"))

    def _upload_resumable(self, draft_id: str, rel: str, path: Path, size: int, sha: str | None,
                          progress: Progress | None) -> Flow[DraftFile]:
        """Chunks at explicit offsets. After a broken connection (or a restarted server) ask for the
        offset the server holds and continue from there; a session commit whose answer was lost is
        checked against the draft; a session that vanished starts the file again."""
        retry = self._retry(f"upload of {rel}")
        reported = 0  # bytes of this file reported to ``progress``
        hasher = hashlib.sha256() if sha is None else None  # with --no-dedup: hashed as it is sent
        hashed = 0  # ``hasher`` covers bytes [0, hashed)

        def report(upto: int) -> None:
            nonlocal reported
            if progress and upto != reported:
                progress("upload", upto - reported)
            reported = upto

        def rehash(upto: int) -> None:
            nonlocal hasher, hashed
            if hasher is not None and hashed != upto:
                hasher = hashlib.sha256()
                for _ in self._read_chunks(path, 0, upto, None, hasher):
                    pass
                hashed = upto

        def received(upload_id: str) -> Flow[int]:
            up = yield from self.call(Upload, "GET", f"/uploads/{upload_id}", what=f"upload of {rel}")
            return int(up.received)

        def open_session() -> Flow[str]:
            # Repeated after a broken connection too: an unused session is removed with its draft.
            up = yield from self.call(Upload, "POST", f"/drafts/{draft_id}/uploads", idempotent=True,
                                      what=f"upload of {rel}", json={"path": rel, "size": size})
            return str(up.id)

        upload_id = yield from open_session()
        offset, resyncs = 0, 0
        while True:
            if offset < size:
                length = min(UPLOAD_CHUNK, size - offset)
                trial = hasher.copy() if hasher is not None else None
                sent = 0

                def count(_phase: str, n: int, start: int = offset) -> None:
                    nonlocal sent
                    sent += n
                    report(start + sent)

                try:
                    r = check((yield Send("PATCH", f"/uploads/{upload_id}",
                                          content=self._read_chunks(path, offset, length, count, trial),
                                          headers={"Upload-Offset": str(offset), "Content-Length": str(length),
                                                   "Content-Type": "application/octet-stream"})))
                    now_at = int(parse(Upload, r).received)
                    retry.reset()
                    resyncs = 0
                except (httpx.TransportError, RegistryAPIError) as e:
                    if isinstance(e, RegistryAPIError) and e.code == "offset_mismatch" and resyncs < OFFSET_RESYNCS:
                        resyncs += 1
                    elif not transient(e, idempotent=True):  # a chunk at an explicit offset: safe to resend
                        raise self._fail(e) from e
                    else:
                        yield from retry.wait(e)
                    now_at = yield from received(upload_id)
                if hasher is not None and trial is not None and sent == length and now_at == offset + length:
                    hasher, hashed = trial, now_at
                else:
                    yield Blocking(lambda upto=now_at: rehash(upto))  # type: ignore[misc]
                offset = now_at
                report(offset)
                continue
            yield Blocking(lambda: rehash(size))
            digest = sha or (hasher.hexdigest() if hasher is not None else "")
            try:
                return parse(DraftFile, check((yield Send("POST", f"/uploads/{upload_id}/commit",
                                                          json={"sha256": digest}))))
            except (httpx.TransportError, RegistryAPIError) as e:
                if isinstance(e, RegistryAPIError) and e.code == "upload_incomplete":
                    pass  # the server holds fewer bytes than it acknowledged: resend from its offset
                elif not transient(e, idempotent=True):
                    raise self._fail(e) from e
                else:
                    yield from retry.wait(e)
            try:  # did the session commit happen? An open session did not: continue it.
                offset = yield from received(upload_id)
                report(offset)
                continue
            except RegistryAPIError as e:
                if e.code != "upload_not_found":
                    raise
            draft = yield from self.call(Draft, "GET", f"/drafts/{draft_id}", what=f"upload of {rel}")
            done = next((f for f in draft.files if f.path == rel and f.sha256 == digest), None)
            if done is not None:
                return DraftFile(path=done.path, sha256=done.sha256, size=done.size, deduplicated=False)
            self._on_retry(f"registry: upload of {rel}: the server lost the upload session; sending the file again")
            upload_id, offset = (yield from open_session()), 0
            report(0)

    # ------------------------------------------------------------------ pull

    @operation
    def list_files(self, ref: str, format: str = "native") -> Flow[list[FileEntry]]:
        return (yield from self.call(list[FileEntry], "GET", _version_path(ref) + "/files",
                                     params={"format": format}))

    @operation
    def pull(self, ref: str, dest: str | Path, *, files: list[str] | None = None, format: str = "native",
             progress: Progress | None = None) -> Flow[Version]:
        """Download a version into ``dest``, verifying every file's sha256. ``format``: native
        (as stored or derived), or for adapters ``delta`` (dense per-module deltas) / ``merged``
        (base + adapter as full weights). Files already present with the right hash are skipped;
        interrupted downloads resume from their ``.part`` file."""
        from .formats.paths import clean_path

        version = yield from Operations.get_version(self, ref)
        dest = Path(dest)
        if format == "native":
            listing = version.files or []
        else:
            listing = yield from Operations.list_files(self, version.ref, format)
        wanted = listing if files is None else [f for f in listing if f.path in set(files)]
        for f in wanted:
            target = dest / clean_path(f.path)
            if (yield Blocking(lambda t=target, f=f: _holds(t, f.size, f.sha256))):  # type: ignore[misc]
                if progress:
                    progress("download", f.size)
                continue
            yield from Operations.download_file(self, version.ref, f.path, target, expected_sha256=f.sha256,
                                                progress=progress, format=format)
        return version

    @operation
    def download_file(self, ref: str, path: str, target: str | Path, *, expected_sha256: str | None = None,
                      progress: Progress | None = None, format: str = "native") -> Flow[str]:
        """Download one file to ``target`` (resuming ``target.part``); returns its verified sha256.
        A broken connection or a restarting server is retried, continuing the ``.part`` file."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        url = _version_path(ref) + f"/files/{quote(path)}" + (f"?format={format}" if format != "native" else "")
        retry = self._retry(f"download of {path}")
        reported = 0  # bytes of this file reported to ``progress``
        known_sha = expected_sha256  # what a resumed range must still belong to (If-Range)

        def report(upto: int) -> None:
            nonlocal reported
            if progress and upto != reported:
                progress("download", upto - reported)
            reported = upto

        while True:
            h, start = yield Blocking(lambda: _hash_prefix(part))
            report(start)
            headers = {"Range": f"bytes={start}-", "If-Range": f'"{known_sha}"'} if start and known_sha else {}
            server_sha: str | None = None
            out: Any = None

            def sink(r: httpx.Response) -> Callable[[bytes], None] | None:
                nonlocal out, h, start, server_sha, known_sha
                if r.status_code == 416:
                    return None
                server_sha = r.headers.get("x-checksum-sha256")
                known_sha = known_sha or server_sha
                if r.status_code != 206:
                    h, start = hashlib.sha256(), 0
                    report(0)
                # written and hashed by helper threads while the next bytes arrive
                out = client_io.HashedFile(part, "ab" if r.status_code == 206 else "wb", h)

                def write(chunk: bytes) -> None:
                    nonlocal start
                    out.write(chunk)
                    start += len(chunk)
                    report(start)

                return write

            try:
                r = yield Stream(url, headers, sink)
                if out is not None:
                    opened, out = out, None
                    opened.close()  # every byte written and hashed
                if r.status_code == 416:  # the .part is already complete (or bogus): start over
                    part.unlink(missing_ok=True)
                    continue
                check(r)
                retry.reset()
            except (httpx.TransportError, RegistryAPIError) as e:
                if not transient(e, idempotent=True):
                    raise (unreachable(self.url, e) if isinstance(e, httpx.TransportError) else e) from e
                yield from retry.wait(e)
                continue
            finally:
                if out is not None:
                    out.abandon()  # the body broke off: the .part keeps what was written (resumed)
            actual = h.hexdigest()
            want = expected_sha256 or server_sha
            if want and actual != want:
                part.unlink(missing_ok=True)
                raise ChecksumMismatch(0, "checksum_mismatch", f"{path}: downloaded bytes hash to {actual}, "
                                       f"expected {want}", {"path": path, "actual": actual, "expected": want})
            os.replace(part, target)
            return str(actual)

    # ------------------------------------------------------------------ OCI image layouts

    @operation
    def export_oci(self, ref: str, dest: str | Path, *, progress: Progress | None = None) -> Flow[OciExport]:
        """Write version ``ref`` as an OCI image layout in ``dest`` (a new or empty folder, or an
        earlier export of the same version) using the CNCF ModelPack media types: one raw layer per
        file (its blob is the file, so layer digests are the files' sha256s; the path in the
        ``org.cncf.model.filepath`` annotation), the ModelPack config, and the version's metadata
        (kind, base, tags, lineage) in the manifest's annotations. Every blob is verified."""
        version = yield from Operations.get_version(self, ref)
        layout = oci.Layout(Path(dest))
        layout.create()
        for f in version.files or []:
            blob = layout.blob_path(f.sha256)
            if (yield Blocking(lambda b=blob, f=f: _holds(b, f.size, f.sha256))):  # type: ignore[misc]
                if progress:
                    progress("download", f.size)
                continue
            yield from Operations.download_file(self, version.ref, f.path, blob, expected_sha256=f.sha256,
                                                progress=progress)
        return layout.write(oci.VersionMeta(
            ref=version.ref, name=version.model, version=version.version, kind=version.kind, base=version.base,
            description=version.description, tags=version.tags,
            parents=[p.model_dump(mode="json") for p in version.parents], content_sha256=version.content_sha256,
            created_at=version.created_at, created_by=version.created_by,
            files=[oci.FileMeta(path=f.path, sha256=f.sha256, size=f.size) for f in version.files or []]))

    @operation
    def import_oci(self, src: str | Path, *, name: str | None = None, tag: str | None = None,
                   base: str | None = None, lineage: bool = True, aliases: list[str] | None = None,
                   progress: Progress | None = None) -> Flow[Version]:
        """Push the model of an OCI image layout (``registry export --oci``, or any ModelPack
        artifact with raw layers) as a new version, byte-exact: each layer becomes the file at its
        ``org.cncf.model.filepath``; every blob is checked against its digest first (and the
        server checks what it receives again).
        ``name`` defaults to the exported model's; ``tag`` picks a manifest when the layout holds
        several; with ``lineage`` (default) the exported base and parents are kept (``base``
        replaces the base), without it neither."""
        art = oci.read(Path(src), tag)
        meta = art.meta
        for layer in art.layers:  # a layout is only valid with every blob matching its digest
            actual = yield Blocking(lambda b=layer.blob: _hash_file(b, progress))  # type: ignore[misc]
            if actual != layer.sha256:
                raise oci.LayoutError(f"the blob of {layer.path} does not match its digest sha256:{layer.sha256} "
                                      f"(it hashes to {actual})")
        files: list[LocalFile] = [(layer.path, layer.blob, layer.sha256) for layer in art.layers]
        return (yield from self._push_files(
            files, name or meta.name, kind=meta.kind, base=base or (meta.base if lineage else None), tags=meta.tags,
            aliases=aliases, description=meta.description, parents=meta.parents if lineage else [], dedup=True,
            progress=progress))


class RegistryClient(Operations, SyncDriver):
    """The registry's API over ``httpx.Client``."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 300.0,
                 retry_seconds: float | None = None, on_retry: Callable[[str], None] | None = None) -> None:
        """``retry_seconds``: how long to keep retrying an unreachable server per outage (default
        ``REGISTRY_CLIENT_RETRY_SECONDS``; 0: fail at once). ``on_retry`` receives each "retrying
        in Ns" message (default: printed on stderr)."""
        kw = self._setup(url, token, retry_seconds, on_retry)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), **kw)

    def close(self) -> None:
        self._http.close()

    # Plain sync helpers for code written against the client before it ran flows (new methods are
    # flows: ``@operation`` + ``self.call(Model, method, path, ...)``, which the async client gets too).
    def _req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.drive(self.request(method, path, **kw))

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._req(method, path, **kw)
        return None if r.status_code == 204 else r.json()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRegistryClient(Operations, AsyncDriver):
    """The same API over ``httpx.AsyncClient``: every method of :class:`RegistryClient`, awaited
    (``iter_versions`` is an async iterator). Hashing runs in a thread; progress callbacks may be
    called from it."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 300.0,
                 retry_seconds: float | None = None, on_retry: Callable[[str], None] | None = None) -> None:
        kw = self._setup(url, token, retry_seconds, on_retry)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), **kw)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
