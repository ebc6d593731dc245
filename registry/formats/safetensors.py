"""Defensive reading of safetensors headers, without touching tensor data.

Layout (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 ``N``, then ``N``
bytes of UTF-8 JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str:
str}}``, then the data buffer. Offsets are relative to the buffer, which must be covered exactly:
no overlap, no hole, nothing past the end.

Every violation raises :class:`registry.errors.InvalidInput` with code ``invalid_safetensors`` (or
``header_too_large``) and ``details = {"file": ..., "reason": ...}``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from . import jsonfile

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64,
}
MAX_DIMS = 16
MAX_TENSORS = 1_000_000
# Largest element count of a tensor, counting a zero dimension as 1: the safetensors library
# multiplies dims in usize (u64) and refuses a shape like [0, 10**30] that overflows; so do we.
MAX_ELEMENTS = 1 << 62

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data buffer
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _bad(file: str, reason: str, code: str = "invalid_safetensors") -> InvalidInput:
    return InvalidInput(f"{file}: not a valid safetensors file: {reason}", code=code,
                        details={"file": file, "reason": reason})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    bits = DTYPE_BITS[dtype] * n
    return (bits + 7) // 8


def _shape_problem(shape: Any) -> str | None:
    """Why ``shape`` is not a valid tensor shape (None when it is): a list of at most
    :data:`MAX_DIMS` non-negative ints whose product, zeros counted as 1, stays within
    :data:`MAX_ELEMENTS`."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        return f"shape must be a list of at most {MAX_DIMS} non-negative ints"
    volume = 1
    for d in shape:
        volume *= max(d, 1)
        if volume > MAX_ELEMENTS:
            return f"shape {shape} has more than {MAX_ELEMENTS} elements"
    return None


def _check_length(n: int, *, file: str, max_header_bytes: int) -> None:
    if n > max_header_bytes:
        raise _bad(file, f"header of {n} bytes exceeds the limit of {max_header_bytes} bytes",
                   code="header_too_large")
    if n < 2:
        raise _bad(file, "header length below 2 bytes")


def _parse_json(raw: bytes, *, file: str) -> tuple[dict[str, TensorInfo], dict[str, str] | None, int]:
    """Validate the header JSON; returns tensors, metadata and the data buffer length they need."""
    if not raw.startswith(b"{"):
        raise _bad(file, "header does not start with '{'")
    try:
        obj = jsonfile.parse(raw, object_pairs_hook=_no_duplicates)
    except jsonfile.JsonError as e:
        raise _bad(file, f"header is {e}") from None
    if not isinstance(obj, dict):
        raise _bad(file, "header is not a JSON object")

    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _bad(file, "__metadata__ must map strings to strings")
    if len(obj) > MAX_TENSORS:
        raise _bad(file, f"more than {MAX_TENSORS} tensors")

    tensors: dict[str, TensorInfo] = {}
    for name, spec in obj.items():
        if not name:
            raise _bad(file, "empty tensor name")
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _bad(file, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise _bad(file, f"tensor {name!r}: unknown dtype {dtype!r}")
        problem = _shape_problem(shape)
        if problem is not None:
            raise _bad(file, f"tensor {name!r}: {problem}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise _bad(file, f"tensor {name!r}: data_offsets must be two non-negative ints")
        begin, end = offsets
        if end < begin:
            raise _bad(file, f"tensor {name!r}: data_offsets end {end} < begin {begin}")
        shp = tuple(shape)
        if end - begin != nbytes(dtype, shp):
            raise _bad(file, f"tensor {name!r}: {end - begin} bytes for {dtype}{list(shp)} "
                             f"which needs {nbytes(dtype, shp)}")
        tensors[name] = TensorInfo(name, dtype, shp, begin, end)

    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise _bad(file, f"tensor {t.name!r}: data overlaps the previous tensor (offset {t.begin} < {pos})")
        if t.begin > pos:
            raise _bad(file, f"tensor {t.name!r}: hole in the data buffer before offset {t.begin}")
        pos = t.end
    return tensors, metadata, pos


def _check_buffer(needed: int, buffer_len: int, *, file: str) -> None:
    if needed > buffer_len:
        raise _bad(file, f"truncated: tensors need {needed} data bytes but the file has {buffer_len}")
    if needed < buffer_len:
        raise _bad(file, f"{buffer_len - needed} trailing bytes after the last tensor")


def parse_header(read_at: ReadAt, file_size: int, *, file: str, max_header_bytes: int) -> SafetensorsHeader:
    """Parse and fully validate a safetensors header. ``read_at(offset, length)`` returns bytes."""
    if file_size < 8:
        raise _bad(file, f"truncated: {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    _check_length(n, file=file, max_header_bytes=max_header_bytes)
    if 8 + n > file_size:
        raise _bad(file, f"truncated: header claims {n} bytes but the file has {file_size - 8} after the length")
    raw = read_at(8, n)
    if len(raw) != n:
        raise _bad(file, "truncated while reading the header")
    tensors, metadata, needed = _parse_json(raw, file=file)
    _check_buffer(needed, file_size - 8 - n, file=file)
    return SafetensorsHeader(n, tensors, metadata, file_size)


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
        self._tensors: dict[str, TensorInfo] | None = None
        self._metadata: dict[str, str] | None = None
        self._needed = 0
        self._order: list[TensorInfo] = []
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
            _check_length(self._n, file=self.file, max_header_bytes=self.max_header_bytes)
            return self._feed_header(data) if data.nbytes else data
        if self._n is not None and len(self._head) == 8 + self._n:
            self._tensors, self._metadata, self._needed = _parse_json(bytes(self._head[8:]), file=self.file)
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
        _check_buffer(self._needed, self.pos - 8 - self._n, file=self.file)
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
