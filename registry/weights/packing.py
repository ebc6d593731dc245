"""Lossless codec for packed storage: a file cut into segments, each segment coded on its own.

The registry keeps every version's files byte-exact. Packed storage keeps them in fewer bytes:
:func:`segments` cuts a file into a header segment, one segment per tensor frame (at most
:data:`FRAME_BYTES` raw bytes, cut at element boundaries) and opaque frames for anything else;
:func:`encode` turns one segment into a self-describing payload, optionally against a
*reference* (the same tensor frame in the version this one derives from, matched by
:attr:`Segment.key`); :func:`decode` gives the bytes back, checked.

How a segment is coded (the encoder keeps the smallest form; raw when nothing helps):

* **planes** (no reference): each element's bytes are split into byte planes (byte *i* of every
  element, in order), and each plane is compressed on its own, so the near-random low mantissa
  bytes do not dilute the statistics of the exponent bytes. For bf16, fp32 and complex64 the
  element is first rotated left by one bit, which puts the 8 exponent bits into a byte of their own
  and the sign next to the noisiest mantissa bits. fp16 (sign, 5 exponent bits and the top 2
  mantissa bits already share a byte) and fp64 (whose exponent spans two bytes either way) gain
  nothing from a rotation (measured) and get none.
* **difference against the reference** (fine-tunes): each element's bit pattern minus the
  reference's, as integers wrapping at the element width, zigzag-mapped so that small moves
  either way become small numbers. A fine-tuned weight moves a few units in the last place of
  its reference, so most high bytes become zero and the low bytes small. This beats XOR (also
  available): a carry turns a one-unit move into a long run of ones under XOR
  (``0x3f7fffff ^ 0x3f800000``) but stays 1 as a difference. The elements are then reordered by
  the reference's exponent (a stable sort the decoder repeats from the reference): an update of a
  given size is a larger number of units in the last place for a small weight than for a large
  one, so grouping elements by exponent gives every compressed block a narrow distribution.
* each byte plane (a *stream*) is then stored as one of: zstd; a constant; or, when nearly all
  its values are among 15 (or 3) byte values, their 4-bit (2-bit) codes packed two (four) to a
  byte, the other values in an escape stream, then zstd. Packing several small symbols into one
  byte lets zstd's per-byte Huffman coder get within a few hundredths of a bit of the entropy
  where a lone 2.6-bit exponent costs 2.9 (and it keeps zstd's fast match finder from taking
  short, costly matches in the exponent plane).
* with a reference, the segment is reordered only where a sample shows that to save at least 1/8
  bit per element (dense layers save about one; sparsely updated embedding rows nothing). The
  decoder repeats the order from the reference (a counting sort by exponent, fused with the
  inverse transform: one compiled pass, no index array): on the bench's bf16 fine-tunes
  reordering saves 16-25 % of the bytes; on fp32 it saves 3 % (and keeps a 0.46 fine-tune under
  0.45). The no-reference form is tried too when the difference does
  not compress well (an unrelated reference, e.g. a re-initialised head).

Payload (all integers little-endian)::

    b"RPK" | version u8 | method u8 | width u8 | rotate u8 | key shift u8 | key bits u8
          | section log2 u8 | crc32 u32 of the decoded bytes | raw length (LEB128) | body

``method``: 0 raw (body = the bytes), 1 planes, 2 XOR with the reference, 3 difference with the
reference. ``width`` is the element size the planes use, ``rotate`` the left rotation applied
before splitting, ``key bits`` > 0 means the elements were reordered by
``(reference >> key shift) & (2**key bits - 1)``. The body of methods 1-3 is ``width`` streams,
each ``mode u8`` then: 0 raw (LEB128 length + bytes), 1 zstd (LEB128 length + one zstd frame),
2 constant (one byte), 3 packed 4-bit codes (table size u8 <= 15 + table), 4 packed 2-bit codes
(3-byte table), each followed by the packed codes and the escapes (as mode 0 or 1 streams). With
reordering, the streams come section by section: the sorted elements are cut where the exponent
changes, once a section holds ``2**section log2`` elements (8192). Decoding checks every length,
that nothing trails the body, and the CRC-32 of the result (which also catches a wrong
reference).
"""

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

from . import kernels
from .formatfile import varint
from .safetensors_header import DTYPE_BITS, HeaderError, parse_header

__all__ = ["FRAME_BYTES", "PackError", "Reference", "Segment", "decode", "decoded_length", "encode", "needs_reference",
           "segments", "warm"]

# Raw bytes per segment at most. 4 MiB, measured (bench/storage.py) against 1 to 16 MiB: the
# compression is the same as with larger frames (zstd's level-1 window is 512 KiB and its Huffman
# tables are per 128 KiB block; 1 MiB frames lose 0.1-0.3 %), decoding is no slower, and the coding
# working set (the segment, its reference, the payload and every temporary: about 17 bytes per
# byte of segment when it was measured, sort indices included; fewer since the compiled kernels
# need none) stays near 70 MiB. A Range read decodes whole frames, so at
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
# Reordering costs the coder and the decoder a scattered pass over the elements (a counting sort:
# about 3 ns per element against 0.5 in order), so it is used only where a sample of the segment
# shows it saving at least this many bits per element: dense weight updates save about one, the
# sparsely updated rows of an embedding table almost nothing.
_SORT_GAIN_BITS = 0.125
_SORT_SAMPLE = 1 << 18


def _layout(dtype: str | None, n: int) -> tuple[int, int, int, int]:
    lay = _LAYOUT.get(dtype or "", (1, 0, 0, 0))
    if n % lay[0]:
        return (1, 0, 0, 0)
    return lay


@dataclass(frozen=True)
class _Order:
    """The stable order of a segment's elements by a small integer key (what ``np.argsort(key,
    kind="stable")`` gives), kept as the number of elements per key value: the compiled passes
    (:func:`registry.weights.kernels.split_planes`, :func:`~registry.weights.kernels.join_planes`)
    place each element at the next free slot of its key's run (a counting sort), so no index
    array is built. ``bounds`` are the section boundaries in that order (see :func:`_order`)."""

    shift: int
    bits: int
    counts: npt.NDArray[np.int64]  # elements per key value
    bounds: list[int]


def _order(reference: npt.NDArray[Any], shift: int, bits: int, section_min: int) -> _Order:
    """The stable order of the elements by the reference's exponent field ``(reference >> shift)
    & (2**bits - 1)``, with the section boundaries in that order: runs of equal exponents,
    neighbours merged until a section holds at least ``section_min`` elements (a short tail joins
    the last section)."""
    counts = kernels.key_counts(reference, shift, bits)
    ends = np.cumsum(counts[counts > 0]).tolist()
    bounds = [0]
    for c in ends:
        if c - bounds[-1] >= section_min:
            bounds.append(c)
    total = len(reference)
    if bounds[-1] != total:
        if len(bounds) > 1:
            bounds[-1] = total  # a short tail joins the section before it
        else:
            bounds.append(total)
    return _Order(shift, bits, counts, bounds)


def _split(a: npt.NDArray[Any], r: npt.NDArray[Any] | None, method: int, rot: int,
           order: _Order | None) -> U8:
    """The byte planes [width, len(a)] of ``a`` transformed by ``method`` (planes: rotated left by
    ``rot``; XOR with ``r``, then rotated; the zigzagged difference from ``r``), in ``order`` when
    given: one compiled pass."""
    w = a.dtype.itemsize
    if w == 1 and method == _PLANES and not rot and order is None:
        return a.view(np.uint8).reshape(1, -1)  # the bytes are their own plane
    grid = np.empty((w, len(a)), dtype=np.uint8)
    if order is None:
        kernels.split_planes(a, r, method, rot, 0, 0, None, grid)
    else:
        kernels.split_planes(a, r, method, rot, order.shift, order.bits, order.counts, grid)
    return grid


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


def _code_table(table: bytes, bits: int) -> U8:
    """The code of every byte value (256 entries): its index in ``table`` (3 values for 2-bit
    codes, up to 15 for 4-bit; a window of 15 consecutive values codes by a subtraction), the last
    code (``2**bits - 1``) for an escape."""
    esc = (1 << bits) - 1
    if bits == 4 and _is_window(table):
        window: U8 = np.minimum((np.arange(256) - table[0]) & 0xFF, esc).astype(np.uint8)
        return window
    lut = np.full(256, esc, dtype=np.uint8)
    for i in reversed(range(len(table))):  # the first index of a value wins
        lut[table[i]] = i
    return lut


def _packed(s: U8, table: bytes, bits: int, level: int) -> bytes:
    """``s`` as codes of ``bits`` bits (:func:`_code_table`), ``8 // bits`` codes to a byte (code *i*
    of a group in bits ``[bits*i, bits*(i+1))``, the last group padded with code 0), then the
    escapes (the values coded as escapes, in order): one compiled pass."""
    packed, escapes = kernels.pack_symbols(s, _code_table(table, bits), bits)
    head = bytes([_S_PACK2]) + table if bits == 2 else bytes([_S_PACK4, len(table)]) + table
    return head + _blob(packed, level) + _blob(escapes, level)


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
        """The next stream (``len(dst)`` bytes), written into ``dst`` (any strides)."""
        n = len(dst)
        mode = self.buf[self.pos] if self.pos < len(self.buf) else None
        if mode in (_S_RAW, _S_ZSTD):
            dst[...] = self.blob(n)
            return
        mode = self.byte()
        if mode == _S_CONST:
            dst[...] = self.byte()
            return
        if mode not in (_S_PACK4, _S_PACK2):
            raise PackError(f"unknown stream mode {mode}")
        values = np.zeros(16, dtype=np.uint8)
        if mode == _S_PACK2:
            bits, first_escape = 2, 3
            values[:3] = np.frombuffer(self.take(3), dtype=np.uint8)  # code 3: an escape, overwritten
        else:
            bits = 4
            first_escape = k = self.byte()
            if k > 15:
                raise PackError("malformed symbol table")
            table = self.take(k).tobytes()
            if _is_window(table):
                values[:] = (np.arange(16) + table[0]) & 0xFF
            else:
                values[:k] = np.frombuffer(table, dtype=np.uint8)
        packed = self.blob(-(-n // (8 // bits)))
        count = kernels.unpack_symbols(packed, values, bits, first_escape, dst)
        escapes = self.blob(count)
        if count:
            kernels.place_escapes(packed, bits, first_escape, escapes, dst)

    def stream(self, n: int) -> U8:
        out = np.empty(n, dtype=np.uint8)
        self.stream_into(out)
        return out


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
        """Drop the orders kept so far (a count per exponent value each)."""
        self._orders.clear()

    def order(self, width: int, shift: int, bits: int, section_min: int) -> _Order:
        key = (width, shift, bits, section_min)
        found = self._orders.get(key)
        if found is None:
            found = self._orders[key] = _order(self.u8.view(_UINT[width]), shift, bits, section_min)
        return found


def _reference(reference: Buffer | Reference | None) -> Reference | None:
    return reference if isinstance(reference, Reference) or reference is None else Reference(reference)


def _planes_body(grid: U8, level: int, bounds: list[int] | None = None) -> bytes:
    """The byte planes ``grid`` [width, elements] as streams, section by section (one section: all
    the elements)."""
    w = grid.shape[0]
    cuts = bounds if bounds is not None else [0, grid.shape[1]]
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
        return _head(method, (w, rot, 0, 0), crc, len(raw)) + _planes_body(_split(a, None, method, rot, None), level)
    assert ref is not None
    r = ref.u8.view(_UINT[w])
    if method == _SUB:
        rot = 0  # the difference is not rotated
    if not bits:
        return _head(method, (w, rot, 0, 0), crc, len(raw)) + _planes_body(_split(a, r, method, rot, None), level)
    section_log = _SECTION_MIN.bit_length() - 1
    order = ref.order(w, shift, bits, 1 << section_log)
    return _head(method, (w, rot, shift, bits), crc, len(raw), section_log) + _planes_body(
        _split(a, r, method, rot, order), level, order.bounds)


def _sort_pays(raw: U8, ref: U8, lay: tuple[int, int, int, int], level: int) -> bool:
    """Whether reordering by the reference's exponent saves :data:`_SORT_GAIN_BITS` per element,
    judged on an evenly strided sample of about :data:`_SORT_SAMPLE` elements."""
    w, _, shift, bits = lay
    count = len(raw) // w
    if not bits or count < 4 * _SORT_MIN:
        return False
    step = max(4, count // _SORT_SAMPLE)
    # contiguous copies of the sample (an eighth of the segment or less): one compiled form of each pass
    a, r = np.ascontiguousarray(raw.view(_UINT[w])[::step]), np.ascontiguousarray(ref.view(_UINT[w])[::step])
    plain = len(_planes_body(_split(a, r, _SUB, 0, None), level))
    order = _order(r, shift, bits, max(1, _SECTION_MIN // step))
    grouped = len(_planes_body(_split(a, r, _SUB, 0, order), level, order.bounds))
    return (plain - grouped) * 8 >= _SORT_GAIN_BITS * len(a)


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
        grid = np.empty((w, count), dtype=np.uint8)  # the byte planes
        for a, b in zip(cuts, cuts[1:], strict=False):
            for i in range(w):
                rd.stream_into(grid[i, a:b])
        if method == _PLANES and not rot and w == 1:
            out = grid.tobytes()
        else:  # one compiled pass: back to the segment's order, unrotated or added to the reference
            y = np.empty(count, dtype=_UINT[w])
            r = ref.u8.view(_UINT[w]) if ref is not None else None
            if order is None:
                kernels.join_planes(grid, r, method, rot, 0, 0, None, y)
            else:
                kernels.join_planes(grid, r, method, rot, order.shift, order.bits, order.counts, y)
            del grid
            out = y.tobytes()
        if order is not None and ref is not None and not keep_order:
            ref.forget()
    if rd.pos != len(buf):
        raise PackError(f"{len(buf) - rd.pos} bytes trail the payload")
    if check_crc and zlib.crc32(out) != crc:
        raise PackError("decoded bytes fail their CRC-32 (corrupt payload or wrong reference)")
    return out


def warm() -> None:
    """Load the compiled kernels of the codec now (numba's JIT and its on-disk cache: about 60 MB
    and a fraction of a second, once per process), so that the first segment a process codes or
    decodes does not pay for it: a server calls this when it starts, before any download."""
    x = (np.arange(40000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(3)
    for dtype in ("U8", "BF16", "F32", "F64"):
        w = _LAYOUT.get(dtype, (1, 0, 0, 0))[0]
        ref = (x >> np.uint64(64 - 8 * w)).astype(_UINT[w]) if w < 8 else x.copy()
        data = ref + (np.arange(len(ref)) % 3).astype(_UINT[w])
        for r in (None, ref.tobytes()):
            decode(encode(data.tobytes(), dtype, r), r)
    # 2- and 4-bit symbol streams with escapes
    s = ((x % np.uint64(3)) + np.uint64(40) * (x % np.uint64(50) == 0)).astype(np.uint8)
    for bits, table in ((2, bytes([0, 1, 2])), (4, bytes(range(15)))):
        payload = _packed(s, table, bits, DEFAULT_LEVEL)
        if (_Reader(memoryview(payload), 0).stream(len(s)) != s).any():  # pragma: no cover - a broken build
            raise PackError("the compiled symbol coder does not round-trip")
