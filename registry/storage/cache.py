"""Generated files on disk, by sha256, up to a byte budget (least recently used evicted first).

Derived versions and format views are generated on request; a complete, verified copy of each
generated file is kept here so the next request reads it instead of computing it again. Every
write goes through one path (:meth:`GeneratedCache.keep`): the bytes stream to a temporary file
beside the cache while the caller consumes them, and join the cache under their sha256 only when
complete (and equal to the expected sha256 when one is known). An interrupted or wrong copy never
becomes visible.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("registry.cache")


class GeneratedCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def get(self, sha: str) -> Path | None:
        """The cached copy of ``sha`` (marked recently used), or None."""
        p = self.path(sha)
        if p.is_file():
            os.utime(p)
            return p
        return None

    def keep(self, size: int, chunks: Iterable[bytes], h: Any = None, expect: str | None = None) -> Iterator[bytes]:
        """Yield ``chunks`` (``size`` bytes in all), updating the sha256 ``h`` and keeping a copy that
        joins the cache under its hash once complete, if it equals ``expect`` when given (a
        mismatch is logged: generation was not deterministic). Nothing is kept when caching is off
        or the file is larger than the whole budget."""
        h = h if h is not None else hashlib.sha256()
        if self.max_bytes <= 0 or size > self.max_bytes:
            for c in chunks:
                h.update(c)
                yield c
            return
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self.root)
        try:
            n = 0
            with os.fdopen(fd, "wb") as f:
                for c in chunks:
                    f.write(c)
                    h.update(c)
                    n += len(c)
                    yield c
            sha = h.hexdigest()
            if n == size and expect in (None, sha):
                dest = self.path(sha)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
                self.evict()
            elif n == size:
                log.error("generated file hashed to %s, expected %s: not cached", sha, expect)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def tee(self, sha: str, size: int, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """:meth:`keep` for a file whose sha256 is known."""
        return self.keep(size, chunks, expect=sha)

    def put(self, sha: str, size: int, chunks: Iterable[bytes]) -> None:
        """Keep bytes that are already at hand (consumes ``chunks``)."""
        for _ in self.keep(size, chunks, expect=sha):
            pass

    def evict(self) -> None:
        with self._lock:
            files = []
            for p in self.root.glob("*/*"):
                try:
                    st = p.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                files.append((st.st_mtime, st.st_size, p))
            total = sum(f[1] for f in files)
            for _, size, p in sorted(files):
                if total <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                total -= size
