"""Bit-level building blocks of :mod:`registry.weights.compress`: quantizer grids, bit packing and a
lossless entropy coder (rANS) with a fixed Laplace model.

Everything a decoder needs to reproduce is computed with integer arithmetic or with the IEEE-754
basic operations (+, −, ×, ÷, √), which give the same result on every platform: the code tables
are never built from library ``exp``/``erf`` (those may differ in the last bit between CPUs, and a
table that differs by one count decodes garbage). Dequantized values are products of a stored code
and a stored scale in float32, so a stored plan reconstructs to the same bits anywhere.

Pieces:

* **Codebooks** for fixed-rate quantization: symmetric integer grids (``int_levels``; b bits use
  2^b − 1 levels −(2^(b−1) − 1) … 2^(b−1) − 1, scaled to [−1, 1]) and normal-float grids (``NF``;
  NF4 is the 4-bit codebook of quantiles of a normal distribution used by QLoRA, NF3/NF2 are built
  the same way); a group of values is stored as codes (b bits each, packed) plus one float16 scale.
* :func:`pack_bits` / :func:`unpack_bits`: codes of b bits (1 ≤ b ≤ 16) packed little-endian into
  bytes, no padding between values.
* **Entropy-coded uniform quantization**: a row x is rounded to multiples of a step
  Δ = 2^(e/8 − 24) (e ∈ 0…255 stored in one byte, so steps are on a grid of 1/8 octave); the
  integer codes are coded with rANS under a discretised Laplace distribution whose spread is fixed
  by the option's ratio t = Δ / rms(x) = 2^(q/4): P(0) = 1 − √θ, P(c) = ½ θ^|c| (θ^−½ − θ^½) for
  c ≠ 0, θ = exp(−√2 t) (the Laplace law with the row's variance, integrated over each step).
  Frequencies are integers summing to 2^24, every symbol of the alphabet [−K, K] gets at least 1.
* :class:`RansEncoder` / :class:`RansDecoder`: byte-oriented rANS (state in [2^31, 2^39), 24-bit
  probabilities), symbols pushed in order and decoded in the same order. The loops are compiled
  (:func:`registry.weights.kernels.rans_encode` / ``rans_decode``: every row of a stream decoded in
  one call, a few ns per code); the pure-Python loops (Python integers, ``reference=True``) are the
  reference they are tested against, byte for byte, and the fallback without numba.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from functools import lru_cache
from types import ModuleType

import numpy as np
import torch

__all__ = [
    "NF",
    "PROB_BITS",
    "RansDecoder",
    "RansEncoder",
    "alphabet",
    "code_lengths",
    "int_levels",
    "laplace_table",
    "length_table",
    "pack_bits",
    "ratio",
    "step_exponent",
    "step_value",
    "unpack_bits",
]

PROB_BITS = 24
_M = 1 << PROB_BITS
_L = 1 << 31

# Normal-float codebooks (values in [−1, 1], an exact zero, one more positive than negative level).
# NF4 is QLoRA's table; NF3 and NF2 follow the same construction. Literals, so every platform agrees.
NF: dict[int, tuple[float, ...]] = {
    2: (-1.0, 0.0, 0.337929338, 1.0),
    3: (-1.0, -0.478647798, -0.21715124, 0.0, 0.16093722, 0.337929338, 0.562637389, 1.0),
    4: (
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ),
}


def int_levels(bits: int) -> tuple[float, ...]:
    """Symmetric integer grid of ``bits`` bits scaled to [−1, 1]: k / (2^(b−1) − 1) for
    |k| ≤ 2^(b−1) − 1 (2^b − 1 levels; code 2^b − 1 is unused, so zero is exact)."""
    m = (1 << (bits - 1)) - 1
    return tuple(k / m for k in range(-m, m + 1))


# ---------------------------------------------------------------------------------------------
# Bit packing


def pack_bits(codes: torch.Tensor, bits: int) -> bytes:
    """Pack non-negative integer ``codes`` (< 2^bits) into ceil(n·bits / 8) bytes, little-endian bit
    order (value i occupies bits i·b … i·b + b − 1 of the stream)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    c = codes.reshape(-1).to(torch.int64)
    if c.numel() == 0:
        return b""
    if bool((c < 0).any()) or bool((c >= (1 << bits)).any()):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64)).to(torch.uint8)
    packed = (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)
    return packed.numpy().tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes (int64) of ``bits`` bits from ``data``."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    need = (count * bits + 7) // 8
    if len(data) < need:
        raise ValueError(f"packed stream too short: {len(data)} < {need} bytes")
    raw = torch.frombuffer(bytearray(data[:need]), dtype=torch.uint8).to(torch.int64)
    stream = ((raw.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: count * bits]
    return (stream.view(count, bits) << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Entropy-coded uniform quantization: steps and the Laplace model


def step_value(e: int) -> float:
    """The quantization step encoded by exponent byte ``e``: 2^(e/8 − 24), exactly (a float64 power
    of two times 2^(j/8), j = e mod 8, computed with √ only)."""
    out = 2.0 ** (e // 8 - 24)
    root8 = math.sqrt(math.sqrt(math.sqrt(2.0)))
    for _ in range(e % 8):
        out *= root8
    return out


def step_exponent(target: float) -> int:
    """The exponent byte whose :func:`step_value` is nearest to ``target`` (in log scale), clamped to
    0…255; 0 for a zero or non-finite target."""
    if not (target > 0.0 and math.isfinite(target)):
        return 0
    e = round(8.0 * (math.log2(target) + 24.0))
    return min(255, max(0, e))


def ratio(q: int) -> float:
    """t = 2^(q/4), the step of option q relative to the row's root-mean-square (IEEE √ only)."""
    whole, rest = divmod(q, 4)
    t = 2.0**whole
    for _ in range(rest):
        t *= math.sqrt(math.sqrt(2.0))
    return t


def _exp(x: float) -> float:
    """exp(x) with IEEE basic operations only (halving, a fixed Taylor series, squaring), so the
    result is the same on every platform. Accurate to a few ulps times 2^k, which is all a model
    needs: the decoder only has to agree with the encoder."""
    k = 0
    while abs(x) > 0.5:
        x /= 2.0
        k += 1
    s, term = 1.0, 1.0
    for i in range(1, 24):
        term = term * x / i
        s += term
    for _ in range(k):
        s *= s
    return s


def alphabet(length: int, q: int) -> int:
    """K such that every code of a row of ``length`` values quantized with option q lies in [−K, K]:
    |x| ≤ √length · rms(x) and the stored step is at least 2^(−1/16) t · rms(x)."""
    return int(math.ceil(math.sqrt(length) * 1.05 / ratio(q))) + 1


@lru_cache(maxsize=512)
def laplace_table(q: int, K: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(cumulative, frequencies) of the symbols c = −K … K (index c + K) under the discretised Laplace
    law of option q; frequencies are integers ≥ 1 summing to 2^24 (the remainder goes to c = 0)."""
    n = 2 * K + 1
    if n >= _M // 2:
        raise ValueError(f"alphabet of {n} symbols is too large for {PROB_BITS}-bit probabilities")
    theta = _exp(-math.sqrt(2.0) * ratio(q))
    half = math.sqrt(theta)
    p0 = 1.0 - half
    edge = 0.5 * (1.0 / half - half)
    room = _M - n
    freqs = [0] * n
    pw = 1.0
    for c in range(1, K + 1):
        pw *= theta
        f = int(math.floor(pw * edge * room)) + 1
        freqs[K + c] = f
        freqs[K - c] = f
    freqs[K] = int(math.floor(p0 * room)) + 1
    freqs[K] += _M - sum(freqs)
    if freqs[K] < 1:  # pragma: no cover - the floors only ever leave a non-negative remainder
        raise ValueError("Laplace table does not sum to the total")
    cums = [0] * n
    acc = 0
    for i, f in enumerate(freqs):
        cums[i] = acc
        acc += f
    return tuple(cums), tuple(freqs)


@lru_cache(maxsize=512)
def length_table(q: int, K: int) -> torch.Tensor:
    """Ideal code length in bits (−log2 freq / 2^24) of the symbols −K … K under option q (float64)."""
    _, freqs = laplace_table(q, K)
    return PROB_BITS - torch.log2(torch.tensor(freqs, dtype=torch.float64))


def code_lengths(codes: torch.Tensor, q: int, K: int) -> torch.Tensor:
    """Ideal code length in bits of each code under :func:`laplace_table`, for planning (the real
    stream is at most a few bytes longer)."""
    idx = codes.to(torch.int64).clamp(-K, K) + K
    return length_table(q, K)[idx]


def _kernels() -> ModuleType | None:
    """:mod:`registry.weights.kernels` (imported on first use: numba is slow to import), or None where
    numba cannot be imported; the coder then runs its pure-Python reference loops."""
    try:
        from . import kernels
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
    return kernels


@lru_cache(maxsize=512)
def _table_arrays(q: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`laplace_table` as int64 arrays (cumulative, frequencies)."""
    cums, freqs = laplace_table(q, K)
    return np.array(cums, dtype=np.int64), np.array(freqs, dtype=np.int64)


@lru_cache(maxsize=512)
def _bucket_lookup(q: int, K: int, bucket_bits: int) -> np.ndarray:
    """Per bucket of 2^(24 − bucket_bits) slots, the index of the symbol whose range holds the
    bucket's first slot (int32): where the decoder's symbol search starts."""
    cums, _ = _table_arrays(q, K)
    firsts = np.arange(1 << bucket_bits, dtype=np.int64) << (PROB_BITS - bucket_bits)
    return (np.searchsorted(cums, firsts, side="right") - 1).astype(np.int32)


def _symbol_indices(codes: Sequence[int] | torch.Tensor | np.ndarray, K: int) -> np.ndarray:
    """Table indices c + K of ``codes`` clamped to [−K, K] (int64)."""
    if isinstance(codes, torch.Tensor):
        c = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    else:
        try:
            c = np.asarray(codes, dtype=np.int64).reshape(-1)
        except OverflowError:  # Python integers beyond int64: clamp them first
            c = np.array([min(K, max(-K, int(v))) for v in codes], dtype=np.int64)
    idx: np.ndarray = np.clip(c, -K, K) + K
    return idx


class RansEncoder:
    """Collects symbols (with their table) in order; :meth:`finish` returns the rANS stream.

    ``push`` takes codes as a sequence of integers, a numpy array or a torch tensor (values outside
    [−K, K] are clamped). :meth:`finish` runs the compiled coder (:func:`kernels.rans_encode`);
    ``reference=True`` (or no numba) runs the pure-Python loop it is tested against -- the same bytes."""

    def __init__(self, *, reference: bool = False) -> None:
        self._reference = reference
        self._rows: list[tuple[np.ndarray, int, int]] = []

    def push(self, codes: Sequence[int] | torch.Tensor | np.ndarray, q: int, K: int) -> None:
        laplace_table(q, K)  # validates the alphabet now, as the symbols are pushed
        self._rows.append((_symbol_indices(codes, K), q, K))

    def finish(self) -> bytes:
        kernels = None if self._reference else _kernels()
        if kernels is None:
            return self._finish_reference()
        if not self._rows:
            return b""
        cum = np.concatenate([_table_arrays(q, K)[0][idx] for idx, q, K in self._rows])
        freq = np.concatenate([_table_arrays(q, K)[1][idx] for idx, q, K in self._rows])
        return bytes(kernels.rans_encode(cum, freq))

    def _finish_reference(self) -> bytes:
        syms: list[tuple[int, int]] = []
        for idx, q, K in self._rows:
            cums, freqs = laplace_table(q, K)
            syms.extend((cums[i], freqs[i]) for i in idx.tolist())
        if not syms:
            return b""
        x = _L
        out = bytearray()
        shift = PROB_BITS
        bound = (_L >> PROB_BITS) << 8
        for cum, freq in reversed(syms):
            x_max = bound * freq
            while x >= x_max:
                out.append(x & 0xFF)
                x >>= 8
            x = ((x // freq) << shift) + (x % freq) + cum
        for _ in range(5):
            out.append(x & 0xFF)
            x >>= 8
        out.reverse()
        return bytes(out)


class RansDecoder:
    """Decodes a :class:`RansEncoder` stream; rows must be read with the same (count, q, K) as pushed.

    :meth:`read_rows` decodes many rows in one compiled call (:func:`kernels.rans_decode`);
    ``reference=True`` (or no numba) decodes with the pure-Python loop -- the same codes."""

    def __init__(self, data: bytes, *, reference: bool = False) -> None:
        self._data = data
        self._reference = reference
        if not data:
            self._x, self._pos = _L, 0
            return
        if len(data) < 5:
            raise ValueError("entropy-coded stream too short")
        self._x = int.from_bytes(data[:5], "big")
        self._pos = 5

    def read(self, count: int, q: int, K: int) -> list[int]:
        """The next ``count`` codes of one row coded under (q, K)."""
        out: list[int] = self.read_rows([(count, q, K)]).tolist()
        return out

    def read_rows(self, rows: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """The codes of the next rows, given as (count, q, K), concatenated (int64). Raises ValueError
        when the stream ends early."""
        kernels = None if self._reference else _kernels()
        if kernels is None:
            return np.array([c for count, q, K in rows for c in self._read_reference(count, q, K)],
                            dtype=np.int64)
        models: dict[tuple[int, int], int] = {}
        for _, q, K in rows:
            if (q, K) not in models:
                laplace_table(q, K)  # validates the alphabet
                models[(q, K)] = len(models)
        tables = [_table_arrays(q, K) for q, K in models]
        size = np.array([len(c) for c, _ in tables], dtype=np.int64)
        start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
        ks = np.array([K for _, K in models], dtype=np.int64)
        cums = np.concatenate([c for c, _ in tables]) if tables else np.zeros(0, dtype=np.int64)
        freqs = np.concatenate([f for _, f in tables]) if tables else np.zeros(0, dtype=np.int64)
        counts = np.array([count for count, _, _ in rows], dtype=np.int64)
        model = np.array([models[(q, K)] for _, q, K in rows], dtype=np.int64)
        state = np.array([self._x, self._pos], dtype=np.int64)
        data = np.frombuffer(self._data, dtype=np.uint8) if self._data else np.zeros(0, dtype=np.uint8)
        bits = kernels.RANS_BUCKET_BITS
        lookup = (np.stack([_bucket_lookup(q, K, bits) for q, K in models]) if models
                  else np.zeros((1, 1 << bits), dtype=np.int32))
        codes: np.ndarray
        codes, complete = kernels.rans_decode(data, state, counts, model, start, size, ks, cums, freqs, lookup)
        self._x, self._pos = int(state[0]), int(state[1])
        if not complete:
            raise ValueError("entropy-coded stream ended early")
        return codes

    def _read_reference(self, count: int, q: int, K: int) -> list[int]:
        cums, freqs = laplace_table(q, K)
        mask = _M - 1
        x, pos, data = self._x, self._pos, self._data
        out = [0] * count
        for j in range(count):
            slot = x & mask
            i = bisect_right(cums, slot) - 1
            out[j] = i - K
            x = freqs[i] * (x >> PROB_BITS) + slot - cums[i]
            while x < _L:
                if pos >= len(data):
                    raise ValueError("entropy-coded stream ended early")
                x = (x << 8) | data[pos]
                pos += 1
        self._x, self._pos = x, pos
        return out

    def done(self) -> bool:
        """All bytes consumed and the state is back at its start (a well-formed, fully read stream)."""
        return self._pos == len(self._data) and (self._x == _L or not self._data)
