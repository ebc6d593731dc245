"""The registry as a Hugging Face Hub: repo ids, revisions, commits and the files of a version.

The Hub-compatible read API (:mod:`registry.api.routers.hub`) is a translation layer over this
module, and this module over the registry's one read path: ref resolution
(:mod:`registry.services.refs`), a version's files stored or generated
(:func:`registry.services.derived.served_files`), stored bytes checked as they stream
(:func:`registry.services.integrity.read_stored`) and generated ones
(:func:`registry.services.derived.open_generated`). The rules, each in one place:

**Repo ids.** A Hub repo id is ``name`` or ``namespace/name``; a registry model name has no ``/``.
Model ``name`` is repo ``name``; model ``namespace--name`` is repo ``namespace/name`` (``--`` is
the Hub's own separator in cache folder names, and the Hub forbids it inside a repo id, so the
mapping is one-to-one: ``acme/llama`` is model ``acme--llama`` and never model ``llama``). A
model whose name is no valid repo id under the Hub's rules (:func:`is_repo_id`: ending in ``-`` or
``.``, holding ``..``, a second ``--``, over 96 characters a part) is not reachable here.

**Commits.** The Hub client takes a revision of exactly 40 lowercase hex digits for an immutable
commit (it then answers from its cache without asking). A version's commit is the first 32 hex
digits of its content sha256 followed by its version number as 8 hex digits
(:func:`commit_of`): the content sha256 alone would be shared by two versions of one model that
hold the same files (an adapter re-pinned to another base, which serves another
``adapter_config.json``), and a commit must name one version.

**Revisions** (:func:`resolve`): ``main`` (the Hub's default) is the model's alias ``main`` when it
has one, else the newest ready version (``latest``); 40 lowercase hex digits are a commit; 64 are
a content sha256 (refused as ambiguous when several versions of the model hold that content);
anything else is a registry ref's selector: a version number, an alias, ``latest``. A
40- or 64-digit hex revision is never read as an alias.

**Files.** A version's Hub files are its native files (stored and generated, under their own
sha256), except that an adapter pinned to a base serves a generated ``adapter_config.json``
naming that base by repo id and commit (the rule: :mod:`registry.formats.peft`). Every file is
described as a Git LFS file (``lfs.oid`` = its sha256, as the Hub does for weights).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidInput, NotFound, RegistryError
from ..formats.paths import clean_path
from ..formats.peft import ADAPTER_CONFIG_NAME, resolvable_config
from ..models import Alias, Model, ModelVersion, VersionStatus
from . import derived, integrity, names, refs
from .context import RegistryContext
from .derived import ServedFile

DEFAULT_REVISION = "main"
_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?", re.ASCII)  # the Hub's rule, one part
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
CONTENT_RE = re.compile(r"[0-9a-f]{64}")
NAMESPACE_SEPARATOR = "--"


# ----------------------------------------------------------------------------- repo ids


def is_repo_id(repo_id: str) -> bool:
    """The Hub's rules for a repo id (as its client checks them): ``name`` or ``namespace/name``,
    each 1-96 of letters, digits, ``_``, ``.``, ``-``, starting and ending with a letter, digit or
    ``_``; no ``--`` or ``..`` anywhere; not ending in ``.git``."""
    parts = repo_id.split("/")
    return (len(parts) <= 2 and all(_PART.fullmatch(p) for p in parts) and "--" not in repo_id
            and ".." not in repo_id and not repo_id.endswith(".git"))


def repo_id_of(model_name: str) -> str | None:
    """The repo id model ``model_name`` is served under, None when it has none."""
    if not names.is_model_name(model_name):
        return None
    namespace, sep, rest = model_name.partition(NAMESPACE_SEPARATOR)
    candidate = f"{namespace}/{rest}" if sep else model_name
    return candidate if is_repo_id(candidate) else None


def model_name_of(repo_id: str) -> str | None:
    """The model name repo ``repo_id`` stands for, None when it is no valid repo id."""
    if not is_repo_id(repo_id):
        return None
    name = repo_id.replace("/", NAMESPACE_SEPARATOR)
    return name if names.is_model_name(name) else None


def _repo_not_found(repo_id: str) -> NotFound:
    return NotFound(f"repository {repo_id!r} not found: repo ids are model names, and model 'namespace--name' "
                    "is repo 'namespace/name'", code="model_not_found", details={"repo_id": repo_id})


def pick_repo(ctx: RegistryContext, candidates: list[str]) -> int:
    """Which of the ``candidates`` (readings of one URL: ``a/b/tree/…`` may be repo ``a`` or ``a/b``)
    names a model: its index. Unknown repo: ``model_not_found`` for the first reading; both known:
    ``ambiguous_repo`` (409)."""
    found = []
    with ctx.db.read() as s:
        for i, repo_id in enumerate(candidates):
            name = model_name_of(repo_id)
            if name is not None and s.scalar(select(Model.id).where(Model.name == name)) is not None:
                found.append(i)
    if not found:
        raise _repo_not_found(candidates[0])
    if len(found) > 1:
        both = [candidates[i] for i in found]
        raise Conflict(f"the URL names two repositories ({' and '.join(both)}); ask through one whose "
                       "revision or path does not read as part of the other's URL", code="ambiguous_repo",
                       details={"repo_ids": both})
    return found[0]


# ----------------------------------------------------------------------------- versions


def commit_of(version: int, content_sha256: str) -> str:
    """A version's commit (module docstring): 32 hex digits of content + the number in 8."""
    return content_sha256[:32] + format(version, "08x")


@dataclass(frozen=True)
class HubVersion:
    """One version as the Hub view shows it."""

    repo_id: str
    version_id: int
    ref: str
    commit: str
    kind: str
    storage_mode: str
    status: str
    created_at: datetime
    model_created_at: datetime
    base_repo_id: str | None  # an adapter's or fine-tune's pinned base, when reachable here
    base_commit: str | None
    tags: dict[str, str]


def _revision_not_found(repo_id: str, revision: str, why: str = "") -> NotFound:
    return NotFound(f"revision {revision!r} of {repo_id!r} not found{why}: a version number, an alias, 'main', "
                    "'latest', a commit (40 hex digits) or a content sha256 (64)", code="version_not_found",
                    details={"repo_id": repo_id, "revision": revision})


def _version(s: Session, model: Model, repo_id: str, revision: str) -> ModelVersion:
    if COMMIT_RE.fullmatch(revision):
        v = s.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                ModelVersion.version == int(revision[32:], 16)))
        if v is None or not v.content_sha256.startswith(revision[:32]):
            raise _revision_not_found(repo_id, revision)
        return v
    if CONTENT_RE.fullmatch(revision):
        held = list(s.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                         ModelVersion.content_sha256 == revision)
                              .order_by(ModelVersion.version)))
        if len(held) > 1:
            which = [f"{v.version} (commit {commit_of(v.version, v.content_sha256)})" for v in held]
            raise Conflict(f"{len(held)} versions of {repo_id!r} hold content {revision}: versions "
                           f"{', '.join(which)}; ask for one by number or commit", code="ambiguous_revision",
                           details={"repo_id": repo_id, "revision": revision, "versions": [v.version for v in held]})
        if not held:
            raise _revision_not_found(repo_id, revision)
        return held[0]
    if revision == DEFAULT_REVISION:
        try:
            return refs.resolve(s, refs.Ref(model.name, alias=DEFAULT_REVISION))
        except NotFound:
            revision = "latest"
    try:
        ref = refs.parse_ref(f"{model.name}@{revision}")
    except RegistryError:
        raise _revision_not_found(repo_id, revision) from None
    try:
        return refs.resolve(s, ref)
    except NotFound:
        why = " (no ready version)" if ref.version is None and ref.alias is None else ""
        raise _revision_not_found(repo_id, revision, why) from None


def _model(s: Session, repo_id: str) -> Model:
    name = model_name_of(repo_id)
    model = None if name is None else s.scalar(refs.model_named(name))
    if model is None:
        raise _repo_not_found(repo_id)
    return model


def resolve(ctx: RegistryContext, repo_id: str, revision: str | None) -> HubVersion:
    """The version ``revision`` names in repo ``repo_id`` (rules: module docstring). Raises
    ``model_not_found``, ``version_not_found`` or ``ambiguous_revision``."""
    with ctx.db.read() as s:
        model = _model(s, repo_id)
        v = _version(s, model, repo_id, revision or DEFAULT_REVISION)
        base_repo, base_commit = None, None
        if v.base_version_id is not None:
            base = s.get(ModelVersion, v.base_version_id)
            assert base is not None
            base_repo = repo_id_of(base.model.name)
            base_commit = commit_of(base.version, base.content_sha256)
        tags = {t.key: t.value for t in model.tags}
        return HubVersion(repo_id=repo_id, version_id=v.id, ref=v.ref, commit=commit_of(v.version, v.content_sha256),
                          kind=v.kind, storage_mode=v.storage_mode, status=v.status, created_at=v.created_at,
                          model_created_at=model.created_at, base_repo_id=base_repo, base_commit=base_commit,
                          tags=tags)


@dataclass(frozen=True)
class GitRef:
    """A revision the Hub lists as a Git ref: ``name`` (what to pass as ``revision``), its full
    ``ref`` and the commit it names now."""

    name: str
    ref: str
    commit: str


def git_refs(ctx: RegistryContext, repo_id: str) -> tuple[list[GitRef], list[GitRef]]:
    """(branches, tags) of repo ``repo_id``: the movable revisions as branches, ``main`` first (when
    it names a version: the alias ``main``, else the newest ready version) then every other alias by
    name; the immutable ones as tags: every ready or candidate version by number, oldest first."""
    with ctx.db.read() as s:
        model = _model(s, repo_id)
        branches = []
        try:
            v = _version(s, model, repo_id, DEFAULT_REVISION)
            branches.append(GitRef(DEFAULT_REVISION, f"refs/heads/{DEFAULT_REVISION}", commit_of(v.version,
                                                                                             v.content_sha256)))
        except NotFound:
            pass
        rows = s.execute(select(Alias.name, ModelVersion.version, ModelVersion.content_sha256)
                         .join(ModelVersion, ModelVersion.id == Alias.version_id)
                         .where(Alias.model_id == model.id).order_by(Alias.name))
        # an alias spelled like a commit or a content sha256 is never read as one (module docstring)
        branches += [GitRef(a, f"refs/heads/{a}", commit_of(n, sha)) for a, n, sha in rows
                     if a != DEFAULT_REVISION and not COMMIT_RE.fullmatch(a) and not CONTENT_RE.fullmatch(a)]
        listed = (VersionStatus.ready.value, VersionStatus.candidate.value)
        rows = s.execute(select(ModelVersion.version, ModelVersion.content_sha256)
                         .where(ModelVersion.model_id == model.id, ModelVersion.status.in_(listed))
                         .order_by(ModelVersion.version))
        tags = [GitRef(str(n), f"refs/tags/{n}", commit_of(n, sha)) for n, sha in rows]
        return branches, tags


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class HubFile:
    """A file of the Hub view: a native file, or (``data`` set) one the view generates in its place."""

    path: str
    sha256: str
    size: int
    native: ServedFile
    data: bytes | None = None

    @property
    def lfs_pointer(self) -> bytes:
        """The Git LFS pointer file of these bytes (what a Hub repo commits for a large file)."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def blob_oid(self) -> str:
        """The Git object id of the LFS pointer (the ``oid`` the Hub lists for an LFS file)."""
        pointer = self.lfs_pointer
        return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer, usedforsecurity=False).hexdigest()


def _native_bytes(ctx: RegistryContext, version_id: int, f: ServedFile, start: int, end: int) -> Iterator[bytes]:
    if f.blob:
        return integrity.read_stored(ctx, version_id, f, start, end)
    return derived.open_generated(ctx, version_id, "native", f, start, end)


def _hub_file(ctx: RegistryContext, hv: HubVersion, f: ServedFile) -> HubFile:
    if f.path == ADAPTER_CONFIG_NAME and hv.kind == "adapter" and hv.base_repo_id and hv.base_commit:
        raw = b"".join(_native_bytes(ctx, hv.version_id, f, 0, f.size))
        data = resolvable_config(raw, hv.base_repo_id, hv.base_commit)
        if data != raw:
            return HubFile(f.path, hashlib.sha256(data).hexdigest(), len(data), f, data)
    return HubFile(f.path, f.sha256, f.size, f)


def files(ctx: RegistryContext, hv: HubVersion) -> list[HubFile]:
    """Every file of the version as the Hub view serves it, by path."""
    return [_hub_file(ctx, hv, f) for f in derived.served_files(ctx, hv.version_id, "native")]


def _entry_not_found(hv: HubVersion, path: str) -> NotFound:
    return NotFound(f"{hv.repo_id} at {hv.ref} has no file {path!r}", code="file_not_found",
                    details={"repo_id": hv.repo_id, "ref": hv.ref, "path": path, "commit": hv.commit})


def file(ctx: RegistryContext, hv: HubVersion, path: str) -> HubFile:
    """One file (``unsafe_path`` for a path that could leave the version; ``file_not_found``)."""
    path = clean_path(path)
    for f in derived.served_files(ctx, hv.version_id, "native"):
        if f.path == path:
            return _hub_file(ctx, hv, f)
    raise _entry_not_found(hv, path)


def read(ctx: RegistryContext, hv: HubVersion, f: HubFile, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of a Hub file, through the registry's read path (checked as they stream)."""
    if f.data is not None:
        return iter([f.data[start:end]])
    return _native_bytes(ctx, hv.version_id, f.native, start, end)


@dataclass(frozen=True)
class Folder:
    path: str

    def oid(self, commit: str) -> str:
        """A stable 40-hex id for the folder at a commit (the registry keeps no Git trees)."""
        return hashlib.sha1(f"tree {commit}:{self.path}".encode(), usedforsecurity=False).hexdigest()


def tree(hv: HubVersion, all_files: list[HubFile], path: str | None, recursive: bool) -> list[HubFile | Folder]:
    """The entries under folder ``path`` (the root when None): its files and folders, or with
    ``recursive`` everything below it, by path. ``file_not_found`` when ``path`` is no folder."""
    prefix = ""
    if path:
        path = clean_path(path.strip("/"))
        prefix = path + "/"
        if not any(f.path.startswith(prefix) for f in all_files):
            raise _entry_not_found(hv, path)
    out: dict[str, HubFile | Folder] = {}
    for f in all_files:
        if not f.path.startswith(prefix):
            continue
        parts = f.path[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folder = prefix + "/".join(parts[:depth])
            out.setdefault(folder, Folder(folder))
        if recursive or len(parts) == 1:
            out[f.path] = f
    return [out[k] for k in sorted(out)]


MAX_PATHS = 1000  # one paths-info request (the Hub client sends all of its paths in one)


def paths_info(hv: HubVersion, all_files: list[HubFile], paths: list[str]) -> list[HubFile | Folder]:
    """The entries ``paths`` name, in the order asked, each once: a file, or a folder (a prefix of
    some file's path). A path naming neither, and the root (``""``), are left out, as the Hub does;
    a path that could leave the version is ``unsafe_path``; over :data:`MAX_PATHS`, ``too_many_paths``."""
    if len(paths) > MAX_PATHS:
        raise InvalidInput(f"{len(paths)} paths in one request; at most {MAX_PATHS}", code="too_many_paths",
                           details={"count": len(paths), "limit": MAX_PATHS})
    by_path = {f.path: f for f in all_files}
    folders = {f.path.rsplit("/", depth)[0] for f in all_files for depth in range(1, f.path.count("/") + 1)}
    out: dict[str, HubFile | Folder] = {}
    for raw in paths:
        path = raw.strip("/")
        if not path:
            continue
        path = clean_path(path)
        entry = by_path.get(path) or (Folder(path) if path in folders else None)
        if entry is not None:
            out.setdefault(path, entry)
    return list(out.values())

