"""Packing: every version kept losslessly in as few bytes as possible, served byte-exact.

A pack job (queued after each commit when ``REGISTRY_PACK=auto``, or by ``registry pack``)
rewrites each raw file of a version as segments (:func:`registry.weights.packing.segments`: the
header, each tensor, frames of large tensors). Each segment is a chunk addressed by the sha256
of its bytes, so a tensor the registry already holds is kept once, whatever file, shard or
header it arrives in. A new chunk is coded (:func:`registry.weights.packing.encode`) on its own
or as its difference from the same tensor of a **reference** version — the version's ``finetune_of``
or ``transfer_of`` parent, its base when it is a full model, else the previous version of the
same model — whichever is smallest. A reference chain never grows past :data:`MAX_CHAIN`
(deeper chunks are coded on their own again), and a chunk someone codes against cannot be
removed (foreign key), so gc can never collect what a packed file still needs.

Crash safety follows the blob-claim protocol of :mod:`registry.services.blobs`:

1. every new payload is decoded (against the very reference bytes it was coded against, which
   are what every later reader decodes) and compared with the segment it stands for, every
   chunk the registry already held is decoded from the store and compared likewise, and the
   segments together must hash to the file's recorded sha256 (so a raw object damaged on disk
   is never packed); any mismatch and nothing changes;
2. the payloads are written to the store under claims (``pending`` rows: gc leaves them alone)
   and read back: each must hash to its name;
3. one transaction turns the claims ``ready``, records chunks and segments, and flips the
   file's row to ``packed``;
4. only then is the raw object released (a reader that just missed it starts again from the
   packed form; gc releases what a crash left behind).

The version is servable at every step; a worker killed anywhere leaves it as it was (raw), and
the retried job starts over (already packed files are skipped; gc removes the scratch space of
the killed attempt).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import case, exists, func, select, update
from sqlalchemy.orm import Session

from ..config import Settings
from ..errors import NotFound
from ..models import (
    Blob,
    BlobForm,
    BlobSegment,
    BlobState,
    Chunk,
    Event,
    Job,
    LineageEdge,
    Model,
    ModelVersion,
    Relation,
    VersionFile,
    utcnow,
)
from ..storage import HashingWriter
from ..weights import packing
from . import blobs, content, jobs
from .content import ChunkInfo, ChunkReader
from .context import RegistryContext
from .dispatcher import subscriber
from .events import emit
from .jobtypes import PackParams
from .names import FULL_MODEL_KINDS
from .refs import resolve
from .runner import JobRun
from .sql import insert_ignore

MAX_CHAIN = 3  # longest reference chain below a chunk: decoding reads at most MAX_CHAIN + 1 payloads
MAX_REFERENCE_HOPS = 16  # how far packing walks back to pack unpacked references first
PROGRESS_SECONDS = 1.0  # a pack job reports its progress at most this often


# ----------------------------------------------------------------------------- requests


def request_pack(ctx: RegistryContext, ref: str, actor: str | None) -> dict[str, Any]:
    """Queue packing a version (a no-op for files already packed)."""

    def build(s: Session) -> PackParams:
        v = resolve(s, ref)
        return PackParams(version_id=v.id, ref=v.ref)

    return jobs.submit(ctx, build, actor=actor)


@subscriber
def on_created(s: Session, ev: Event, settings: Settings) -> list[Job]:
    """``REGISTRY_PACK=auto``: pack every new version that holds stored files."""
    if settings.pack != "auto" or ev.type != "version.created" or ev.version_id is None:
        return []
    if not s.scalar(select(exists().where(VersionFile.version_id == ev.version_id))):
        return []
    job, created = jobs.create(s, PackParams(version_id=ev.version_id, ref=ev.payload.get("ref")), settings=settings,
                               created_by="pack-policy", event_id=ev.id, idempotency_key=f"pack:event:{ev.id}")
    return [job] if created else []


# ----------------------------------------------------------------------------- the job


def pack_job(run: JobRun[PackParams]) -> dict[str, Any]:
    """The ``pack`` job."""
    from .derive import job_run

    ctx = run.ctx
    with ctx.db.read() as s:
        v = s.get(ModelVersion, run.params.version_id)
        if v is None:
            result: dict[str, Any] = {"skipped": "version no longer exists"}
            with ctx.db.write() as w:
                run.complete(w, result)
            return result
        ref, model = v.ref, v.model.name
    params = {"operation": "pack", "version": ref, "job_id": run.job_id}
    with job_run(run, model, f"pack {ref}", params) as mr:
        report = pack_version(ctx, run.params.version_id, progress=run.progress, work_dir=run.work_dir)
        result = report.as_dict()
        mr.log_metrics({k: float(result[k]) for k in ("logical_bytes", "stored_bytes", "files_packed",
                                                      "chunks_new", "chunks_reused")})
        mr.log_dict(result, "pack.json")
        mr.finish()
        with ctx.db.write() as s:
            run.complete(s, result, mlflow_run_id=mr.run_id)
    return result


@dataclass
class PackReport:
    ref: str
    files_packed: int = 0
    files_already_packed: int = 0
    logical_bytes: int = 0  # bytes of the version's files
    stored_bytes: int = 0  # what the version adds to the store (after this job)
    chunks_new: int = 0
    chunks_reused: int = 0
    payload_bytes: int = 0  # coded bytes of the new chunks
    references: list[str] = field(default_factory=list)
    also_packed: list[str] = field(default_factory=list)  # unpacked references packed first
    codecs: dict[str, int] = field(default_factory=dict)  # new chunks per form: raw, planes, xor

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ratio"] = self.stored_bytes / self.logical_bytes if self.logical_bytes else 0.0
        return d


def pack_version(ctx: RegistryContext, version_id: int, *, progress: Callable[[float, str], None] | None = None,
                 work_dir: Path | None = None, _hops: int = 0, _seen: set[int] | None = None) -> PackReport:
    """Pack every raw file of a version (after its unpacked references). Idempotent."""
    seen = _seen if _seen is not None else set()
    seen.add(version_id)
    with ctx.db.read() as s:
        v = s.get(ModelVersion, version_id)
        if v is None:
            raise NotFound("version not found", code="version_not_found")
        report = PackReport(ref=v.ref)
        refs = references(s, v)
        report.references = [r[1] for r in refs]
    for ref_id, ref_name in refs:  # references first, so this version can be coded against them
        if ref_id not in seen and _hops < MAX_REFERENCE_HOPS and _has_raw(ctx, ref_id):
            pack_version(ctx, ref_id, work_dir=work_dir, _hops=_hops + 1, _seen=seen)
            report.also_packed.append(ref_name)
    with ctx.db.read() as s:
        keyed = reference_chunks(s, [r[0] for r in refs])
        files = list(s.execute(select(VersionFile.blob_sha256, VersionFile.size, Blob.form)
                               .join(Blob, Blob.sha256 == VersionFile.blob_sha256)
                               .where(VersionFile.version_id == version_id).order_by(VersionFile.path)))
    report.logical_bytes = sum(int(n) for _, n, _ in files)
    raw = sorted({sha: int(n) for sha, n, form in files if form == BlobForm.raw.value}.items())
    report.files_already_packed = len({sha for sha, _, _ in files}) - len(raw)
    ref_reader = ChunkReader(ctx)  # decodes reference frames; knows their rows already
    ref_reader.infos.update({i.sha256: i for i in keyed.values()})

    total = sum(n for _, n in raw) or 1
    done = 0
    scratch = work_dir or ctx.settings.resolved_work_dir
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pack-", dir=scratch))
    reported = [0.0]  # when progress was last written (each report is a database write)
    try:
        for sha, size in raw:
            def step(n: int, what: str = sha[:12], before: int = done) -> None:
                now = time.monotonic()
                if progress is not None and now - reported[0] >= PROGRESS_SECONDS:
                    reported[0] = now
                    progress((before + n) / total, f"packing {what}")
            if _pack_file(ctx, sha, size, keyed, ref_reader, work, report, step):
                report.files_packed += 1
            done += size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with ctx.db.write() as s:
        v = s.get(ModelVersion, version_id)
        if v is not None:
            report.stored_bytes = v.stored_bytes
            if report.files_packed:
                emit(s, "version.packed", model_name=v.model.name, version_id=v.id, ref=v.ref,
                     stored_bytes=v.stored_bytes, logical_bytes=report.logical_bytes)
    return report


def _has_raw(ctx: RegistryContext, version_id: int) -> bool:
    with ctx.db.read() as s:
        return bool(s.scalar(select(func.count()).select_from(VersionFile)
                             .join(Blob, Blob.sha256 == VersionFile.blob_sha256)
                             .where(VersionFile.version_id == version_id, Blob.form == BlobForm.raw.value)))


def references(s: Session, v: ModelVersion) -> list[tuple[int, str]]:
    """Versions whose tensors this one may be coded against, best first: its ``finetune_of`` /
    ``transfer_of`` / ``merge_of`` parents, its base when it holds whole weights, the previous
    version of its model."""
    out: list[int] = []
    for pid, rel in s.execute(select(LineageEdge.parent_id, LineageEdge.relation)
                              .where(LineageEdge.child_id == v.id).order_by(LineageEdge.id)):
        if rel in (Relation.finetune_of.value, Relation.transfer_of.value, Relation.merge_of.value):
            out.append(pid)
    if v.base_version_id is not None and v.kind in FULL_MODEL_KINDS:
        out.append(v.base_version_id)
    prev = s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == v.model_id,
                                                  ModelVersion.version < v.version)
                    .order_by(ModelVersion.version.desc()).limit(1))
    if prev is not None:
        out.append(prev)
    ids = list(dict.fromkeys(i for i in out if i != v.id))
    names = {i: f"{name}@{n}" for i, name, n in s.execute(
        select(ModelVersion.id, Model.name, ModelVersion.version).join(Model, Model.id == ModelVersion.model_id)
        .where(ModelVersion.id.in_(ids)))}
    return [(i, names[i]) for i in ids if i in names]


def reference_chunks(s: Session, version_ids: list[int]) -> dict[str, ChunkInfo]:
    """Segment key -> chunk, over the packed files of ``version_ids`` (earlier ids win a key)."""
    keyed: dict[str, ChunkInfo] = {}
    for vid in version_ids:
        rows = s.execute(select(BlobSegment.key, Chunk.sha256, Chunk.size, Chunk.object_sha256, Chunk.ref_sha256,
                                Chunk.depth)
                         .join(Chunk, Chunk.sha256 == BlobSegment.chunk_sha256)
                         .join(VersionFile, VersionFile.blob_sha256 == BlobSegment.blob_sha256)
                         .where(VersionFile.version_id == vid, BlobSegment.key.is_not(None)))
        for key, sha, n, obj, ref, depth in rows:
            keyed.setdefault(key, ChunkInfo(sha, int(n), obj, ref, int(depth)))
    return keyed


def _reader(ctx: RegistryContext, sha: str) -> tuple[Callable[[int, int], bytes], Callable[[], None]]:
    local = ctx.store.local_path(sha)
    if local is not None:
        fd = os.open(local, os.O_RDONLY)

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        return read_at, lambda: os.close(fd)
    return (lambda offset, length: ctx.store.read_bytes(sha, offset, offset + length)), (lambda: None)


def _pack_file(ctx: RegistryContext, sha: str, size: int, keyed: dict[str, ChunkInfo], ref_reader: ChunkReader,
               work: Path, report: PackReport, step: Callable[[int], None]) -> bool:
    """Pack one raw file; False when somebody else packed it meanwhile."""
    try:
        return _pack_raw_file(ctx, sha, size, keyed, ref_reader, work, report, step)
    except FileNotFoundError:
        if content.describe(ctx, sha) == "packed blob":  # another pack released the raw bytes meanwhile
            return False
        raise


# Raw bytes read (and hashed) before the registry is asked which of their chunks it holds: one
# query per window instead of one per segment, and the window's bytes stay at hand for coding.
WINDOW_BYTES = 16 << 20
WINDOW_SEGMENTS = 1000  # and the query's list of chunk names stays short (many small tensors)


def _windows(segs: list[packing.Segment]) -> list[list[packing.Segment]]:
    out: list[list[packing.Segment]] = [[]]
    held = 0
    for seg in segs:
        if out[-1] and (held + seg.length > WINDOW_BYTES or len(out[-1]) >= WINDOW_SEGMENTS):
            out.append([])
            held = 0
        out[-1].append(seg)
        held += seg.length
    return [w for w in out if w]


def _pack_raw_file(ctx: RegistryContext, sha: str, size: int, keyed: dict[str, ChunkInfo], ref_reader: ChunkReader,
                   work: Path, report: PackReport, step: Callable[[int], None]) -> bool:
    """The steps of the module docstring; step 1's checks run window by window while the bytes
    are at hand (each segment is read once)."""
    read_at, close = _reader(ctx, sha)
    whole = hashlib.sha256()
    plan: list[tuple[packing.Segment, str]] = []
    new: dict[str, ChunkInfo] = {}
    payload_files: dict[str, Path] = {}
    stored = ChunkReader(ctx, keep=1)  # decodes the chunks the registry holds already
    try:
        for window in _windows(packing.segments(read_at, size)):
            held: list[bytes] = []
            for seg in window:
                data = read_at(seg.offset, seg.length)
                if len(data) != seg.length:
                    raise content.ContentError(f"short read of {sha} at {seg.offset}")
                whole.update(data)
                held.append(data)
                plan.append((seg, hashlib.sha256(data).hexdigest()))
            cshas = [c for _, c in plan[-len(window):]]
            with ctx.db.read() as s:
                have = content.chunk_infos(s, sorted(set(cshas) - set(new)))
            stored.infos.update(have)
            for seg, data, csha in zip(window, held, cshas, strict=True):
                if csha in new:
                    continue  # the same bytes twice in one file
                if csha in have:
                    report.chunks_reused += 1
                    if stored.get(csha, check=content.CRC) != data:  # compared with the bytes themselves
                        raise content.ContentError(f"chunk {csha} decodes to other bytes; {sha} stays raw")
                    continue
                info, path = _encode(csha, data, seg, keyed.get(seg.key) if seg.key else None, ref_reader, work,
                                     report)
                new[csha] = info
                payload_files[info.object_sha256] = path
                step(seg.offset + seg.length)
                if ctx.settings.pack_segment_delay:
                    time.sleep(ctx.settings.pack_segment_delay)
    finally:
        close()
    if whole.hexdigest() != sha:
        raise content.ContentError(f"the raw bytes of {sha} hash to {whole.hexdigest()}; the file stays raw")

    # 1. payloads into the store, under claims
    sizes = {obj: p.stat().st_size for obj, p in payload_files.items()}
    blobs.retrying(lambda: _claim(ctx, sizes))
    for obj, p in payload_files.items():
        ctx.store.put(obj, p)
    # 2. read the payloads back from the store: each must be the bytes that were checked
    for obj, n in sizes.items():
        h = hashlib.sha256()
        got = 0
        for data in ctx.store.iter_range(obj):
            h.update(data)
            got += len(data)
        if got != n or h.hexdigest() != obj:
            raise content.ContentError(f"payload {obj} reads back as {h.hexdigest()} ({got} bytes); "
                                       f"{sha} stays raw")
    # 3. one transaction records it
    with ctx.db.write() as s:
        flipped = _commit(s, sha, size, plan, new, sizes, report)
    # 4. release the raw bytes
    if flipped:
        content.release_raw(ctx, sha)
    return flipped


def _encode(csha: str, data: bytes, seg: packing.Segment, ref: ChunkInfo | None, ref_reader: ChunkReader,
            work: Path, report: PackReport) -> tuple[ChunkInfo, Path]:
    """Code one new segment, check that the payload decodes to it, and write the payload to
    ``work``. A reference is decoded unchecked: the check here decodes against the very bytes
    every later reader will decode, and a reader's decode checks its result's CRC-32."""
    reference = None
    if ref is not None and ref.size == len(data) and ref.depth < MAX_CHAIN:
        reference = packing.Reference(ref_reader.get(ref.sha256, check=content.AS_REFERENCE))
    payload = packing.encode(data, seg.dtype, reference)
    coded_against = ref if reference is not None and packing.needs_reference(payload) else None
    try:
        back = packing.decode(payload, reference, expected_length=len(data))
    except packing.PackError as e:
        raise content.ContentError(f"the payload of chunk {csha} does not decode: {e}") from e
    if back != data:
        raise content.ContentError(f"the payload of chunk {csha} decodes to other bytes")
    form = "xor" if coded_against is not None else ("raw" if len(payload) >= len(data) else "coded")
    report.codecs[form] = report.codecs.get(form, 0) + 1
    path = work / csha
    w = HashingWriter(path)
    try:
        w.write(payload)
        obj = w.close()
    except BaseException:
        w.abort()
        raise
    info = ChunkInfo(csha, len(data), obj, coded_against.sha256 if coded_against else None,
                     coded_against.depth + 1 if coded_against else 0)
    return info, path


def _claim(ctx: RegistryContext, sizes: dict[str, int]) -> None:
    with ctx.db.write() as s:
        blobs.claim(s, sizes)


def _commit(s: Session, sha: str, size: int, plan: list[tuple[packing.Segment, str]], new: dict[str, ChunkInfo],
            sizes: dict[str, int], report: PackReport) -> bool:
    blobs.mark_ready(s, sizes)
    BLOBS = Blob.__table__
    flipped = s.execute(update(BLOBS).where(BLOBS.c.sha256 == sha, BLOBS.c.form == BlobForm.raw.value,
                                            BLOBS.c.state == BlobState.ready.value)
                        .values(form=BlobForm.packed.value, packed_at=utcnow())).rowcount
    if not flipped:
        return False
    have = set(s.scalars(select(Chunk.sha256).where(Chunk.sha256.in_(sorted(new)))))
    fresh = [i for c, i in new.items() if c not in have]
    now = utcnow()
    insert_ignore(s, Chunk.__table__, [
        {"sha256": i.sha256, "size": i.size, "object_sha256": i.object_sha256, "ref_sha256": i.ref_sha256,
         "depth": i.depth, "created_at": now} for i in fresh])
    rows, seen = [], set()
    for seg, csha in plan:
        if seg.offset not in seen:
            seen.add(seg.offset)
            rows.append({"blob_sha256": sha, "offset": seg.offset, "length": seg.length, "chunk_sha256": csha,
                         "key": seg.key})
    s.execute(BlobSegment.__table__.insert(), rows)
    added = sum(sizes[i.object_sha256] for i in fresh)
    report.chunks_new += len(fresh)
    report.payload_bytes += added
    # The file's bytes were counted at the first version holding it; count its new chunks there instead.
    owner = s.scalar(select(func.min(VersionFile.version_id)).where(VersionFile.blob_sha256 == sha))
    if owner is not None:
        less = ModelVersion.stored_bytes - size
        s.execute(update(ModelVersion).where(ModelVersion.id == owner)
                  .values(stored_bytes=case((less > 0, less), else_=0) + added))
    return True


# ----------------------------------------------------------------------------- reports


def storage_report(ctx: RegistryContext) -> dict[str, Any]:
    """Logical vs physical bytes per model and in total."""
    with ctx.db.read() as s:
        per_model = [
            {"model": name, "versions": int(n), "logical_bytes": int(logical or 0), "stored_bytes": int(stored or 0)}
            for name, n, logical, stored in s.execute(
                select(Model.name, func.count(ModelVersion.id), func.sum(ModelVersion.total_size),
                       func.sum(ModelVersion.stored_bytes))
                .join(ModelVersion, ModelVersion.model_id == Model.id).group_by(Model.name).order_by(Model.name))]
        held = s.execute(select(func.coalesce(func.sum(Blob.stored_size), 0), func.count())
                         .where(Blob.state == BlobState.ready.value)).one()
        packed_files = s.scalar(select(func.count()).select_from(Blob).where(Blob.form == BlobForm.packed.value))
        chunks = s.execute(select(func.count(), func.coalesce(func.sum(Chunk.size), 0))).one()
    logical = sum(m["logical_bytes"] for m in per_model)
    stored = sum(m["stored_bytes"] for m in per_model)
    for m in per_model:
        m["ratio"] = m["stored_bytes"] / m["logical_bytes"] if m["logical_bytes"] else 0.0
    return {
        "models": per_model,
        "total": {"logical_bytes": logical, "stored_bytes": stored, "ratio": stored / logical if logical else 0.0,
                  "objects": int(held[1]), "object_bytes": int(held[0]), "packed_files": int(packed_files or 0),
                  "chunks": int(chunks[0]), "chunk_bytes": int(chunks[1])},
        "pack": ctx.settings.pack,
    }

