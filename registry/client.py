"""Python client for the registry's HTTP API.

    from registry.client import RegistryClient

    with RegistryClient("http://127.0.0.1:8080", token=None) as rc:
        v = rc.push("demo/base", name="demo-base")                  # -> {"ref": "demo-base@1", ...}
        rc.push("demo/adapter-sql", name="sql-lora", base=v["ref"])
        rc.pull("sql-lora@1", "out/sql-lora")                        # verifies every sha256
        rc.search_versions(kind="adapter", base="demo-base@1")

Errors from the server raise :class:`RegistryAPIError` (``status``, ``code``, ``message``,
``details``); an unreachable server raises :class:`RegistryConnectionError`.

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

from .config import get_settings
from .formats.inspect import content_hash

CHUNK = 4 << 20
RESUMABLE_THRESHOLD = 64 << 20  # files larger than this go through resumable upload sessions
UPLOAD_CHUNK = 64 << 20
RETRY_STATUSES = frozenset({502, 503, 504})  # a proxy or a restarting server: worth another try
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_FIRST_DELAY = 0.5  # seconds; doubles after each failure of an outage
RETRY_MAX_DELAY = 5.0
OFFSET_RESYNCS = 20  # 409 offset_mismatch answers in a row before a resumable upload gives up
# Raised before the request reached the server: safe to repeat whatever the request does.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

# httpcore reads responses 64 KiB at a time; 1 MiB reads move large downloads ~40% faster on
# loopback (bench/RESULTS.md). Only ever raised, never lowered.
try:
    import httpcore._sync.http11 as _h11

    _h11.HTTP11Connection.READ_NUM_BYTES = max(_h11.HTTP11Connection.READ_NUM_BYTES, 1 << 20)
except (ImportError, AttributeError):  # pragma: no cover - other httpcore layouts
    pass

Progress = Callable[[str, int], None]  # (phase, bytes) -> None; phases: "hash", "upload", "download"


class RegistryAPIError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


class JobFailed(RegistryAPIError):
    """A job ended ``failed`` or ``cancelled`` (``status`` 0: no HTTP error; ``code`` is the job's
    error code, ``message`` says which job and why)."""


class RegistryConnectionError(Exception):
    pass


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _transient(error: BaseException, idempotent: bool) -> bool:
    """Whether a failed request may be repeated: never after a 4xx; after a connection that was
    never made, always; after one that broke (or a 502/503/504), only if repeating it is harmless."""
    if isinstance(error, NOT_SENT):
        return True
    if isinstance(error, httpx.TransportError):
        return idempotent
    if isinstance(error, RegistryAPIError):
        return idempotent and error.status in RETRY_STATUSES
    return False


def _describe(error: BaseException) -> str:
    if isinstance(error, RegistryAPIError):
        return f"{error.status} {error.code}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class _Retry:
    """Backoff for one operation: delays of 0.5, 1, 2, 4, 5, 5 ... seconds, until ``budget``
    seconds have passed since the first failure of the current outage (a success resets it)."""

    def __init__(self, budget: float, what: str, notify: Callable[[str], None], url: str) -> None:
        self.budget, self.what, self.notify, self.url = budget, what, notify, url
        self.reset()

    def reset(self) -> None:
        self._since: float | None = None
        self._failures = 0

    def wait(self, error: BaseException) -> None:
        """Sleep before the next try; raise the client's exception for ``error`` when the budget is spent."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        left = self.budget - (now - self._since)
        if left <= 0:
            if isinstance(error, httpx.TransportError):
                tried = f" (retried for {self.budget:.0f}s)" if self.budget else ""
                raise RegistryConnectionError(f"cannot reach the registry at {self.url}: {_describe(error)}"
                                              f"{tried}") from error
            raise error
        delay = min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** self._failures, left)
        self._failures += 1
        self.notify(f"registry: {self.what}: {_describe(error)}; retrying in {delay:.1f}s "
                    f"(gives up in {left:.0f}s)")
        time.sleep(delay)


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _version_path(ref: str) -> str:
    name, _, selector = ref.partition("@")
    return f"/models/{_q(name)}/versions/{_q(selector or 'latest')}"


def _hash_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * CHUNK):
            h.update(chunk)
            if progress:
                progress("hash", len(chunk))
    return h.hexdigest()


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


class RegistryClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 300.0,
                 retry_seconds: float | None = None, on_retry: Callable[[str], None] | None = None) -> None:
        """``retry_seconds``: how long to keep retrying an unreachable server per outage (default
        ``REGISTRY_CLIENT_RETRY_SECONDS``; 0: fail at once). ``on_retry`` receives each "retrying
        in Ns" message (default: printed on stderr)."""
        settings = get_settings()
        self.url = (url or settings.client_url).rstrip("/")
        self.retry_seconds = settings.client_retry_seconds if retry_seconds is None else retry_seconds
        self._on_retry = on_retry or _stderr
        token = token if token is not None else settings.token
        headers = {"User-Agent": "registry-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url + "/api/v1", headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _raise_for(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            err = r.json()["error"]
            raise RegistryAPIError(r.status_code, err.get("code", "error"), err.get("message", ""), err.get("details"))
        except (ValueError, KeyError, TypeError):
            raise RegistryAPIError(r.status_code, "http_error", r.text[:500]) from None

    def _retry(self, what: str) -> _Retry:
        return _Retry(self.retry_seconds, what, self._on_retry, self.url)

    def _attempt(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; raises httpx.TransportError or RegistryAPIError."""
        r = self._http.request(method, path, **kw)
        self._raise_for(r)
        return r

    def _req(self, method: str, path: str, *, idempotent: bool | None = None, what: str | None = None,
             **kw: Any) -> httpx.Response:
        """A request, retried while the server is unreachable when that is safe (see ``_transient``;
        ``idempotent`` defaults to the method's HTTP semantics). A callable ``content`` is called
        for a fresh body on every try."""
        idem = method.upper() in IDEMPOTENT_METHODS if idempotent is None else idempotent
        retry = self._retry(what or f"{method} {path}")
        body = kw.get("content")
        while True:
            if callable(body):
                kw["content"] = body()
            try:
                return self._attempt(method, path, **kw)
            except (httpx.TransportError, RegistryAPIError) as e:
                if not _transient(e, idem):
                    if isinstance(e, httpx.TransportError):
                        raise RegistryConnectionError(f"cannot reach the registry at {self.url}: {e}") from e
                    raise
                retry.wait(e)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._req(method, path, **kw)
        return None if r.status_code == 204 else r.json()

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        params = dict(params)
        while True:
            page = self._json("GET", path, params=params)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    # ------------------------------------------------------------------ models

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")  # type: ignore[no-any-return]

    def create_model(self, name: str, kind: str, description: str = "",
                     tags: dict[str, str] | None = None) -> dict[str, Any]:
        return self._json("POST", "/models", json={"name": name, "kind": kind, "description": description,
                                                    "tags": tags or {}})  # type: ignore[no-any-return]

    def get_model(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/models/{_q(name)}")  # type: ignore[no-any-return]

    def list_models(self, prefix: str | None = None, kind: str | None = None, tags: list[str] | None = None,
                    limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"prefix": prefix, "kind": kind, "tag": tags or None, "limit": limit,
                                    "cursor": cursor}.items() if v is not None}
        return self._json("GET", "/models", params=params)  # type: ignore[no-any-return]

    def set_model_tag(self, name: str, key: str, value: str) -> dict[str, Any]:
        return self._json("PUT", f"/models/{_q(name)}/tags/{_q(key)}", json={"value": value})  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ versions

    def get_version(self, ref: str) -> dict[str, Any]:
        return self._json("GET", _version_path(ref))  # type: ignore[no-any-return]

    def search_versions(self, *, model: str | None = None, prefix: str | None = None, kind: str | None = None,
                        tags: list[str] | None = None, base: str | None = None, status: str | None = None,
                        archived: bool = False, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        """One page of versions matching every filter (``tags``: ``key=value`` or ``key``)."""
        params = {k: v for k, v in {"model": model, "prefix": prefix, "kind": kind, "tag": tags or None,
                                    "base": base, "status": status, "archived": archived or None,
                                    "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._json("GET", "/versions", params=params)  # type: ignore[no-any-return]

    def iter_versions(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every version matching the filters, following ``next_cursor``."""
        params = {k: v for k, v in filters.items() if v is not None}
        if "tags" in params:
            params["tag"] = params.pop("tags")
        return self._pages("/versions", params)

    def archive(self, ref: str) -> dict[str, Any]:
        return self._json("DELETE", _version_path(ref))  # type: ignore[no-any-return]

    def set_tags(self, ref: str, tags: dict[str, str]) -> dict[str, Any]:
        return self._json("POST", _version_path(ref) + "/tags", json={"tags": tags})  # type: ignore[no-any-return]

    def delete_tag(self, ref: str, key: str) -> dict[str, Any]:
        return self._json("DELETE", _version_path(ref) + f"/tags/{_q(key)}")  # type: ignore[no-any-return]

    def lineage(self, ref: str, direction: str = "both", depth: int = 25) -> dict[str, Any]:
        return self._json("GET", _version_path(ref) + "/lineage",
                          params={"direction": direction, "depth": depth})  # type: ignore[no-any-return]

    def set_alias(self, name: str, alias: str, version: str | int) -> dict[str, Any]:
        return self._json("PUT", f"/models/{_q(name)}/aliases/{_q(alias)}",
                          json={"version": str(version)})  # type: ignore[no-any-return]

    def delete_alias(self, name: str, alias: str) -> None:
        self._json("DELETE", f"/models/{_q(name)}/aliases/{_q(alias)}")

    def list_aliases(self, name: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/models/{_q(name)}/aliases")  # type: ignore[no-any-return]

    def events(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return self._json("GET", "/events", params={"after": after, "limit": limit})["items"]  # type: ignore[no-any-return]

    def promote(self, ref: str, alias: str | None = None) -> dict[str, Any]:
        """Candidate -> ready, optionally pointing ``alias`` at it."""
        return self._json("POST", _version_path(ref) + "/promote", json={"alias": alias})  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ jobs and derived artifacts

    def get_job(self, job_id: int) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{job_id}")  # type: ignore[no-any-return]

    def list_jobs(self, state: str | None = None, type: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"state": state, "type": type, "limit": limit}.items() if v is not None}
        return self._json("GET", "/jobs", params=params)["items"]  # type: ignore[no-any-return]

    def wait_job(self, job_id: int, timeout: float = 3600, poll: float = 0.5,
                 on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a job until it succeeds or fails (raises :class:`JobFailed` on failure)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job["state"] == "succeeded":
                return job
            if job["state"] in ("failed", "cancelled"):
                err = job.get("error") or {}
                raise JobFailed(0, err.get("code", "job_failed"), f"job {job_id} {job['state']}: "
                                f"{err.get('message', '')}", err.get("details"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")
            time.sleep(poll)

    def create_basis(self, members: list[str], *, p: int | None = None, max_error: float | None = None,
                     name: str | None = None, collection: str | None = None) -> dict[str, Any]:
        """Queue an RMM basis job; returns the job (``wait_job`` for its result)."""
        return self._json("POST", "/bases", json={"members": members, "p": p, "max_error": max_error, "name": name,
                                                   "collection": collection})  # type: ignore[no-any-return]

    def get_basis(self, basis_id: int) -> dict[str, Any]:
        return self._json("GET", f"/bases/{basis_id}")  # type: ignore[no-any-return]

    def list_bases(self, collection: str | None = None) -> list[dict[str, Any]]:
        return self._json("GET", "/bases", params={"collection": collection} if collection else {})  # type: ignore[no-any-return]

    def compress(self, members: list[str] | None = None, *, max_error: float, base: str | None = None,
                 tags: dict[str, str | None] | None = None, methods: list[str] | None = None,
                 name: str | None = None, collection: str | None = None, prune: bool = False) -> dict[str, Any]:
        """Queue a compression plan over ``members`` (or the adapters of ``base`` carrying ``tags``):
        every member within ``max_error``; ``prune``: then served rebuilt from the plan. Returns the
        job (``wait_job`` for its result)."""
        body = {"members": members, "base": base, "tags": tags, "max_error": max_error, "methods": methods,
                "name": name, "collection": collection, "prune": prune}
        return self._json("POST", "/compressions", json={k: v for k, v in body.items() if v is not None})  # type: ignore[no-any-return]

    def get_compression(self, compression_id: int) -> dict[str, Any]:
        return self._json("GET", f"/compressions/{compression_id}")  # type: ignore[no-any-return]

    def list_compressions(self, collection: str | None = None) -> list[dict[str, Any]]:
        return self._json("GET", "/compressions", params={"collection": collection} if collection else {})  # type: ignore[no-any-return]

    def prune_compression(self, compression_id: int, max_error: float | None = None) -> dict[str, Any]:
        """Queue pruning of a plan's members (within ``max_error``, default the plan's budget): they
        give up their own blobs and are served rebuilt from the plan (a job)."""
        return self._json("POST", f"/compressions/{compression_id}/prune", json={"max_error": max_error})  # type: ignore[no-any-return]

    def transfer(self, finetune: str, target_base: str, alpha: float = 1.0, storage: str = "stored") -> dict[str, Any]:
        """Queue a fine-tuning transfer; the job's result is a candidate version (``storage``:
        "stored" keeps its weights, "derived" keeps only the recipe target + α(fine-tune − source))."""
        return self._json("POST", "/transfers", json={"finetune": finetune, "target_base": target_base,
                                                       "alpha": alpha, "storage": storage})  # type: ignore[no-any-return]

    def prune(self, basis_id: int, max_error: float | None = None) -> dict[str, Any]:
        """Queue pruning of a basis' members within the error budget (a job)."""
        return self._json("POST", f"/bases/{basis_id}/prune", json={"max_error": max_error})  # type: ignore[no-any-return]

    def verify(self, ref: str) -> dict[str, Any]:
        """Queue a checksum verification of every file of a version (a job)."""
        return self._json("POST", _version_path(ref) + "/verify")  # type: ignore[no-any-return]

    def pack(self, ref: str) -> dict[str, Any]:
        """Queue packing a version losslessly (a job)."""
        return self._json("POST", _version_path(ref) + "/pack")  # type: ignore[no-any-return]

    def storage(self) -> dict[str, Any]:
        """Logical vs physical bytes per model and in total."""
        return self._json("GET", "/storage")  # type: ignore[no-any-return]

    def merge(self, method: str, inputs: list[str], name: str, params: dict[str, Any] | None = None,
              rank: int | None = None) -> dict[str, Any]:
        return self._json("POST", "/merges", json={"method": method, "inputs": inputs, "name": name,
                                                    "params": params or {}, "rank": rank})  # type: ignore[no-any-return]

    def create_policy(self, name: str, type: str, base_model: str,
                      params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._json("POST", "/policies", json={"name": name, "type": type, "base_model": base_model,
                                                      "params": params or {}})  # type: ignore[no-any-return]

    def list_policies(self) -> list[dict[str, Any]]:
        return self._json("GET", "/policies")  # type: ignore[no-any-return]

    def delete_policy(self, name: str) -> None:
        self._json("DELETE", f"/policies/{_q(name)}")

    # ------------------------------------------------------------------ webhooks

    def create_webhook(self, url: str, events: list[str], secret: str | None = None,
                       description: str = "") -> dict[str, Any]:
        """Subscribe ``url`` to events matching the patterns; the result holds ``secret`` (shown once)."""
        return self._json("POST", "/webhooks", json={"url": url, "events": events, "secret": secret,
                                                      "description": description})  # type: ignore[no-any-return]

    def list_webhooks(self) -> list[dict[str, Any]]:
        return self._json("GET", "/webhooks")  # type: ignore[no-any-return]

    def get_webhook(self, webhook_id: int) -> dict[str, Any]:
        return self._json("GET", f"/webhooks/{webhook_id}")  # type: ignore[no-any-return]

    def update_webhook(self, webhook_id: int, *, url: str | None = None, events: list[str] | None = None,
                       active: bool | None = None, description: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in {"url": url, "events": events, "active": active,
                                  "description": description}.items() if v is not None}
        return self._json("PATCH", f"/webhooks/{webhook_id}", json=body)  # type: ignore[no-any-return]

    def delete_webhook(self, webhook_id: int) -> None:
        self._json("DELETE", f"/webhooks/{webhook_id}")

    def list_deliveries(self, webhook_id: int, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """A webhook's deliveries, newest first (without the per-attempt log: see get_delivery)."""
        params = {k: v for k, v in {"status": status, "limit": limit}.items() if v is not None}
        return self._json("GET", f"/webhooks/{webhook_id}/deliveries", params=params)["items"]  # type: ignore[no-any-return]

    def get_delivery(self, delivery_id: int) -> dict[str, Any]:
        return self._json("GET", f"/deliveries/{delivery_id}")  # type: ignore[no-any-return]

    def redeliver(self, delivery_id: int) -> dict[str, Any]:
        """Send a delivery again; returns ``{"delivery", "job"}``."""
        return self._json("POST", f"/deliveries/{delivery_id}/redeliver")  # type: ignore[no-any-return]

    def store_predictions(self, ref: str, dataset: str, *, predictions: list[Any] | None = None,
                          labels: list[Any] | None = None, scores: list[float] | None = None,
                          kind: str = "classification", replace: bool = False) -> dict[str, Any]:
        """Store a version's predictions on a labelled dataset (for compatibility reports)."""
        body = {"dataset": dataset, "kind": kind, "predictions": predictions, "labels": labels, "scores": scores,
                "replace": replace}
        return self._json("POST", _version_path(ref) + "/predictions", json=body)  # type: ignore[no-any-return]

    def compat(self, old: str, new: str, dataset: str) -> dict[str, Any]:
        """MUSCLE metrics (negative flip rate, ...) of updating ``old`` to ``new``."""
        return self._json("GET", "/compat", params={"old": old, "new": new, "dataset": dataset})  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ tokens

    def create_token(self, name: str, scope: str = "read", expires_days: int | None = None) -> dict[str, Any]:
        return self._json("POST", "/tokens", json={"name": name, "scope": scope,
                                                    "expires_days": expires_days})  # type: ignore[no-any-return]

    def list_tokens(self) -> list[dict[str, Any]]:
        return self._json("GET", "/tokens")  # type: ignore[no-any-return]

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        return self._json("DELETE", f"/tokens/{token_id}")  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ push

    def push(self, folder: str | Path, name: str, *, kind: str | None = None, base: str | None = None,
             tags: dict[str, str] | None = None, aliases: list[str] | None = None, description: str = "",
             parents: list[dict[str, Any]] | None = None, dedup: bool = True,
             progress: Progress | None = None) -> dict[str, Any]:
        """Upload a folder (or one file) as the next version of ``name``; returns the version.

        Each file is hashed first; with ``dedup`` bytes the registry already holds are linked, not
        sent. Files over 64 MiB use a resumable upload. While the server is unreachable (restarting)
        every step is retried and resumes where it was, with the same draft; a commit whose answer
        was lost is looked up before it is repeated. On a failure that is not retried the draft is
        aborted: nothing becomes visible."""
        files = iter_folder(Path(folder))
        if not files:
            raise ValueError(f"{folder}: no files to push")
        # Repeated after a broken connection too: at worst an empty draft is left, invisible, removed by gc.
        draft = self._json("POST", "/drafts", idempotent=True, what="start of the push", json={
            "model": name, "kind": kind, "base": base, "tags": tags or {}, "aliases": aliases or [],
            "description": description, "parents": parents or []})
        manifest: dict[str, str] = {}
        try:
            for rel, path in files:
                sha = _hash_file(path, progress) if dedup else None
                size = path.stat().st_size
                if sha is not None:
                    try:  # linking a path again replaces the link: safe to repeat
                        self._json("POST", f"/drafts/{draft['id']}/links", idempotent=True, what=f"link of {rel}",
                                   json={"path": rel, "sha256": sha, "size": size})
                        manifest[rel] = sha
                        if progress:
                            progress("upload", size)
                        continue
                    except RegistryAPIError as e:
                        if e.code != "blob_not_found":
                            raise
                if size > RESUMABLE_THRESHOLD:
                    got = self._upload_resumable(draft["id"], rel, path, size, sha, progress)
                else:
                    got = self._upload_simple(draft["id"], rel, path, sha, progress)
                manifest[rel] = got["sha256"]
            return self._commit_draft(draft["id"], name, manifest)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort; gc removes abandoned drafts anyway
                self._http.delete(f"/drafts/{draft['id']}", timeout=10)
            raise

    def _commit_draft(self, draft_id: str, name: str, manifest: dict[str, str]) -> dict[str, Any]:
        """Commit a draft; after a lost answer find out whether the commit happened. The server deletes
        the draft in the transaction that creates the version, so a draft that still exists was not
        committed (commit again), and a draft that is gone was, into the newest version of ``name``
        holding exactly ``manifest`` (never a second version: the server refuses duplicate content)."""
        retry = self._retry("commit")
        chash = content_hash(manifest)
        retried = False
        while True:
            try:
                return self._attempt("POST", f"/drafts/{draft_id}/commit").json()  # type: ignore[no-any-return]
            except (httpx.TransportError, RegistryAPIError) as e:
                if retried and isinstance(e, RegistryAPIError) and e.code in ("draft_not_found", "duplicate_content"):
                    # an earlier try committed meanwhile (or, with the draft still there, a true duplicate)
                    found = None if self._draft_exists(draft_id) else self._version_holding(name, chash)
                    if found is not None:
                        return found
                    raise
                if not _transient(e, idempotent=True):
                    if isinstance(e, httpx.TransportError):
                        raise RegistryConnectionError(f"cannot reach the registry at {self.url}: {e}") from e
                    raise
                retry.wait(e)
                retried = True
                if self._draft_exists(draft_id):
                    continue
                found = self._version_holding(name, chash)
                if found is not None:
                    self._on_retry(f"registry: commit: {found['ref']} was committed before the connection broke")
                    return found
                raise RegistryAPIError(404, "draft_not_found", f"draft {draft_id} is gone and no version of "
                                       f"{name} holds its files (aborted or expired meanwhile); push again") from e

    def _draft_exists(self, draft_id: str) -> bool:
        try:
            self._json("GET", f"/drafts/{draft_id}", what="draft lookup")
            return True
        except RegistryAPIError as e:
            if e.status == 404:
                return False
            raise

    def _version_holding(self, name: str, chash: str) -> dict[str, Any] | None:
        """The newest live version of ``name`` whose files are exactly those of content sha256 ``chash``."""
        try:
            page = self.search_versions(model=name, limit=20)
        except RegistryAPIError as e:
            if e.status == 404:
                return None
            raise
        for v in page["items"]:
            if v["content_sha256"] == chash:
                return self.get_version(v["ref"])
        return None

    def _read_chunks(self, path: Path, start: int, length: int, progress: Progress | None,
                     hasher: Any = None) -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{path} shrank while uploading")
                left -= len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                if progress:
                    progress("upload", len(chunk))
                yield chunk

    def _upload_simple(self, draft_id: str, rel: str, path: Path, sha: str | None,
                       progress: Progress | None) -> dict[str, Any]:
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

        return self._json("PUT", f"/drafts/{draft_id}/files/{quote(rel)}", headers=headers, content=body,  # type: ignore[no-any-return]
                          what=f"upload of {rel}")

    def _upload_resumable(self, draft_id: str, rel: str, path: Path, size: int, sha: str | None,
                          progress: Progress | None) -> dict[str, Any]:
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

        def open_session() -> str:
            # Repeated after a broken connection too: an unused session is removed with its draft.
            up = self._json("POST", f"/drafts/{draft_id}/uploads", idempotent=True, what=f"upload of {rel}",
                            json={"path": rel, "size": size})
            return str(up["id"])

        upload_id = open_session()
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
                    r = self._attempt("PATCH", f"/uploads/{upload_id}",
                                      content=self._read_chunks(path, offset, length, count, trial),
                                      headers={"Upload-Offset": str(offset), "Content-Length": str(length),
                                               "Content-Type": "application/octet-stream"})
                    received = int(r.json()["received"])
                    retry.reset()
                    resyncs = 0
                except (httpx.TransportError, RegistryAPIError) as e:
                    if isinstance(e, RegistryAPIError) and e.code == "offset_mismatch" and resyncs < OFFSET_RESYNCS:
                        resyncs += 1
                    elif not _transient(e, idempotent=True):  # a chunk at an explicit offset: safe to resend
                        if isinstance(e, httpx.TransportError):
                            raise RegistryConnectionError(f"cannot reach the registry at {self.url}: {e}") from e
                        raise
                    else:
                        retry.wait(e)
                    received = int(self._json("GET", f"/uploads/{upload_id}", what=f"upload of {rel}")["received"])
                if hasher is not None and trial is not None and sent == length and received == offset + length:
                    hasher, hashed = trial, received
                else:
                    rehash(received)
                offset = received
                report(offset)
                continue
            rehash(size)
            digest = sha or (hasher.hexdigest() if hasher is not None else "")
            try:
                return self._attempt("POST", f"/uploads/{upload_id}/commit",  # type: ignore[no-any-return]
                                     json={"sha256": digest}).json()
            except (httpx.TransportError, RegistryAPIError) as e:
                if isinstance(e, RegistryAPIError) and e.code == "upload_incomplete":
                    pass  # the server holds fewer bytes than it acknowledged: resend from its offset
                elif not _transient(e, idempotent=True):
                    if isinstance(e, httpx.TransportError):
                        raise RegistryConnectionError(f"cannot reach the registry at {self.url}: {e}") from e
                    raise
                else:
                    retry.wait(e)
            try:  # did the session commit happen? An open session did not: continue it.
                offset = int(self._json("GET", f"/uploads/{upload_id}", what=f"upload of {rel}")["received"])
                report(offset)
                continue
            except RegistryAPIError as e:
                if e.code != "upload_not_found":
                    raise
            draft = self._json("GET", f"/drafts/{draft_id}", what=f"upload of {rel}")
            done = next((f for f in draft["files"] if f["path"] == rel and f["sha256"] == digest), None)
            if done is not None:
                return {**done, "deduplicated": False}
            self._on_retry(f"registry: upload of {rel}: the server lost the upload session; sending the file again")
            upload_id, offset = open_session(), 0
            report(0)

    # ------------------------------------------------------------------ pull

    def list_files(self, ref: str, format: str = "native") -> list[dict[str, Any]]:
        return self._json("GET", _version_path(ref) + "/files", params={"format": format})  # type: ignore[no-any-return]

    def pull(self, ref: str, dest: str | Path, *, files: list[str] | None = None, format: str = "native",
             progress: Progress | None = None) -> dict[str, Any]:
        """Download a version into ``dest``, verifying every file's sha256. ``format``: native
        (as stored or derived), or for adapters ``delta`` (dense per-module deltas) / ``merged``
        (base + adapter as full weights). Files already present with the right hash are skipped;
        interrupted downloads resume from their ``.part`` file."""
        from .formats.paths import clean_path

        version = self.get_version(ref)
        dest = Path(dest)
        listing = version["files"] if format == "native" else self.list_files(version["ref"], format)
        wanted = listing if files is None else [f for f in listing if f["path"] in set(files)]
        for f in wanted:
            target = dest / clean_path(f["path"])
            if target.exists() and target.stat().st_size == f["size"] and _hash_file(target) == f["sha256"]:
                if progress:
                    progress("download", f["size"])
                continue
            self.download_file(version["ref"], f["path"], target, expected_sha256=f["sha256"], progress=progress,
                               format=format)
        return version

    def download_file(self, ref: str, path: str, target: str | Path, *, expected_sha256: str | None = None,
                      progress: Progress | None = None, format: str = "native") -> str:
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
            h = hashlib.sha256()
            start = 0
            if part.exists():
                with open(part, "rb") as f:
                    while chunk := f.read(4 * CHUNK):
                        h.update(chunk)
                        start += len(chunk)
            report(start)
            headers = {"Range": f"bytes={start}-", "If-Range": f'"{known_sha}"'} if start and known_sha else {}
            server_sha = None
            try:
                with self._http.stream("GET", url, headers=headers) as r:
                    if r.status_code == 416:  # the .part is already complete (or bogus): start over
                        part.unlink(missing_ok=True)
                        continue
                    if r.status_code >= 400:
                        r.read()
                        self._raise_for(r)
                    server_sha = r.headers.get("x-checksum-sha256")
                    known_sha = known_sha or server_sha
                    if r.status_code != 206:
                        h, start = hashlib.sha256(), 0
                        report(0)
                    with open(part, "ab" if r.status_code == 206 else "wb") as out:
                        for chunk in r.iter_bytes(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            start += len(chunk)
                            report(start)
                retry.reset()
            except (httpx.TransportError, RegistryAPIError) as e:
                if not _transient(e, idempotent=True):
                    if isinstance(e, httpx.TransportError):
                        raise RegistryConnectionError(f"download of {ref}:{path} interrupted: {e}") from e
                    raise
                retry.wait(e)
                continue
            actual = h.hexdigest()
            want = expected_sha256 or server_sha
            if want and actual != want:
                part.unlink(missing_ok=True)
                raise RegistryAPIError(0, "checksum_mismatch", f"{path}: downloaded bytes hash to {actual}, "
                                       f"expected {want}")
            os.replace(part, target)
            return actual
