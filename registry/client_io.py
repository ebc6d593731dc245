"""The client's byte pumps: a file's sha256 computed beside the thread that sends or receives it.

hashlib and file writes release the GIL, so hashing (and writing) a chunk in a helper thread
runs at the same time as the socket I/O and HTTP parsing of the next one: a push or a pull
costs about the slowest of these stages instead of their sum. Work is handed over in batches
of about :data:`BATCH` bytes, each stage keeps its order, and at most :data:`AHEAD` batches
wait (memory stays at a few tens of MiB whatever the file's size).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

BATCH = 8 << 20  # bytes handed to a helper thread at a time
AHEAD = 3  # batches that may wait for a helper before the caller waits for the oldest

# One thread per stage, shared by every transfer of the process: a single worker runs its tasks
# in submission order, which keeps each file's chunks in order.
_HASH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client-hash")
_WRITE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client-write")


def _each(fn: Callable[[Any], Any], chunks: list[Any]) -> None:
    for c in chunks:
        fn(c)


class Pipeline:
    """Runs ``stages`` (functions of one chunk, each on its own helper thread) over chunks fed
    in order. :meth:`finish` waits for every stage and raises the first stage's error."""

    def __init__(self, stages: list[tuple[ThreadPoolExecutor, Callable[[Any], Any]]]) -> None:
        self.stages = stages
        self._batch: list[Any] = []
        self._batched = 0
        self._pending: deque[Future[None]] = deque()

    def feed(self, chunk: Any) -> None:
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= BATCH:
            self._submit()

    def _submit(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batched = self._batch, [], 0
        for pool, fn in self.stages:
            self._pending.append(pool.submit(_each, fn, batch))
        while len(self._pending) > AHEAD * len(self.stages):
            self._pending.popleft().result()

    def finish(self) -> None:
        """Process what is left and wait for it; raises a stage's exception."""
        self._submit()
        self.drain()

    def abandon(self) -> None:
        """Drop the chunks not handed over yet and wait for the rest, ignoring their errors (the
        transfer failed already): afterwards no helper touches this pipeline's objects."""
        self._batch.clear()
        with contextlib.suppress(BaseException):
            self.drain()

    def drain(self) -> None:
        """Wait for the batches handed over so far (the first error is raised after all ended)."""
        error: BaseException | None = None
        while self._pending:
            try:
                self._pending.popleft().result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, once every task has ended
                error = error or e
        if error is not None:
            raise error


class HashedFile:
    """A download's ``.part`` file: each chunk is written and hashed by helper threads while the
    next one is received. ``hasher`` continues the hash of the bytes already in the file (a
    resumed download); :meth:`close` waits for both and closes the file."""

    def __init__(self, path: Path, mode: str, hasher: Any) -> None:
        self.hasher = hasher
        self.size = 0
        self._f: BinaryIO = open(path, mode)  # noqa: SIM115 - closed in close()
        self._pipe = Pipeline([(_HASH, hasher.update), (_WRITE, self._f.write)])

    def write(self, chunk: bytes) -> None:
        self._pipe.feed(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        """Finish writing and hashing; the file is closed even when a stage failed (then re-raised)."""
        try:
            self._pipe.finish()
        finally:
            self._f.close()

    def abandon(self) -> None:
        """Stop: wait for what was handed over (no thread writes after this), close the file."""
        try:
            self._pipe.abandon()
        finally:
            self._f.close()


def read_hashing(path: Path, start: int, length: int, chunk_size: int, hasher: Any = None,
                 progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Bytes ``[start, start + length)`` of ``path`` in chunks (an upload body), each also given
    to ``hasher`` on a helper thread; the hash is complete when the iterator is exhausted (not
    when it is abandoned). Raises OSError if the file is shorter."""
    pipe = Pipeline([(_HASH, hasher.update)]) if hasher is not None else None
    try:
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                chunk = f.read(min(chunk_size, left))
                if not chunk:
                    raise OSError(f"{path} shrank while uploading")
                left -= len(chunk)
                if pipe is not None:
                    pipe.feed(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk
        if pipe is not None:
            pipe.finish()
    finally:
        if pipe is not None:
            pipe.abandon()  # after finish(): nothing left; after an error or an abandoned body: wait


def sha256_file(path: Path, progress: Callable[[int], None] | None = None, chunk_size: int = 16 << 20) -> str:
    """The file's sha256, the next chunk read on a helper thread while this one is hashed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        nxt: Future[bytes] = _WRITE.submit(f.read, chunk_size)
        try:
            while chunk := nxt.result():
                nxt = _WRITE.submit(f.read, chunk_size)
                h.update(chunk)
                if progress is not None:
                    progress(len(chunk))
        finally:
            with contextlib.suppress(BaseException):
                nxt.result()  # no read in flight once the file is closed
    return h.hexdigest()
