"""Lossless codec for packed storage (interim plain recipe: XOR, byte planes, zstd)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard

from .safetensors_header import DTYPE_BITS, HeaderError, parse_header

FRAME_BYTES = 16 << 20
_MAGIC = b"RPK1"


class PackError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    offset: int
    length: int
    dtype: str | None
    key: str | None


def segments(read_at: Callable[[int, int], bytes], size: int) -> list[Segment]:
    out: list[Segment] = []
    try:
        h = parse_header(read_at, size, max_header_bytes=100 << 20)
    except (HeaderError, ValueError):
        h = None
    if h is None:
        return _opaque(0, size)
    data0 = 8 + h.header_len
    out.append(Segment(0, data0, None, None))
    pos = data0
    for e in sorted(h.tensors.values(), key=lambda e: e.begin):
        b, n = data0 + e.begin, e.end - e.begin
        if b > pos:
            out += _opaque(pos, b - pos)
        if n == 0:
            continue
        width = max(1, DTYPE_BITS.get(e.dtype, 8) // 8)
        frame = max(width, FRAME_BYTES // width * width)
        for i, off in enumerate(range(0, n, frame)):
            out.append(Segment(b + off, min(frame, n - off), e.dtype, f"{e.name}|{e.dtype}|{list(e.shape)}|{i}"))
        pos = b + n
    if pos < size:
        out += _opaque(pos, size - pos)
    return out


def _opaque(start: int, length: int) -> list[Segment]:
    return [Segment(start + o, min(FRAME_BYTES, length - o), None, None) for o in range(0, length, FRAME_BYTES)]


def _width(dtype: str | None) -> int:
    if dtype is None:
        return 1
    bits = DTYPE_BITS.get(dtype, 8)
    return bits // 8 if bits % 8 == 0 and bits >= 8 else 1


def encode(data: bytes | memoryview, dtype: str | None, reference: bytes | memoryview | None = None, *,
           level: int = 3) -> bytes:
    raw = np.frombuffer(data, dtype=np.uint8)
    n = raw.size
    w = _width(dtype)
    if n % w:
        w = 1
    cands = [b"\x00" + bytes(raw)]
    cctx = zstandard.ZstdCompressor(level=level)
    ref = None
    if reference is not None and len(reference) == n:
        ref = np.frombuffer(reference, dtype=np.uint8)
    for use_ref in ([False, True] if ref is not None else [False]):
        x = raw ^ ref if use_ref else raw
        planes = x.reshape(-1, w).T.copy() if w > 1 else x
        cands.append(bytes([2 if use_ref else 1, w]) + cctx.compress(planes.tobytes()))
    best = min(cands, key=len)
    return _MAGIC + struct.pack("<Q", n) + best


def _parse(payload: bytes | memoryview) -> tuple[int, int, memoryview]:
    mv = memoryview(payload)
    if len(mv) < 13 or bytes(mv[:4]) != _MAGIC:
        raise PackError("not a packed payload")
    (n,) = struct.unpack("<Q", mv[4:12])
    return n, mv[12], mv[13:]


def needs_reference(payload: bytes | memoryview) -> bool:
    return _parse(payload)[1] == 2


def decode(payload: bytes | memoryview, reference: bytes | memoryview | None = None) -> bytes:
    n, codec, body = _parse(payload)
    if codec == 0:
        if len(body) != n:
            raise PackError("raw payload has the wrong length")
        return bytes(body)
    if codec not in (1, 2) or len(body) < 1:
        raise PackError(f"unknown codec {codec}")
    w = body[0]
    try:
        x = np.frombuffer(zstandard.ZstdDecompressor().decompress(bytes(body[1:]), max_output_size=n), np.uint8)
    except zstandard.ZstdError as e:
        raise PackError(f"corrupt payload: {e}") from e
    if x.size != n or w == 0 or n % w:
        raise PackError("payload decodes to the wrong length")
    if w > 1:
        x = x.reshape(w, -1).T.reshape(-1)
    if codec == 2:
        if reference is None or len(reference) != n:
            raise PackError("this payload needs its reference")
        x = x ^ np.frombuffer(reference, np.uint8)
    return x.tobytes()
