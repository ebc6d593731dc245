"""A stored file's bytes, whatever form they are kept in: the one read path for blobs.

A blob row's ``form`` says how its bytes live in the store:

- ``raw``: the object under the file's sha256 is the file (as uploaded);
- ``packed``: the file is the concatenation of its segments (:class:`~registry.models.BlobSegment`),
  each a content-addressed chunk whose coded payload is an object of its own, possibly coded
  against a reference chunk (see :mod:`registry.weights.packing` for the codec and
  :mod:`registry.services.packing` for how files get packed).

Every reader — downloads, job inputs, verify, a commit re-reading a linked blob — goes through
here. A decoded chunk is checked against its CRC-32 and its sha256 before a byte of it leaves
this module, so a damaged payload is never served as data: it raises :class:`ContentError` (an
``OSError``, which the download path turns into a cut connection and a ``corrupt`` mark). A
caller that hashes the whole file itself before handing its last piece on may skip the
per-chunk sha256 (``hashed_whole``): the download path does, as it does for raw files.

A reader that looked a file up while it was raw and then finds the raw object released (the
pack job released it after packing) starts again from the packed form; nothing else changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..models import Blob, BlobForm, BlobSegment, Chunk
from ..storage.base import CHUNK
from ..weights import packing
from .context import RegistryContext


class ContentError(OSError):
    """Stored bytes that cannot be read back as the file they claim to be."""


@dataclass(frozen=True)
class ChunkInfo:
    sha256: str
    size: int
    object_sha256: str
    ref_sha256: str | None
    depth: int


@dataclass(frozen=True)
class Piece:
    """Bytes ``[offset, offset + length)`` of a packed file are the chunk ``chunk_sha256``."""

    offset: int
    length: int
    chunk_sha256: str


def _row(ctx: RegistryContext, sha256: str) -> tuple[int, str] | None:
    with ctx.db.read() as s:
        row = s.execute(select(Blob.size, Blob.form).where(Blob.sha256 == sha256)).one_or_none()
    return None if row is None else (int(row[0]), str(row[1]))


def rows(s: Session, shas: list[str]) -> dict[str, tuple[int, str]]:
    """sha256 -> (size, form) of the blob rows of ``shas``, in the caller's transaction: what
    :func:`size`, :func:`exists` and :func:`iter_range` take as ``known`` instead of looking the
    row up again each (one transaction per call)."""
    if not shas:
        return {}
    return {sha: (int(n), str(form)) for sha, n, form in s.execute(
        select(Blob.sha256, Blob.size, Blob.form).where(Blob.sha256.in_(sorted(set(shas)))))}


def size(ctx: RegistryContext, sha256: str, known: tuple[int, str] | None = None) -> int | None:
    """The file's size when the registry can read it back, else None (no row, or a raw file
    whose object is missing or of another size). ``known``: its row's (size, form), when the
    caller read it already (:func:`rows`)."""
    row = known or _row(ctx, sha256)
    if row is None:
        return ctx.store.size(sha256)  # an object from before blob rows existed
    n, form = row
    if form == BlobForm.packed.value:
        return n
    on_disk = ctx.store.size(sha256)
    if on_disk is None and is_packed(ctx, sha256):
        return n  # packed (and its raw object released) since the first look
    return on_disk


def describe(ctx: RegistryContext, sha256: str) -> str:
    """How a file is kept, in words: ``blob`` (raw) or ``packed blob``."""
    row = _row(ctx, sha256)
    return "packed blob" if row is not None and row[1] == BlobForm.packed.value else "blob"


def exists(ctx: RegistryContext, sha256: str, known: tuple[int, str] | None = None) -> bool:
    return size(ctx, sha256, known) is not None


def local_path(ctx: RegistryContext, sha256: str) -> Path | None:
    """A local file holding the raw bytes (fast paths: links, mmap), when there is one."""
    return ctx.store.local_path(sha256)


def read_bytes(ctx: RegistryContext, sha256: str, start: int = 0, end: int | None = None, *,
               known: tuple[int, str] | None = None) -> bytes:
    return b"".join(iter_range(ctx, sha256, start, end, known=known))


def iter_range(ctx: RegistryContext, sha256: str, start: int = 0, end: int | None = None, *,
               hashed_whole: bool = False, known: tuple[int, str] | None = None) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of the file (``end`` None: to its end), as bytes-like pieces.
    Raises FileNotFoundError (missing) or :class:`ContentError` (damaged) while iterating.

    Each decoded chunk of a packed file is checked against its CRC-32 and, unless
    ``hashed_whole``, its sha256. ``hashed_whole`` is for a caller that reads the whole file and
    checks its sha256 before it hands the last piece on (:mod:`registry.services.integrity`):
    that hash catches whatever a CRC-32 could miss, and hashing the file once instead of each
    chunk once costs the same but runs beside the decoding threads instead of in them.
    ``known``: the row's (size, form) when the caller read it already (:func:`rows`)."""
    row = known or _row(ctx, sha256)
    if row is not None and row[1] == BlobForm.packed.value:
        return _packed(ctx, sha256, start, row[0] if end is None else end, hashed_whole)
    return _raw(ctx, sha256, start, end, hashed_whole)


def _raw(ctx: RegistryContext, sha256: str, start: int, end: int | None,
         hashed_whole: bool) -> Iterator[bytes | memoryview]:
    sent = False
    try:
        for data in ctx.store.iter_range(sha256, start, end):
            sent = True
            yield data
    except FileNotFoundError:
        row = _row(ctx, sha256)
        if sent or row is None or row[1] != BlobForm.packed.value:
            raise
        yield from _packed(ctx, sha256, start, row[0] if end is None else end, hashed_whole)


# Reads ahead of a stream and the sha256 of a whole-file download run here, beside the thread that sends.
_STREAM_HELPERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stream")


def read_ahead(pieces: Iterator[bytes | memoryview]) -> Generator[bytes | memoryview, None, None]:
    """``pieces``, the next one read on a helper thread while the caller handles the current one
    (a download reads the file while it sends and hashes). Closing this iterator waits for the
    read in flight, then closes ``pieces``."""
    it = iter(pieces)
    done = object()
    nxt: Future[object] = _STREAM_HELPERS.submit(next, it, done)
    try:
        while (piece := nxt.result()) is not done:
            nxt = _STREAM_HELPERS.submit(next, it, done)
            yield piece  # type: ignore[misc]
    finally:
        nxt.cancel()
        with contextlib.suppress(BaseException):  # the caller stopped or failed already
            nxt.result()
        close = getattr(it, "close", None)
        if close is not None:
            close()


def hash_beside(h: Any, piece: bytes | memoryview) -> Future[None]:
    """``h.update(piece)`` on a helper thread (hashlib releases the GIL): wait for the result
    before the next update of ``h``."""
    return _STREAM_HELPERS.submit(h.update, piece)


def pieces(s: Session, sha256: str, start: int = 0, end: int | None = None) -> list[Piece]:
    """The segments of a packed file that overlap ``[start, end)``, in order."""
    q = select(BlobSegment.offset, BlobSegment.length, BlobSegment.chunk_sha256).where(
        BlobSegment.blob_sha256 == sha256, BlobSegment.offset + BlobSegment.length > start)
    if end is not None:
        q = q.where(BlobSegment.offset < end)
    return [Piece(int(o), int(n), c) for o, n, c in s.execute(q.order_by(BlobSegment.offset))]


def is_packed(ctx: RegistryContext, sha256: str) -> bool:
    row = _row(ctx, sha256)
    return row is not None and row[1] == BlobForm.packed.value


def _packed(ctx: RegistryContext, sha256: str, start: int, end: int, hashed_whole: bool) -> Iterator[memoryview]:
    with ctx.db.read() as s:
        found = pieces(s, sha256, start, end)
        reader = ChunkReader(ctx, keep=1)  # a stream needs each chunk once
        reader.infos.update(chunk_infos(s, sorted({p.chunk_sha256 for p in found})))
    yield from stream_pieces(reader, found, start, end, check=not hashed_whole)


def _keep_freed_buffers() -> None:
    """Ask glibc's allocator to keep freed frame-sized buffers for the next frame instead of
    handing them back to the kernel: decoding a 4 MiB frame allocates about 30 MB of temporaries,
    and mapping them afresh each time cost a page fault per 4 KiB (measured: about 1 ms of system
    time per MiB decoded, a quarter of the decode; bench/RESULTS.md). Buffers up to 32 MiB come from
    the heap, and up to 64 MiB of free heap is kept per arena. Elsewhere (not glibc): nothing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


_keep_freed_buffers()


def load_codec() -> threading.Thread:
    """Load the packed-storage codec's compiled kernels in a background thread (numba: about 60 MB
    and a fraction of a second from its disk cache, once per process; compiling them the first
    time on a machine takes longer). A server calls this when it starts, so that its first packed
    download neither waits for the kernels nor grows by them."""
    t = threading.Thread(target=packing.warm, name="load-codec", daemon=True)
    t.start()
    return t

# Frames decoded ahead of the one being sent (zstd, numpy and hashlib release the GIL, so decoding
# overlaps sending, and two frames decode at once); memory stays at a few frames: each decoding
# frame holds its payload, its reference and the order's indices (about 30 MB for a 4 MiB frame).
READ_AHEAD = 1
# One decoding thread per core, shared by every download (each thread keeps its own allocator
# arena: more threads than cores would only hold more freed memory).
_DECODERS = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="unpack")


def stream_pieces(reader: ChunkReader, found: list[Piece], start: int, end: int, *,
                  check: bool = True) -> Iterator[memoryview]:
    """Bytes ``[start, end)`` of the file made of ``found`` (which must cover that range), as
    views of the decoded chunks (bytes-like: hash them, write them, join them). ``check``: each
    chunk against its sha256 too (its CRC-32 always)."""
    ahead: deque[Future[bytes]] = deque()
    queued = 0
    pos = start
    try:
        for p in found:
            while queued < len(found) and len(ahead) <= READ_AHEAD:
                ahead.append(_DECODERS.submit(reader.get, found[queued].chunk_sha256, check=SHA256 if check else CRC))
                queued += 1
            if p.offset > pos:
                raise ContentError(f"packed file has a hole at byte {pos}")
            data = memoryview(ahead.popleft().result())
            if len(data) != p.length:
                raise ContentError(f"chunk {p.chunk_sha256} holds {len(data)} bytes, its segment {p.length}")
            lo, hi = max(start, p.offset) - p.offset, min(end, p.offset + p.length) - p.offset
            for i in range(lo, hi, CHUNK):
                yield data[i:min(hi, i + CHUNK)]  # a view of the decoded chunk: no copy
            pos = p.offset + hi
            if pos >= end:
                return
        if pos < end:
            raise ContentError(f"packed file ends at byte {pos}, not {end}")
    finally:
        for f in ahead:
            f.cancel()


# How far a decoded chunk was checked (ChunkReader.get's ``check``): 0, used only as the reference of
# another payload (that payload's own CRC-32 then catches a wrong reference); 1, its CRC-32; 2, its
# CRC-32 and its sha256.
AS_REFERENCE, CRC, SHA256 = 0, 1, 2


class ChunkReader:
    """Decodes chunks (and the reference chunks they are coded against), keeping the last few
    decoded ones (a reference may be needed again)."""

    def __init__(self, ctx: RegistryContext, keep: int = 4) -> None:
        self.ctx = ctx
        self.keep = keep
        self.decoded: OrderedDict[str, tuple[bytes, int]] = OrderedDict()  # sha -> (bytes, how checked)
        self.infos: dict[str, ChunkInfo] = {}
        self.lock = threading.Lock()

    def info(self, sha256: str) -> ChunkInfo:
        found = self.infos.get(sha256)
        if found is None:
            with self.ctx.db.read() as s:
                more = chunk_infos(s, [sha256])
            with self.lock:
                self.infos.update(more)
            found = more.get(sha256)
        if found is None:
            raise ContentError(f"chunk {sha256} is not in the registry")
        return found

    def get(self, sha256: str, *, check: int = SHA256) -> bytes:
        """The chunk's bytes, checked as ``check`` says (:data:`SHA256`, :data:`CRC` or
        :data:`AS_REFERENCE`). Safe to call from several threads."""
        with self.lock:
            hit = self.decoded.get(sha256)
            if hit is not None:
                self.decoded.move_to_end(sha256)
        if hit is not None and hit[1] >= check:
            return hit[0]
        info = self.info(sha256)
        reference = self.get(info.ref_sha256, check=AS_REFERENCE) if info.ref_sha256 is not None else None
        try:
            payload = self.ctx.store.read_bytes(info.object_sha256)
        except FileNotFoundError as e:
            raise ContentError(f"the payload of chunk {sha256} is missing") from e
        try:
            data = packing.decode(payload, reference, expected_length=info.size, check_crc=check >= CRC)
        except packing.PackError as e:
            raise ContentError(f"the payload of chunk {sha256} is damaged: {e}") from e
        if len(data) != info.size or (check >= SHA256 and hashlib.sha256(data).hexdigest() != sha256):
            raise ContentError(f"chunk {sha256} decodes to other bytes")
        with self.lock:
            self.decoded[sha256] = (data, check)
            while len(self.decoded) > self.keep:
                self.decoded.popitem(last=False)
        return data


def chunk_infos(s: Session, shas: list[str]) -> dict[str, ChunkInfo]:
    """The rows of ``shas`` and of every chunk below them on their reference chains."""
    found: dict[str, ChunkInfo] = {}
    todo = set(shas)
    while todo:
        rows = s.execute(select(Chunk.sha256, Chunk.size, Chunk.object_sha256, Chunk.ref_sha256, Chunk.depth)
                         .where(Chunk.sha256.in_(sorted(todo)))).all()
        for sha, n, obj, ref, depth in rows:
            found[sha] = ChunkInfo(sha, int(n), obj, ref, int(depth))
        todo = {r[3] for r in rows if r[3] is not None and r[3] not in found}
    return found


def release_raw(ctx: RegistryContext, sha: str) -> None:
    """Delete the raw object of a packed file (its packed form was read back before the flip)."""
    ctx.store.delete(sha)
    with ctx.db.write() as s:
        s.execute(update(Blob).where(Blob.sha256 == sha, Blob.form == BlobForm.packed.value).values(stored_size=0))


def unreleased(s: Session, before: datetime) -> list[str]:
    """Packed files whose raw object is still held (a worker died between flip and release)."""
    return list(s.scalars(select(Blob.sha256).where(Blob.form == BlobForm.packed.value, Blob.stored_size > 0,
                                                    Blob.packed_at < before)))
