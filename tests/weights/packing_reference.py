"""The packed-storage codec as main shipped it before the compiled kernels (pure numpy): a frozen copy of
``registry/weights/packing.py`` at commit 1a90f20, imports made absolute, nothing else changed. It is the
reference the kernels are held to: ``tests/weights/test_packing.py`` checks that the shipped codec
writes exactly the bytes this one writes and decodes what this one wrote. Do not edit it: it is the
witness of the payload format."""

# ruff: noqa

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from registry.weights.formatfile import varint
from registry.weights.safetensors_header import DTYPE_BITS, HeaderError, parse_header

__all__ = ["FRAME_BYTES", "PackError", "Reference", "Segment", "decode", "decoded_length", "encode", "needs_reference",
           "segments"]

# Raw bytes per segment at most. 4 MiB, measured (bench/storage.py) against 1 to 16 MiB: the
# compression is the same as with larger frames (zstd's level-1 window is 512 KiB and its Huffman
# tables are per 128 KiB block; 1 MiB frames lose 0.1-0.3 %), decoding is no slower, and the coding
# working set (the segment, its reference, the payload and every temporary, sort indices included:
# about 17 bytes per byte of segment) stays near 70 MiB. A Range read decodes whole frames, so at
# most two frames it needs only in part.
FRAME_BYTES: int = 4 << 20

# Largest safetensors header :func:`segments` parses (the safetensors reader's own limit); a file
# whose header is larger is cut as opaque bytes (still lossless).
MAX_HEADER_BYTES = 100_000_000
# Largest segment :func:`encode` takes and :func:`decode` gives back (a frame, or a header of up to
# MAX_HEADER_BYTES, is far below it): a corrupt length field cannot make decode allocate more.
MAX_DECODED_BYTES = 1 << 30

DEFAULT_LEVEL = 1

Buffer = bytes | bytearray | memoryview
U8 = npt.NDArray[np.uint8]


class PackError(ValueError):
    """A payload that cannot be decoded: truncated, corrupt, of an unknown version, or needing a
    reference that is missing or of the wrong length."""


@dataclass(frozen=True)
class Segment:
    """A byte range of a file and what it holds.

    ``dtype`` is the safetensors dtype of tensor bytes (None for the header and opaque bytes);
    ``key`` names the tensor frame so that the same frame of the same tensor in another file of the
    same architecture has the same key: ``"{dtype}|{shape}|{first}-{end}|{name}"`` with the shape
    as ``x``-joined dims and ``first``/``end`` the frame's element range (the name goes last, so the
    key parses unambiguously whatever characters the name holds). None where there is nothing
    to match."""

    offset: int
    length: int
    dtype: str | None
    key: str | None


# --- segments -------------------------------------------------------------------------------------


def _unit_bytes(dtype: str) -> int:
    """Bytes in the smallest run of whole elements that also ends on a byte boundary."""
    bits = DTYPE_BITS[dtype]
    unit_bits = bits
    while unit_bits % 8:
        unit_bits += bits
    return unit_bits // 8


def _opaque(out: list[Segment], begin: int, end: int) -> None:
    step = max(1, FRAME_BYTES)
    for off in range(begin, end, step):
        out.append(Segment(off, min(step, end - off), None, None))


def segments(read_at: Callable[[int, int], bytes], size: int) -> list[Segment]:
    """Cut a file of ``size`` bytes into segments covering ``[0, size)`` in order, without gaps,
    overlaps or empty segments. ``read_at(offset, length)`` returns the file's bytes.

    A file the project's safetensors parser accepts becomes: one segment for the 8-byte length and
    the header JSON (padding included, however long), then one segment per tensor in data order, a
    tensor larger than :data:`FRAME_BYTES` cut into frames at element boundaries (an empty tensor
    contributes nothing), and opaque frames for any bytes no tensor covers. Anything else is cut into
    opaque frames of at most :data:`FRAME_BYTES`."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    out: list[Segment] = []
    try:
        header = parse_header(read_at, size, max_header_bytes=MAX_HEADER_BYTES)
    except (HeaderError, struct.error):  # not a safetensors file (I/O errors propagate)
        _opaque(out, 0, size)
        return out
    out.append(Segment(0, header.data_start, None, None))
    pos = header.data_start
    for t in header.in_data_order():
        begin, end = header.data_start + t.begin, header.data_start + t.end
        if begin > pos:
            _opaque(out, pos, begin)
        if end == begin:
            continue
        unit = _unit_bytes(t.dtype)
        step = max(unit, FRAME_BYTES // unit * unit)
        bits = DTYPE_BITS[t.dtype]
        shape = "x".join(str(d) for d in t.shape)
        for off in range(begin, end, step):
            stop = min(off + step, end)
            first, last = (off - begin) * 8 // bits, (stop - begin) * 8 // bits
            out.append(Segment(off, stop - off, t.dtype, f"{t.dtype}|{shape}|{first}-{last}|{t.name}"))
        pos = end
    if pos < size:
        _opaque(out, pos, size)
    return out


# --- element layouts --------------------------------------------------------------------------------

# dtype -> (element width in bytes, left rotation in bits, exponent shift, exponent bits)
_LAYOUT: dict[str, tuple[int, int, int, int]] = {
    "BF16": (2, 1, 7, 8),
    "F16": (2, 0, 10, 5),
    "F32": (4, 1, 23, 8),
    "C64": (4, 1, 23, 8),  # pairs of fp32
    "F64": (8, 0, 52, 11),
    "F8_E4M3": (1, 0, 3, 4),
    "F8_E4M3FNUZ": (1, 0, 3, 4),
    "F8_E5M2": (1, 0, 2, 5),
    "F8_E5M2FNUZ": (1, 0, 2, 5),
    "I16": (2, 0, 0, 0), "U16": (2, 0, 0, 0),
    "I32": (4, 0, 0, 0), "U32": (4, 0, 0, 0),
    "I64": (8, 0, 0, 0), "U64": (8, 0, 0, 0),
}
# elements are little-endian on disk (safetensors), whatever the machine
_UINT: dict[int, Any] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_INT: dict[int, Any] = {1: np.dtype("i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}

_RAW, _PLANES, _XOR, _SUB = 0, 1, 2, 3
_MAGIC = b"RPK"
_VERSION = 1
_HEAD = struct.Struct("<3sBBBBBBBI")

# stream modes
_S_RAW, _S_ZSTD, _S_CONST, _S_PACK4, _S_PACK2 = 0, 1, 2, 3, 4
# reference coding is kept only when it beats this share of the raw size; above it the
# no-reference form is tried as well (an unrelated reference, e.g. a re-initialised head)
_REF_RETRY = 0.75
# the sample that decides on reordering holds at least _SORT_MIN elements (a quarter of the
# segment at most), and a section of the reordered elements at least _SECTION_MIN (each section's
# planes are compressed apart)
_SORT_MIN = 4096
_SECTION_MIN = 8192
# Reordering costs the decoder a stable sort of the reference's exponents (about 10 ns per
# element), so it is used only where a sample of the segment shows it saving at least this many
# bits per element: dense weight updates save about one, the sparsely updated rows of an embedding
# table almost nothing.
_SORT_GAIN_BITS = 0.125
_SORT_SAMPLE = 1 << 18
_SORT_CHUNK = 1 << 17


def _layout(dtype: str | None, n: int) -> tuple[int, int, int, int]:
    lay = _LAYOUT.get(dtype or "", (1, 0, 0, 0))
    if n % lay[0]:
        return (1, 0, 0, 0)
    return lay


def _rotl(a: npt.NDArray[Any], r: int) -> npt.NDArray[Any]:
    if r == 0:
        return a
    t = a.dtype.type
    return (a << t(r)) | (a >> t(a.dtype.itemsize * 8 - r))  # type: ignore[no-any-return]


def _rotr_inplace(a: npt.NDArray[Any], r: int) -> npt.NDArray[Any]:
    """``a`` rotated right by ``r`` bits, in place (one temporary)."""
    if r == 0:
        return a
    t = a.dtype.type
    high = a << t(a.dtype.itemsize * 8 - r)
    a >>= t(r)
    a |= high
    return a


def _zigzag_inplace(d: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Wrapped difference (unsigned) -> zigzag, in place: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    w = d.dtype.itemsize
    sign = d.view(_INT[w]) >> _INT[w].type(w * 8 - 1)  # 0 or all ones
    d <<= d.dtype.type(1)
    d ^= sign.view(d.dtype)
    return d


def _unzigzag_inplace(z: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The inverse of :func:`_zigzag_inplace`, in place (one temporary)."""
    t = z.dtype.type
    w = z.dtype.itemsize
    # all ones where the lowest bit is set (an arithmetic shift; numpy's negation of unsigned
    # integers is several times slower)
    mask = (z << t(w * 8 - 1)).view(_INT[w])
    mask >>= _INT[w].type(w * 8 - 1)
    z >>= t(1)
    z ^= mask.view(z.dtype)
    return z


@dataclass(frozen=True)
class _Order:
    """The stable order of a segment's elements by a small integer key (``np.argsort(key,
    kind="stable")``), kept chunk by chunk: ``rows[i]`` is the stable argsort of the keys of chunk
    ``i`` (elements ``[i * chunk, (i + 1) * chunk)``, indices local to the chunk) and
    ``cuts[i, v]`` where key ``v`` starts in it. The whole order is: the elements with the
    smallest key from every chunk in chunk order, then the next key, ... (a chunk's sort stays in
    cache: three times faster than sorting a frame in one piece, and no frame-sized index is built).
    ``bounds`` are the section boundaries in that order (see :func:`_order`)."""

    chunk: int
    rows: list[npt.NDArray[np.intp]]
    cuts: npt.NDArray[np.intp]  # (rows, values + 1)
    counts: npt.NDArray[np.intp]  # elements per key value
    bounds: list[int]

    def slices(self) -> list[tuple[int, int, int]]:
        """(chunk, start, stop) of every non-empty run of the order, in order: key by key, chunk
        by chunk (positions within the chunk's sorted keys)."""
        out: list[tuple[int, int, int]] = []
        cuts = self.cuts.tolist()
        for v in np.flatnonzero(self.counts).tolist():
            out += [(i, c[v], c[v + 1]) for i, c in enumerate(cuts) if c[v + 1] > c[v]]
        return out


def _run_starts(keys: npt.NDArray[Any], orders: npt.NDArray[np.intp], values: int, lo: int,
                hi: int) -> npt.NDArray[np.intp]:
    """``cuts[i, v]``: where key ``v`` starts in row ``i`` sorted by ``orders[i]`` (the rows'
    stable argsorts), for keys below ``values`` all within ``[lo, hi)``. One vectorised binary
    search over every (row, key) pair: several times cheaper than sorting the keys again."""
    m, n = keys.shape
    cuts = np.zeros((m, values + 1), dtype=np.intp)
    cuts[:, hi:] = n
    probe = np.arange(lo, hi, dtype=np.intp)  # keys below lo start at 0, keys from hi on at n
    if not len(probe) or not n:
        return cuts
    first = np.zeros((m, len(probe)), dtype=np.intp)
    last = np.full((m, len(probe)), n, dtype=np.intp)
    row = np.arange(m)[:, None]
    for _ in range(n.bit_length()):
        mid = (first + last) >> 1
        below = (keys[row, orders[row, np.minimum(mid, n - 1)]] < probe) & (first < last)
        first = np.where(below, mid + 1, first)
        last = np.where(below, last, mid)
    cuts[:, lo:hi] = first
    return cuts


def _stable_order(key: npt.NDArray[Any], values: int) -> _Order:
    """The stable order of ``key`` (values below ``values``), without section bounds."""
    n = len(key)
    chunk = _SORT_CHUNK
    if n == 0:
        return _Order(chunk, [], np.zeros((0, values + 1), dtype=np.intp), np.zeros(values, dtype=np.intp), [0, 0])
    lo, hi = int(key.min()), int(key.max()) + 1
    rows: list[npt.NDArray[np.intp]] = []
    edges: list[npt.NDArray[np.intp]] = []
    m = n // chunk
    if m:
        grid = key[: m * chunk].reshape(m, chunk)
        orders = np.argsort(grid, axis=1, kind="stable")
        rows += list(orders)
        edges.append(_run_starts(grid, orders, values, lo, hi))
    if m * chunk < n:
        tail = key[m * chunk:].reshape(1, -1)
        orders = np.argsort(tail, axis=1, kind="stable")
        rows.append(orders[0])
        edges.append(_run_starts(tail, orders, values, lo, hi))
    cuts = np.concatenate(edges)
    counts = (cuts[:, 1:] - cuts[:, :-1]).sum(axis=0)
    return _Order(chunk, rows, cuts, counts, [0, n])


def _gather(x: npt.NDArray[Any], order: _Order) -> npt.NDArray[Any]:
    """``x`` in ``order``: each chunk gathered by its own argsort, then the runs interleaved."""
    chunk = order.chunk
    if not order.rows:
        return x[:0].copy()
    rows = [np.take(x[i * chunk:(i + 1) * chunk], o) for i, o in enumerate(order.rows)]
    return np.concatenate([rows[i][a:b] for i, a, b in order.slices()])


def _scatter(xs: npt.NDArray[Any], order: _Order, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
    """The inverse of :func:`_gather` (into ``out`` when given)."""
    chunk = order.chunk
    res = np.empty_like(xs) if out is None else out
    per_row: list[list[npt.NDArray[Any]]] = [[] for _ in order.rows]
    pos = 0
    for i, a, b in order.slices():
        per_row[i].append(xs[pos:pos + b - a])
        pos += b - a
    for i, o in enumerate(order.rows):
        parts = per_row[i]
        res[i * chunk:i * chunk + len(o)][o] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return res


def _order(reference: npt.NDArray[Any], shift: int, bits: int, section_min: int) -> _Order:
    """The stable order of the elements by the reference's exponent field, with the section
    boundaries in that order: runs of equal exponents, neighbours merged until a section holds at
    least ``section_min`` elements (a short tail joins the last section)."""
    t = reference.dtype.type
    key = reference >> t(shift) if shift else reference
    # the cast to 8 or 16 bits keeps the low bits: the mask is needed only for narrower fields
    key = key.astype(np.uint8 if bits <= 8 else np.uint16)
    if bits not in (8, 16):
        key &= key.dtype.type((1 << bits) - 1)
    found = _stable_order(key, 1 << bits)
    ends = np.cumsum(found.counts[found.counts > 0]).tolist()
    bounds = [0]
    for c in ends:
        if c - bounds[-1] >= section_min:
            bounds.append(c)
    total = len(key)
    if bounds[-1] != total:
        if len(bounds) > 1:
            bounds[-1] = total  # a short tail joins the section before it
        else:
            bounds.append(total)
    return _Order(found.chunk, found.rows, found.cuts, found.counts, bounds)


# --- streams ------------------------------------------------------------------------------------------

_local = threading.local()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _blob(data: U8 | bytes, level: int) -> bytes:
    """A byte string as ``mode`` + length + bytes: zstd when that is smaller, else raw."""
    buf = np.ascontiguousarray(data).data if isinstance(data, np.ndarray) else data  # a view: no copy
    n = len(buf)
    if n:
        z = _cctx(level).compress(buf)
        if len(z) < n:
            return b"".join((bytes([_S_ZSTD]), varint(len(z)), z))
    return b"".join((bytes([_S_RAW]), varint(n), buf))


def _is_window(table: bytes) -> bool:
    return len(table) == 15 and all(b - a == 1 for a, b in zip(table, table[1:], strict=False))


def _codes(s: U8, table: bytes, bits: int) -> tuple[U8, U8]:
    """Codes for ``s`` (padded with zeros to whole bytes of codes) and the escapes: the code of a
    value is its index in ``table`` (3 values for 2-bit codes, up to 15 for 4-bit), the last code
    marks an escape."""
    esc = (1 << bits) - 1
    per = 8 // bits
    n = len(s)
    codes = np.zeros(n + (-n) % per, dtype=np.uint8)
    if bits == 2:  # by comparisons, several times faster than a gather
        miss0 = s != np.uint8(table[0])
        miss1 = miss0 & (s != np.uint8(table[1]))
        miss2 = miss1 & (s != np.uint8(table[2]))
        np.add(miss0.view(np.uint8), miss1.view(np.uint8), out=codes[:n])
        codes[:n] += miss2.view(np.uint8)
        return codes, s[miss2]
    if _is_window(table):  # consecutive values: a subtraction
        np.subtract(s, np.uint8(table[0]), out=codes[:n])
        outside = codes[:n] >= esc
        np.minimum(codes, np.uint8(esc), out=codes)
        return codes, s[outside]
    rank = np.full(256, esc, dtype=np.uint8)
    rank[np.frombuffer(table, dtype=np.uint8)] = np.arange(len(table), dtype=np.uint8)
    np.take(rank, s, out=codes[:n])
    return codes, s[codes[:n] == esc]


def _packed(s: U8, table: bytes, bits: int, level: int) -> bytes:
    """``s`` as :func:`_codes`, ``8 // bits`` codes to a byte (code *i* of a group in bits
    ``[bits*i, bits*(i+1))``), then the escapes."""
    codes, escapes = _codes(s, table, bits)
    # gather the codes of a group with one multiplication: code i sits in byte i of the word and
    # the multiplier moves each to its bit field in the top byte (no carries: codes are small)
    if bits == 2:
        packed = ((codes.view("<u4") * np.uint32(0x01041040)) >> np.uint32(24)).astype(np.uint8)
        head = bytes([_S_PACK2]) + table
    else:
        packed = ((codes.view("<u2") * np.uint16(0x0110)) >> np.uint16(8)).astype(np.uint8)
        head = bytes([_S_PACK4, len(table)]) + table
    return head + _blob(packed, level) + _blob(escapes, level)


def _unpacked(packed: U8, bits: int, n: int) -> U8:
    """The codes :func:`_packed` packed: one byte per code."""
    if bits == 2:
        w = packed.astype("<u4")
        w = (w | (w << np.uint32(6)) | (w << np.uint32(12)) | (w << np.uint32(18))) & np.uint32(0x03030303)
    else:
        w = packed.astype("<u2")
        w = (w | (w << np.uint16(4))) & np.uint16(0x0F0F)
    out: U8 = w.view(np.uint8)[:n]
    return out


def _stream(s: U8, level: int) -> bytes:
    """One byte plane, in the smallest of the stream modes."""
    n = len(s)
    if n == 0:
        return bytes([_S_RAW, 0])
    lo, hi = int(s.min()), int(s.max())
    if lo == hi:
        return bytes([_S_CONST, lo])
    best = _blob(s, level)
    if best[0] == _S_RAW or n < 64:
        return best  # incompressible: packing cannot help either
    # which values dominate, judged on a sample (any table decodes; escapes carry the rest).
    # Escapes cost a byte each on top of their code, so packing is tried only where they are rare:
    # 2-bit codes for the three most frequent values (the low bytes of small differences, or a
    # few repeated patterns), 4-bit codes for a window of 15 consecutive values (exponents).
    sample = s[:: max(1, n // 65536)]
    counts = np.bincount(sample, minlength=256)
    top = np.argsort(-counts, kind="stable")
    if counts[top[:3]].sum() >= 0.97 * len(sample):
        cand = _packed(s, bytes(top[:3].tolist()), 2, level)
        if len(cand) < len(best):
            best = cand
    if counts[top[:15]].sum() >= 0.97 * len(sample):
        used = np.sort(top[:15][counts[top[:15]] > 0])
        lo = min(int(used[0]), 256 - 15)
        # values that fit in a window of 15 take the window (coded by a subtraction)
        table = bytes(range(lo, lo + 15)) if int(used[-1]) < lo + 15 else bytes(used.tolist())
        cand = _packed(s, table, 4, level)
        if len(cand) < len(best):
            best = cand
    return best


class _Reader:
    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise PackError("truncated payload")
        b = self.buf[self.pos]
        self.pos += 1
        return int(b)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise PackError("truncated payload")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise PackError("malformed length")

    def blob(self, n: int) -> U8:
        """A raw or zstd byte string that must decode to exactly ``n`` bytes."""
        mode = self.byte()
        body = self.take(self.varint())
        if mode == _S_RAW:
            if len(body) != n:
                raise PackError(f"stream holds {len(body)} bytes, expected {n}")
            return np.frombuffer(body, dtype=np.uint8)
        if mode != _S_ZSTD:
            raise PackError(f"unknown stream mode {mode}")
        try:
            size = zstandard.frame_content_size(body)
        except zstandard.ZstdError:
            raise PackError("corrupt zstd stream") from None
        if size != n:
            raise PackError(f"zstd stream declares {size} bytes, expected {n}")
        try:
            out = _dctx().decompress(body)
        except zstandard.ZstdError:
            raise PackError("corrupt zstd stream") from None
        if len(out) != n:
            raise PackError(f"zstd stream decoded to {len(out)} bytes, expected {n}")
        return np.frombuffer(out, dtype=np.uint8)

    def stream_into(self, dst: U8) -> None:
        """The next stream (``len(dst)`` bytes), written into ``dst`` (a constant without a
        temporary)."""
        if self.pos + 1 < len(self.buf) and self.buf[self.pos] == _S_CONST:
            dst[...] = self.buf[self.pos + 1]
            self.pos += 2
            return
        dst[...] = self.stream(len(dst))

    def stream(self, n: int) -> U8:
        mode = self.buf[self.pos] if self.pos < len(self.buf) else None
        if mode in (_S_RAW, _S_ZSTD):
            return self.blob(n)
        mode = self.byte()
        if mode == _S_CONST:
            return np.full(n, self.byte(), dtype=np.uint8)
        if mode not in (_S_PACK4, _S_PACK2):
            raise PackError(f"unknown stream mode {mode}")
        if mode == _S_PACK2:
            v0, v1, v2 = (int(b) for b in self.take(3))
            flat = _unpacked(self.blob(-(-n // 4)), 2, n)
            # table look-up by arithmetic (several times faster than a gather)
            out = ((flat == 1).view(np.uint8) * np.uint8((v1 - v0) & 0xFF)) + np.uint8(v0)
            out += (flat == 2).view(np.uint8) * np.uint8((v2 - v0) & 0xFF)
            where = flat == 3
        else:
            k = self.byte()
            if k > 15:
                raise PackError("malformed symbol table")
            table = self.take(k).tobytes()
            flat = _unpacked(self.blob(-(-n // 2)), 4, n)
            if _is_window(table):
                out = flat + np.uint8(table[0])
            else:
                lut = np.zeros(16, dtype=np.uint8)
                lut[:k] = np.frombuffer(table, dtype=np.uint8)
                out = np.take(lut, flat)
            where = flat >= k
        escapes = self.blob(int(np.count_nonzero(where)))
        out[where] = escapes
        result: U8 = out
        return result


# --- encode / decode ------------------------------------------------------------------------------------


def _as_u8(data: Any) -> U8:
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):
        return np.frombuffer(memoryview(data).tobytes(), dtype=np.uint8)


class Reference:
    """A reference segment for :func:`encode` and :func:`decode` that keeps what coding against it
    computes from it alone: the stable order of its elements by exponent. Coding a segment and
    decoding the payload to check it then sort the reference once. Any buffer works where a
    ``Reference`` does (nothing is kept then)."""

    __slots__ = ("_orders", "data", "u8")

    def __init__(self, data: Buffer) -> None:
        self.data = data
        self.u8 = _as_u8(data)
        self._orders: dict[tuple[int, int, int, int], _Order] = {}

    def __len__(self) -> int:
        return len(self.u8)

    def forget(self) -> None:
        """Drop the orders kept so far (their indices take 4-8 bytes per element)."""
        self._orders.clear()

    def order(self, width: int, shift: int, bits: int, section_min: int) -> _Order:
        key = (width, shift, bits, section_min)
        found = self._orders.get(key)
        if found is None:
            found = self._orders[key] = _order(self.u8.view(_UINT[width]), shift, bits, section_min)
        return found


def _reference(reference: Buffer | Reference | None) -> Reference | None:
    return reference if isinstance(reference, Reference) or reference is None else Reference(reference)


def _planes_body(x: npt.NDArray[Any], level: int, bounds: list[int] | None = None) -> bytes:
    """The byte planes of ``x`` as streams, section by section (one section: all of ``x``)."""
    w = x.dtype.itemsize
    grid = x.view(np.uint8).reshape(-1, w).T.copy() if w > 1 else x.view(np.uint8).reshape(1, -1)
    cuts = bounds if bounds is not None else [0, len(x)]
    return b"".join(_stream(grid[i, a:b], level) for a, b in zip(cuts, cuts[1:], strict=False) for i in range(w))


def _head(method: int, lay: tuple[int, int, int, int], crc: int, n: int, section_log: int = 0) -> bytes:
    w, rot, shift, bits = lay
    return _HEAD.pack(_MAGIC, _VERSION, method, w, rot, shift, bits, section_log, crc) + varint(n)


def _encode_as(raw: U8, method: int, lay: tuple[int, int, int, int], ref: Reference | None, crc: int,
               level: int) -> bytes:
    """The payload of ``raw`` in one given form (``lay``'s key bits 0 = no reordering)."""
    w, rot, shift, bits = lay
    if method == _RAW:
        return _head(_RAW, (1, 0, 0, 0), crc, len(raw)) + raw.tobytes()
    a = raw.view(_UINT[w])
    if method == _PLANES:
        return _head(method, (w, rot, 0, 0), crc, len(raw)) + _planes_body(_rotl(a, rot), level)
    assert ref is not None
    r = ref.u8.view(_UINT[w])
    if method == _XOR:
        x = _rotl(a ^ r, rot)
    else:
        x, rot = _zigzag_inplace(a - r), 0
    if not bits:
        return _head(method, (w, rot, 0, 0), crc, len(raw)) + _planes_body(x, level)
    section_log = _SECTION_MIN.bit_length() - 1
    order = ref.order(w, shift, bits, 1 << section_log)
    return _head(method, (w, rot, shift, bits), crc, len(raw), section_log) + _planes_body(
        _gather(x, order), level, order.bounds)


def _sort_pays(raw: U8, ref: U8, lay: tuple[int, int, int, int], level: int) -> bool:
    """Whether reordering by the reference's exponent saves :data:`_SORT_GAIN_BITS` per element,
    judged on an evenly strided sample of about :data:`_SORT_SAMPLE` elements."""
    w, _, shift, bits = lay
    count = len(raw) // w
    if not bits or count < 4 * _SORT_MIN:
        return False
    step = max(4, count // _SORT_SAMPLE)
    a, r = raw.view(_UINT[w])[::step], ref.view(_UINT[w])[::step]
    z = _zigzag_inplace(a - r)
    plain = len(_planes_body(z, level))
    order = _order(r, shift, bits, max(1, _SECTION_MIN // step))
    grouped = len(_planes_body(_gather(z, order), level, order.bounds))
    return (plain - grouped) * 8 >= _SORT_GAIN_BITS * len(z)


def encode(data: Buffer, dtype: str | None, reference: Buffer | Reference | None = None, *,
           level: int = DEFAULT_LEVEL) -> bytes:
    """``data`` (one segment) as a self-describing payload, in the smallest of: raw; byte planes
    (exponent bits in a plane of their own for bf16/fp32/fp64) + zstd; and, given a ``reference``
    of the same length (the same tensor frame in the version this one derives from), the
    difference from it, reordered by the reference's exponent, in planes + zstd. ``dtype`` is the
    safetensors dtype (None: opaque bytes). ``level`` is the zstd level of every stream.
    Deterministic: the same arguments give the same bytes."""
    raw = _as_u8(data)
    n = len(raw)
    if n > MAX_DECODED_BYTES:
        raise PackError(f"segment of {n} bytes exceeds the {MAX_DECODED_BYTES}-byte limit")
    crc = zlib.crc32(raw.data)
    ref = _reference(reference)
    if ref is not None and len(ref) != n:
        raise PackError(f"reference holds {len(ref)} bytes, data {n}")
    lay = _layout(dtype, n)
    best = _encode_as(raw, _RAW, lay, None, crc, level)
    if n == 0:
        return best
    cands: list[bytes] = []
    if ref is not None:
        sort = lay if _sort_pays(raw, ref.u8, lay, level) else (*lay[:3], 0)
        cands.append(_encode_as(raw, _SUB, sort, ref, crc, level))
    if not cands or len(cands[0]) > _REF_RETRY * n:
        cands.append(_encode_as(raw, _PLANES, (*lay[:2], 0, 0), None, crc, level))
    for c in cands:
        if len(c) < len(best):
            best = c
    return best


def _parse_head(payload: Buffer) -> tuple[memoryview, int, tuple[int, int, int, int], int, int, int, int]:
    buf = memoryview(payload)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    if len(buf) < _HEAD.size:
        raise PackError("truncated payload")
    magic, version, method, w, rot, shift, bits, section_log, crc = _HEAD.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise PackError("not a packed segment (bad magic)")
    if version != _VERSION:
        raise PackError(f"unsupported packed segment version {version}")
    if method not in (_RAW, _PLANES, _XOR, _SUB):
        raise PackError(f"unknown method {method}")
    if w not in _UINT or rot >= w * 8 or bits > 16 or shift + bits > w * 8 or section_log > 40:
        raise PackError("malformed element layout")
    rd = _Reader(buf, _HEAD.size)
    n = rd.varint()
    if n % w:
        raise PackError(f"length {n} is not a whole number of {w}-byte elements")
    return buf, method, (w, rot, shift, bits), crc, n, rd.pos, section_log


def needs_reference(payload: Buffer) -> bool:
    """Whether ``payload`` was coded against a reference (decoding it then needs that reference)."""
    return _parse_head(payload)[1] in (_XOR, _SUB)


def decoded_length(payload: Buffer) -> int:
    """The number of bytes ``payload`` decodes to, read from its header (nothing is decoded)."""
    return _parse_head(payload)[4]


def decode(payload: Buffer, reference: Buffer | Reference | None = None, *,
           expected_length: int | None = None, check_crc: bool = True) -> bytes:
    """The bytes :func:`encode` was given. ``reference`` must be the reference it was given when
    :func:`needs_reference` says so (ignored otherwise). ``expected_length``, when known, is checked
    before anything is allocated. Raises :class:`PackError` on a truncated or corrupt payload, a
    missing reference or one of the wrong length, or a decoded result whose CRC-32 differs (a wrong
    reference of the right length). ``check_crc=False`` skips that last check, for bytes used only
    as the reference of another payload (whose own CRC-32 then catches them being wrong)."""
    buf, method, lay, crc, n, pos, section_log = _parse_head(payload)
    w, rot, shift, bits = lay
    if expected_length is not None and n != expected_length:
        raise PackError(f"payload declares {n} bytes, expected {expected_length}")
    if n > MAX_DECODED_BYTES:
        raise PackError(f"payload declares {n} bytes, more than the {MAX_DECODED_BYTES}-byte limit")
    rd = _Reader(buf, pos)
    ref: Reference | None = None
    if method in (_XOR, _SUB):
        if reference is None:
            raise PackError("payload was coded against a reference and none was given")
        ref = _reference(reference)
        assert ref is not None
        if len(ref) != n:
            raise PackError(f"reference holds {len(ref)} bytes, payload {n}")
    keep_order = isinstance(reference, Reference)  # the caller's Reference keeps it for the next call
    if method == _RAW:
        out = rd.take(n).tobytes()
    else:
        count = n // w
        order = ref.order(w, shift, bits, 1 << section_log) if bits and ref is not None else None
        cuts = order.bounds if order is not None else [0, count]
        grid = np.empty((count, w), dtype=np.uint8)
        for a, b in zip(cuts, cuts[1:], strict=False):
            for i in range(w):
                rd.stream_into(grid[a:b, i])
        x = grid.reshape(-1).view(_UINT[w])
        if order is not None:
            x = _scatter(x, order)
            del grid, order  # the order's indices are the largest temporaries: free them now
            if ref is not None and not keep_order:
                ref.forget()
        # x is this call's own array from here on: the rest works in place
        if method == _PLANES:
            _rotr_inplace(x, rot)
        elif method == _XOR:
            assert ref is not None
            _rotr_inplace(x, rot)
            x ^= ref.u8.view(_UINT[w])
        else:
            assert ref is not None
            _unzigzag_inplace(x)
            x += ref.u8.view(_UINT[w])
        out = x.tobytes()
    if rd.pos != len(buf):
        raise PackError(f"{len(buf) - rd.pos} bytes trail the payload")
    if check_crc and zlib.crc32(out) != crc:
        raise PackError("decoded bytes fail their CRC-32 (corrupt payload or wrong reference)")
    return out
