"""Reading stored bytes without ever serving a silent short or wrong body.

A stored file is checked before its first byte is sent (the object exists with the recorded
size) and while it streams (no short read; a whole-file read is hashed and its last chunk held
back until the digest matches). A failure marks the version corrupt (``corrupt_at``, a
``version.corrupt`` event, once) and raises :class:`~registry.errors.DataCorrupt`: before the
response starts that is a 500 with the JSON error body; mid-stream the connection is cut, so the
client sees an incomplete body instead of a complete-looking wrong one. A verify that passes
clears the mark (after an operator restored the bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from concurrent.futures import Future

from sqlalchemy import update

from ..errors import DataCorrupt
from ..models import ModelVersion, utcnow
from . import content
from .context import RegistryContext
from .derived import ServedFile
from .events import emit


def mark_corrupt(ctx: RegistryContext, version_id: int, bad: list[str], reason: str) -> None:
    """Record that a version's stored bytes are missing or wrong (an event the first time)."""
    with ctx.db.write() as s:
        flipped = s.execute(update(ModelVersion).where(ModelVersion.id == version_id,
                                                       ModelVersion.corrupt_at.is_(None))
                            .values(corrupt_at=utcnow())).rowcount
        if flipped:
            v = s.get(ModelVersion, version_id)
            assert v is not None
            emit(s, "version.corrupt", model_name=v.model.name, version_id=v.id, ref=v.ref, bad=bad, reason=reason)


def mark_intact(ctx: RegistryContext, version_id: int) -> None:
    with ctx.db.write() as s:
        s.execute(update(ModelVersion).where(ModelVersion.id == version_id, ModelVersion.corrupt_at.is_not(None))
                  .values(corrupt_at=None))


def _fail(ctx: RegistryContext, version_id: int, f: ServedFile, reason: str) -> DataCorrupt:
    mark_corrupt(ctx, version_id, [f.path], f"{f.path}: {reason}")
    return DataCorrupt(f"{f.path}: the registry's stored bytes are {reason}; the version is marked corrupt",
                       details={"path": f.path, "sha256": f.sha256})


def read_stored(ctx: RegistryContext, version_id: int, f: ServedFile, start: int,
                end: int) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of a stored file, checked as described above. The presence check
    runs now, so a missing object fails before any response starts."""
    on_disk = content.size(ctx, f.sha256)
    if on_disk != f.size:
        raise _fail(ctx, version_id, f, "missing" if on_disk is None else f"{on_disk} bytes, not {f.size}")
    return _stream(ctx, version_id, f, start, end)


def _stream(ctx: RegistryContext, version_id: int, f: ServedFile, start: int,
            end: int) -> Iterator[bytes | memoryview]:
    # A range of a packed file is checked chunk by chunk as it decodes (each against its sha256);
    # a whole file is hashed here, whatever its form (its chunks then only by their CRC-32).
    # The file is read ahead, and each chunk hashed on a helper thread while the one before it is
    # sent: reading, hashing and sending overlap. The last chunk waits for the whole digest.
    whole = ctx.settings.verify_reads and start == 0 and end == f.size
    h = hashlib.sha256() if whole else None
    hashing: Future[None] | None = None
    sent = 0
    held: bytes | memoryview | None = None
    try:
        try:
            with contextlib.closing(content.read_ahead(
                    content.iter_range(ctx, f.sha256, start, end, hashed_whole=whole))) as pieces:
                for chunk in pieces:
                    if h is not None:
                        if hashing is not None:
                            hashing.result()
                        hashing = content.hash_beside(h, chunk)
                    if held is not None:
                        yield held
                    sent += len(chunk)
                    held = chunk
        except (FileNotFoundError, OSError) as e:
            raise _fail(ctx, version_id, f, f"unreadable ({e})") from e
        if hashing is not None:
            hashing.result()
            hashing = None
    finally:
        if hashing is not None:  # stopped early: let the hash of the last chunk end before it is dropped
            hashing.cancel()
            with contextlib.suppress(BaseException):
                hashing.result()
    if sent != end - start:
        raise _fail(ctx, version_id, f, f"short: {start + sent} of {end} bytes")
    if h is not None and h.hexdigest() != f.sha256:
        raise _fail(ctx, version_id, f, f"wrong: they hash to {h.hexdigest()}")
    if held is not None:
        yield held
