"""Python client for the registry's HTTP API.

    from registry.client import RegistryClient

    with RegistryClient("http://127.0.0.1:8080", token=None) as rc:
        v = rc.push("demo/base", name="demo-base")                  # -> {"ref": "demo-base@1", ...}
        rc.push("demo/adapter-sql", name="sql-lora", base=v["ref"])
        rc.pull("sql-lora@1", "out/sql-lora")                        # verifies every sha256
        rc.search_versions(kind="adapter", base="demo-base@1")

Errors from the server raise :class:`RegistryAPIError` (``status``, ``code``, ``message``,
``details``); an unreachable server raises :class:`RegistryConnectionError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .config import get_settings

CHUNK = 4 << 20
RESUMABLE_THRESHOLD = 64 << 20  # files larger than this go through resumable upload sessions
UPLOAD_CHUNK = 64 << 20
RETRIES = 5

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


class RegistryConnectionError(Exception):
    pass


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
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 300.0) -> None:
        settings = get_settings()
        self.url = (url or settings.client_url).rstrip("/")
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

    def _req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise RegistryConnectionError(f"cannot reach the registry at {self.url}: {e}") from e
        self._raise_for(r)
        return r

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
        """Poll a job until it succeeds or fails (raises RegistryAPIError on failure)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job["state"] == "succeeded":
                return job
            if job["state"] in ("failed", "cancelled"):
                err = job.get("error") or {}
                raise RegistryAPIError(0, err.get("code", "job_failed"), f"job {job_id} {job['state']}: "
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
        sent. Files over 64 MiB use a resumable upload that survives dropped connections. On any
        failure the draft is aborted: nothing becomes visible."""
        files = iter_folder(Path(folder))
        if not files:
            raise ValueError(f"{folder}: no files to push")
        draft = self._json("POST", "/drafts", json={
            "model": name, "kind": kind, "base": base, "tags": tags or {}, "aliases": aliases or [],
            "description": description, "parents": parents or []})
        try:
            for rel, path in files:
                sha = _hash_file(path, progress) if dedup else None
                size = path.stat().st_size
                if sha is not None:
                    try:
                        self._json("POST", f"/drafts/{draft['id']}/links",
                                   json={"path": rel, "sha256": sha, "size": size})
                        if progress:
                            progress("upload", size)
                        continue
                    except RegistryAPIError as e:
                        if e.code != "blob_not_found":
                            raise
                if size > RESUMABLE_THRESHOLD:
                    self._upload_resumable(draft["id"], rel, path, size, sha, progress)
                else:
                    self._upload_simple(draft["id"], rel, path, sha, progress)
            return self._json("POST", f"/drafts/{draft['id']}/commit")  # type: ignore[no-any-return]
        except BaseException:
            with contextlib.suppress(Exception):  # best effort; gc removes abandoned drafts anyway
                self._http.delete(f"/drafts/{draft['id']}")
            raise

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

    def _upload_simple(self, draft_id: str, rel: str, path: Path, sha: str | None, progress: Progress | None) -> None:
        size = path.stat().st_size
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if sha:
            headers["X-Checksum-Sha256"] = sha
        self._json("PUT", f"/drafts/{draft_id}/files/{quote(rel)}", headers=headers,
                   content=self._read_chunks(path, 0, size, progress))

    def _upload_resumable(self, draft_id: str, rel: str, path: Path, size: int, sha: str | None,
                          progress: Progress | None) -> None:
        hasher = hashlib.sha256() if sha is None else None
        up = self._json("POST", f"/drafts/{draft_id}/uploads", json={"path": rel, "size": size})
        offset, failures = 0, 0
        while offset < size:
            length = min(UPLOAD_CHUNK, size - offset)
            try:
                r = self._http.patch(
                    f"/uploads/{up['id']}", content=self._read_chunks(path, offset, length, progress, hasher),
                    headers={"Upload-Offset": str(offset), "Content-Length": str(length),
                             "Content-Type": "application/octet-stream"})
                self._raise_for(r)
                offset = r.json()["received"]
                failures = 0
            except (httpx.TransportError, RegistryAPIError) as e:
                failures += 1
                if failures > RETRIES or (isinstance(e, RegistryAPIError) and e.status < 500
                                          and e.code != "offset_mismatch"):
                    raise
                time.sleep(min(2**failures * 0.2, 5))
                offset = self._json("GET", f"/uploads/{up['id']}")["received"]
                if hasher is not None:  # restart hashing from the server's offset
                    hasher = hashlib.sha256()
                    for _ in self._read_chunks(path, 0, offset, None, hasher):
                        pass
        digest = sha or (hasher.hexdigest() if hasher is not None else "")
        self._json("POST", f"/uploads/{up['id']}/commit", json={"sha256": digest})

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
        """Download one file to ``target`` (resuming ``target.part``); returns its verified sha256."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        h = hashlib.sha256()
        start = 0
        if part.exists():
            with open(part, "rb") as f:
                while chunk := f.read(4 * CHUNK):
                    h.update(chunk)
                    start += len(chunk)
            if progress:
                progress("download", start)
        url = _version_path(ref) + f"/files/{quote(path)}" + (f"?format={format}" if format != "native" else "")
        headers = {}
        if start and expected_sha256:
            headers = {"Range": f"bytes={start}-", "If-Range": f'"{expected_sha256}"'}
        try:
            with self._http.stream("GET", url, headers=headers) as r:
                if r.status_code == 416:  # the .part is already complete (or bogus): start over
                    part.unlink(missing_ok=True)
                    return self.download_file(ref, path, target, expected_sha256=expected_sha256, progress=progress,
                                              format=format)
                if r.status_code >= 400:
                    r.read()
                    self._raise_for(r)
                if r.status_code == 200 and start:
                    h, start = hashlib.sha256(), 0
                server_sha = r.headers.get("x-checksum-sha256")
                with open(part, "ab" if r.status_code == 206 else "wb") as out:
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        if progress:
                            progress("download", len(chunk))
        except httpx.TransportError as e:
            raise RegistryConnectionError(f"download of {ref}:{path} interrupted: {e}") from e
        actual = h.hexdigest()
        want = expected_sha256 or server_sha
        if want and actual != want:
            part.unlink(missing_ok=True)
            raise RegistryAPIError(0, "checksum_mismatch", f"{path}: downloaded bytes hash to {actual}, "
                                   f"expected {want}")
        os.replace(part, target)
        return actual
