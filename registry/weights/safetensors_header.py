"""The one safetensors header parser: the push validates uploads with it and the weight library
reads checkpoints with it, so both agree on what a valid file is. No torch (the API imports it).

Layout (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 ``N``, then ``N``
bytes of UTF-8 JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str:
str}}``, then the data buffer. Offsets are relative to the buffer, which must be covered exactly:
no overlap, no hole, nothing past the end. Every violation raises :class:`HeaderError` with a
reason (and ``code``: ``invalid_safetensors`` or ``header_too_large``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import jsonfile
from .errors import CheckpointFormatError

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
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


class HeaderError(CheckpointFormatError):
    """Not a valid safetensors file, and why."""

    def __init__(self, reason: str, code: str = "invalid_safetensors") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as its header describes it: dtype code, shape, byte range in the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data buffer
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str] | None
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def in_data_order(self) -> list[HeaderEntry]:
        return sorted(self.tensors.values(), key=lambda t: (t.begin, t.end))


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return (DTYPE_BITS[dtype] * n + 7) // 8


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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


def check_length(n: int, max_header_bytes: int) -> None:
    """The 8-byte length prefix ``n``."""
    if n > max_header_bytes:
        raise HeaderError(f"header length {n} exceeds the limit of {max_header_bytes} bytes", "header_too_large")
    if n < 2:
        raise HeaderError("header length below 2 bytes")


def parse_json(raw: bytes) -> tuple[dict[str, HeaderEntry], dict[str, str] | None, int]:
    """Validate the header JSON; returns tensors, metadata and the data buffer length they need."""
    if not raw.startswith(b"{"):
        raise HeaderError("header does not start with '{'")
    try:
        obj = jsonfile.parse(raw, object_pairs_hook=jsonfile.no_duplicate_keys)
    except jsonfile.JsonError as e:
        raise HeaderError(f"header is {e}") from None
    if not isinstance(obj, dict):
        raise HeaderError("header is not a JSON object")

    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    if len(obj) > MAX_TENSORS:
        raise HeaderError(f"more than {MAX_TENSORS} tensors")

    tensors: dict[str, HeaderEntry] = {}
    for name, spec in obj.items():
        if not name:
            raise HeaderError("empty tensor name")
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
        problem = _shape_problem(shape)
        if problem is not None:
            raise HeaderError(f"tensor {name!r}: {problem}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise HeaderError(f"tensor {name!r}: data_offsets must be two non-negative ints")
        begin, end = offsets
        if end < begin:
            raise HeaderError(f"tensor {name!r}: data_offsets end {end} < begin {begin}")
        shp = tuple(shape)
        if end - begin != nbytes(dtype, shp):
            raise HeaderError(f"tensor {name!r}: {end - begin} bytes for {dtype}{list(shp)} "
                              f"which needs {nbytes(dtype, shp)}")
        tensors[name] = HeaderEntry(name, dtype, shp, begin, end)

    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise HeaderError(f"tensor {t.name!r}: data overlaps the previous tensor (offset {t.begin} < {pos})")
        if t.begin > pos:
            raise HeaderError(f"tensor {t.name!r}: hole in the data buffer before offset {t.begin}")
        pos = t.end
    return tensors, metadata, pos


def check_buffer(needed: int, buffer_len: int) -> None:
    """The data buffer (file size minus 8 minus the header) holds exactly what the tensors need."""
    if needed > buffer_len:
        raise HeaderError(f"truncated: tensors need {needed} data bytes but the file size leaves {buffer_len}")
    if needed < buffer_len:
        raise HeaderError(f"{buffer_len - needed} trailing bytes after the last tensor")


def parse_header(read_at: ReadAt, file_size: int, *, max_header_bytes: int) -> SafetensorsHeader:
    """Parse and fully validate a safetensors header. ``read_at(offset, length)`` returns bytes."""
    if file_size < 8:
        raise HeaderError(f"truncated: {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    check_length(n, max_header_bytes)
    if 8 + n > file_size:
        raise HeaderError(f"truncated: header length {n} but the file size leaves {file_size - 8} after it")
    raw = read_at(8, n)
    if len(raw) != n:
        raise HeaderError("truncated while reading the header")
    tensors, metadata, needed = parse_json(raw)
    check_buffer(needed, file_size - 8 - n)
    return SafetensorsHeader(n, tensors, metadata, file_size)
