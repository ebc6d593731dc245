"""Safetensors files as the push checks them: the header through the one parser the weight
library also uses (:mod:`registry.weights.safetensors_header`), and the data as it streams in
(:class:`StreamCheck`: header as soon as it has arrived, NaN/Inf of floating tensors).

Every violation raises :class:`registry.errors.InvalidInput` with code ``invalid_safetensors`` (or
``header_too_large``) and ``details = {"file": ..., "reason": ...}``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import InvalidInput
from ..weights import safetensors_header as sh
from ..weights.safetensors_header import HeaderEntry, ReadAt, SafetensorsHeader

__all__ = ["HeaderEntry", "SafetensorsHeader", "StreamCheck", "check_stream", "iter_file", "parse_header",
           "read_header_from_file"]

T = TypeVar("T")


def _bad(file: str, reason: str, code: str = "invalid_safetensors") -> InvalidInput:
    return InvalidInput(f"{file}: not a valid safetensors file: {reason}", code=code,
                        details={"file": file, "reason": reason})


def _checked(file: str, fn: Callable[..., T], *args: object) -> T:
    """Run one step of the shared parser; its :class:`HeaderError` becomes the push's 4xx."""
    try:
        return fn(*args)
    except sh.HeaderError as e:
        raise _bad(file, e.reason, e.code) from None


def parse_header(read_at: ReadAt, file_size: int, *, file: str, max_header_bytes: int) -> SafetensorsHeader:
    """Parse and fully validate a safetensors header. ``read_at(offset, length)`` returns bytes."""
    try:
        return sh.parse_header(read_at, file_size, max_header_bytes=max_header_bytes)
    except sh.HeaderError as e:
        raise _bad(file, e.reason, e.code) from None


# Exponent bits: a float is NaN or Inf exactly when all of them are set (float8 e4m3fn has no
# Inf; its NaN is S.1111.111, hence the 7-bit mask).
_NONFINITE_MASK: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F),
}


class StreamCheck:
    """Validates a safetensors file from its bytes in order, as they stream in: the header as
    soon as it has arrived (so garbage is refused early), then every floating tensor's values
    for NaN/Inf with a bit-mask test, in one pass and bounded memory. ``finish()`` checks the
    total length and returns the header; ``non_finite`` names the tensors that failed."""

    def __init__(self, *, file: str, max_header_bytes: int, check_finite: bool = True) -> None:
        self.file = file
        self.max_header_bytes = max_header_bytes
        self.check_finite = check_finite
        self.pos = 0  # bytes seen
        self.non_finite: list[str] = []
        self._head = bytearray()
        self._n: int | None = None
        self._tensors: dict[str, HeaderEntry] | None = None
        self._metadata: dict[str, str] | None = None
        self._needed = 0
        self._order: list[HeaderEntry] = []
        self._idx = 0
        self._carry = b""

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        data = memoryview(chunk)
        if self._tensors is None:
            data = self._feed_header(data)
            if self._tensors is None:
                return
        if data.nbytes:
            self._scan(data)

    def _feed_header(self, data: memoryview) -> memoryview:
        want = 8 if self._n is None else 8 + self._n
        take = min(want - len(self._head), data.nbytes)
        self._head += data[:take]
        self.pos += take
        data = data[take:]
        if self._n is None and len(self._head) == 8:
            (self._n,) = struct.unpack("<Q", bytes(self._head))
            _checked(self.file, sh.check_length, self._n, self.max_header_bytes)
            return self._feed_header(data) if data.nbytes else data
        if self._n is not None and len(self._head) == 8 + self._n:
            self._tensors, self._metadata, self._needed = _checked(self.file, sh.parse_json, bytes(self._head[8:]))
            self._order = sorted((t for t in self._tensors.values() if t.end > t.begin), key=lambda t: t.begin)
            self._head = bytearray(self._head[:8])
        return data

    def _scan(self, data: memoryview) -> None:
        import numpy as np

        assert self._n is not None
        start = 8 + self._n
        while data.nbytes:
            rel = self.pos - start
            while self._idx < len(self._order) and self._order[self._idx].end <= rel:
                self._idx += 1
                self._carry = b""
            if self._idx >= len(self._order):  # bytes past the last tensor: finish() reports them
                self.pos += data.nbytes
                return
            t = self._order[self._idx]
            take = min(data.nbytes, t.end - rel)
            mask = _NONFINITE_MASK.get(t.dtype)
            if self.check_finite and mask is not None and (not self.non_finite or self.non_finite[-1] != t.name):
                seg = self._carry + bytes(data[:take]) if self._carry else data[:take]
                width = np.dtype(mask[0]).itemsize
                usable = len(seg) - len(seg) % width
                self._carry = bytes(seg[usable:])
                if usable:
                    arr = np.frombuffer(seg, dtype=mask[0], count=usable // width)
                    if int(np.bitwise_and(arr, mask[1]).max()) == mask[1]:
                        self.non_finite.append(t.name)
            self.pos += take
            data = data[take:]

    def finish(self) -> SafetensorsHeader:
        if self.pos < 8:
            raise _bad(self.file, f"truncated: {self.pos} bytes, shorter than the 8-byte header length")
        if self._tensors is None:
            assert self._n is not None
            raise _bad(self.file, f"truncated: header claims {self._n} bytes but the file has {self.pos - 8} "
                                  "after the length")
        assert self._n is not None
        _checked(self.file, sh.check_buffer, self._needed, self.pos - 8 - self._n)
        return SafetensorsHeader(self._n, self._tensors, self._metadata, self.pos)


def check_stream(chunks: Iterable[bytes], *, file: str, max_header_bytes: int,
                 check_finite: bool = True) -> tuple[SafetensorsHeader, list[str]]:
    """Run :class:`StreamCheck` over an iterable of byte chunks (a file, a stored blob)."""
    sc = StreamCheck(file=file, max_header_bytes=max_header_bytes, check_finite=check_finite)
    for chunk in chunks:
        sc.feed(chunk)
    return sc.finish(), sc.non_finite


def iter_file(path: Path, chunk: int = 8 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


def read_header_from_file(path: Path, *, file: str, max_header_bytes: int) -> SafetensorsHeader:
    size = path.stat().st_size
    with open(path, "rb") as f:

        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return parse_header(read_at, size, file=file, max_header_bytes=max_header_bytes)
