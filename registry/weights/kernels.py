"""Compiled CPU kernels (numba) for the hot loops torch and numpy cannot batch well on a CPU.

* :func:`rmm_positions` -- steps 1-3 of an RMM fit (:mod:`registry.weights.rmm`) for a range of
  positions: mean, Helmert-projected Gram, its eigendecomposition, directions U, coefficients C,
  and (optionally) the reconstruction residuals the member errors are computed from. torch solves a
  batch of tiny eigenproblems one LAPACK call at a time (≈3 µs per 7 × 7 matrix on this project's
  CPUs); here ``LANES`` positions are solved together by a cyclic Jacobi method whose inner loops run
  across the positions, so they compile to SIMD instructions (≈1 µs per matrix).
* :func:`magnitude_histogram` -- the one-pass TIES threshold of a chunk of a merge
  (:mod:`registry.weights.merge`).
* :func:`rans_encode` / :func:`rans_decode` -- the rANS entropy coder of :mod:`registry.weights.codec`
  (a few ns per code instead of ≈1 µs in Python): the integer arithmetic of its pure-Python
  reference coder, in int64, so the same bytes and the same codes.
* :func:`combine` -- one merged chunk of a TIES / DARE / task-arithmetic merge in one fused pass,
  DARE's counter-based random drop mask (:func:`dare_keep`) computed in the same loop.
* The packed-storage codec's per-element passes (:mod:`registry.weights.packing`): the transform of a
  segment against its reference (zigzagged difference, XOR or bit rotation), its reorder by the
  reference's exponent (a counting sort) and its split into byte planes in one pass, the inverse in
  one pass, and the 2-/4-bit symbol coder. numpy needed 6-10 passes and an index array of 8 bytes
  per element for the same work; the output is the same, byte for byte (``tests/weights/
  test_packing.py`` holds them to the numpy codec they replaced).

Determinism: every position is computed on its own -- a Jacobi rotation a position does not need
is an exact identity (cosine 1, sine 0, its off-diagonal left as is), so the result of a position
does not depend on which other positions share its block, on the block boundaries or on the number
of threads. Same inputs, same CPU: bit-identical outputs.

Compiled on first use and cached on disk (numba ``cache=True``: next to this file, or in numba's
user cache directory when that is read-only). CPU only; other devices use the torch code paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import numpy as np
from numba import njit

__all__ = ["DARE_BITS", "LANES", "SPLITMIX_GAMMA", "SPLITMIX_MUL1", "SPLITMIX_MUL2", "combine", "dare_keep",
           "join_planes", "key_counts", "magnitude_histogram", "pack_symbols", "place_escapes", "rans_decode",
           "rans_encode", "rmm_positions", "split_planes", "unpack_symbols"]

#: positions solved together (the SIMD width of the inner loops; 128 amortises the per-rotation
#: bookkeeping best on AVX2/AVX-512 CPUs)
LANES = 128
_JACOBI_TOL = 1e-15  # rotate (p, q) while |g_pq| > tol · sqrt(g_pp g_qq): U orthonormal to ≈ tol
_MAX_SWEEPS = 60
_TINY = float(np.finfo(np.float64).tiny)

F = TypeVar("F", bound=Callable[..., object])


def _compiled(fn: F) -> F:
    """numba ``njit`` with the options every kernel here uses (disk cache, GIL released, numpy's
    float semantics: division by zero gives inf/nan instead of raising). Without any writable
    cache directory (numba looks beside this file, then in the user's cache directory;
    ``NUMBA_CACHE_DIR`` sets one) the kernels are compiled in every process instead."""
    try:
        return cast(F, njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)(fn))
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return cast(F, njit(cache=False, nogil=True, error_model="numpy", boundscheck=False)(fn))


@_compiled
def _rotate(x: np.ndarray, i: int, j: int, c: np.ndarray, s: np.ndarray) -> None:
    """Rows i, j of ``x`` [·, lanes] <- (c x_i − s x_j, s x_i + c x_j), lane by lane. (Rows are
    addressed by index, not by views: a view costs two reference-count updates per call.)"""
    for lane in range(x.shape[1]):
        a = x[i, lane]
        b = x[j, lane]
        x[i, lane] = c[lane] * a - s[lane] * b
        x[j, lane] = s[lane] * a + c[lane] * b


@_compiled
def _angles(gpq: np.ndarray, gpp: np.ndarray, gqq: np.ndarray, c: np.ndarray, s: np.ndarray) -> int:
    """Jacobi rotation (c, s) zeroing g_pq in every lane; an exact identity where |g_pq| is already
    negligible. Updates the rows g_pp, g_qq, g_pq; returns the number of lanes rotated. (Separate
    row arguments let the loop compile to SIMD instructions.)"""
    count = 0  # an integer sum: a float one would keep the loop from vectorising
    for lane in range(gpq.shape[0]):
        apq = gpq[lane]
        app = gpp[lane]
        aqq = gqq[lane]
        skip = abs(apq) <= _JACOBI_TOL * np.sqrt(abs(app * aqq))
        theta = (aqq - app) / (1.0 if skip else 2.0 * apq)
        t = 1.0 / (abs(theta) + np.sqrt(theta * theta + 1.0))
        t = -t if theta < 0.0 else t
        t = 0.0 if skip else t
        cc = 1.0 / np.sqrt(t * t + 1.0)
        c[lane] = cc
        s[lane] = t * cc
        gpp[lane] = app - t * apq
        gqq[lane] = aqq + t * apq
        gpq[lane] = apq if skip else 0.0
        count += 0 if skip else 1
    return count


@_compiled
def _jacobi(g: np.ndarray, v: np.ndarray, m: int, ut: np.ndarray, c: np.ndarray, s: np.ndarray) -> None:
    """Diagonalise the symmetric m × m matrices of every lane in place: ``g[ut[i, j]]`` holds
    element (min(i, j), max(i, j)); ``v`` [m·m, lanes] receives the eigenvectors (columns of row-major
    m × m), eigenvalue i ends on ``g[ut[i, i]]``. Cyclic sweeps until a sweep rotates nothing."""
    v[:, :] = 0.0
    for i in range(m):
        v[i * m + i, :] = 1.0
    for _ in range(_MAX_SWEEPS):
        rotated = 0
        for p in range(m - 1):
            for q in range(p + 1, m):
                n_on = _angles(g[ut[p, q]], g[ut[p, p]], g[ut[q, q]], c, s)
                if n_on == 0:
                    continue  # identity in every lane
                rotated += n_on
                for r in range(m):
                    if r != p and r != q:
                        _rotate(g, ut[r, p], ut[r, q], c, s)
                for r in range(m):
                    _rotate(v, r * m + p, r * m + q, c, s)
        if rotated == 0:
            return


@_compiled
def _rmm_block(X: np.ndarray, Q: np.ndarray, k: int, rtol: float, mu_out: np.ndarray, U_out: np.ndarray,
               C_out: np.ndarray, E_out: np.ndarray, with_err: bool, lo: int, hi: int) -> int:
    P, r, n = X.shape
    L = LANES
    helmert = n - 1 <= r
    m = n - 1 if helmert else r
    ut = np.empty((m, m), dtype=np.int64)
    for i in range(m):
        for j in range(m):
            ut[i, j] = min(i, j) * m + max(i, j)
    x = np.empty((r * n, L))
    mu = np.empty((r, L))
    y = np.empty((r * m, L))  # Y = X Q (helmert) or X_c (r × n, m = r: y[t * n + i])
    if not helmert:
        y = np.empty((r * n, L))
    g = np.empty((m * m, L))
    v = np.empty((m * m, L))
    vs = np.empty((m * k, L))  # the k chosen eigenvectors, descending eigenvalue
    w = np.empty((r * k, L))
    sig = np.empty((k, L))
    cf = np.empty((k * n, L))
    c = np.empty(L)
    s = np.empty(L)
    order = np.empty(m, dtype=np.int64)
    ev = np.empty(m)
    c32 = np.zeros((k * n, L), dtype=np.float32)
    u32 = np.zeros((k, L), dtype=np.float32)
    m32 = np.zeros(L, dtype=np.float32)
    xh = np.empty(L, dtype=np.float32)
    nrm = np.empty(L)
    for base in range(lo, hi, L):
        # load (the tail block repeats its last position; duplicates are computed, not stored)
        full = base + L <= hi
        for t in range(r):
            for i in range(n):
                if full:
                    for lane in range(L):
                        x[t * n + i, lane] = X[base + lane, t, i]
                else:
                    for lane in range(L):
                        x[t * n + i, lane] = X[min(base + lane, hi - 1), t, i]
        for t in range(r):
            mu[t, :] = 0.0
            for i in range(n):
                for lane in range(L):
                    mu[t, lane] += x[t * n + i, lane]
            for lane in range(L):
                mu[t, lane] = mu[t, lane] / n
                if not np.isfinite(mu[t, lane]):
                    return 1 + min(base + lane, hi - 1)
        if helmert:
            for t in range(r):
                for a in range(m):
                    ya = t * m + a
                    y[ya, :] = 0.0
                    for i in range(n):
                        q = Q[i, a]
                        if q != 0.0:
                            for lane in range(L):
                                y[ya, lane] += x[t * n + i, lane] * q
            for a in range(m):
                for b in range(a, m):
                    gab = ut[a, b]
                    g[gab, :] = 0.0
                    for t in range(r):
                        for lane in range(L):
                            g[gab, lane] += y[t * m + a, lane] * y[t * m + b, lane]
        else:
            for t in range(r):
                for i in range(n):
                    for lane in range(L):
                        y[t * n + i, lane] = x[t * n + i, lane] - mu[t, lane]
            for a in range(m):
                for b in range(a, m):
                    gab = ut[a, b]
                    g[gab, :] = 0.0
                    for i in range(n):
                        for lane in range(L):
                            g[gab, lane] += y[a * n + i, lane] * y[b * n + i, lane]
        _jacobi(g, v, m, ut, c, s)
        # per lane: the k largest eigenvalues, descending (ties: lower index first)
        for lane in range(L):
            for i in range(m):
                ev[i] = g[ut[i, i], lane]
                order[i] = i
            for i in range(min(k, m)):
                best = i
                for j in range(i + 1, m):
                    if ev[order[j]] > ev[order[best]]:
                        best = j
                order[i], order[best] = order[best], order[i]
            top = ev[order[0]]
            for col in range(k):
                keep = (not helmert) or ev[order[col]] > rtol * top
                sig[col, lane] = 1.0 if keep else 0.0  # keep flag, replaced by σ below
                for a in range(m):
                    vs[a * k + col, lane] = v[a * m + order[col], lane]
        if helmert:
            # W = Y V_k (U Σ), σ = ‖W e_c‖, U = W / σ, C = Σ V_kᵀ Qᵀ
            for col in range(k):
                for t in range(r):
                    wt = t * k + col
                    w[wt, :] = 0.0
                    for a in range(m):
                        for lane in range(L):
                            w[wt, lane] += y[t * m + a, lane] * vs[a * k + col, lane]
                nrm[:] = 0.0
                for t in range(r):
                    for lane in range(L):
                        nrm[lane] += w[t * k + col, lane] * w[t * k + col, lane]
                for lane in range(L):
                    keep = sig[col, lane] != 0.0
                    sv = np.sqrt(nrm[lane])
                    sig[col, lane] = sv if keep else 0.0
                    nrm[lane] = 1.0 / max(sv, _TINY) if keep else 0.0
                for t in range(r):
                    for lane in range(L):
                        w[t * k + col, lane] = w[t * k + col, lane] * nrm[lane]
                for i in range(n):
                    ci = col * n + i
                    cf[ci, :] = 0.0
                    for a in range(m):
                        q = Q[i, a]
                        if q != 0.0:
                            for lane in range(L):
                                cf[ci, lane] += (vs[a * k + col, lane] * sig[col, lane]) * q
        else:
            # U = V_k, C = U_kᵀ X_c
            for col in range(k):
                for t in range(r):
                    w[t * k + col, :] = vs[t * k + col, :]
                for i in range(n):
                    ci = col * n + i
                    cf[ci, :] = 0.0
                    for t in range(r):
                        for lane in range(L):
                            cf[ci, lane] += w[t * k + col, lane] * y[t * n + i, lane]
        # store (rounded to the output dtype), lane-innermost (the A factor's positions are contiguous)
        nl = min(L, hi - base)
        for t in range(r):
            for lane in range(nl):
                mu_out[base + lane, t] = mu[t, lane]
            for col in range(k):
                for lane in range(nl):
                    U_out[base + lane, t, col] = w[t * k + col, lane]
        for col in range(k):
            for i in range(n):
                for lane in range(nl):
                    C_out[base + lane, col, i] = cf[col * n + i, lane]
        if with_err:  # residuals x − x̂ of the stored (rounded) values, x̂ in float32 as factors() does
            for col in range(k):
                for i in range(n):
                    for lane in range(nl):
                        c32[col * n + i, lane] = np.float32(C_out[base + lane, col, i])
            for t in range(r):
                for lane in range(nl):
                    m32[lane] = np.float32(mu_out[base + lane, t])
                for col in range(k):
                    for lane in range(nl):
                        u32[col, lane] = np.float32(U_out[base + lane, t, col])
                for i in range(n):
                    for lane in range(L):
                        xh[lane] = m32[lane]
                    for col in range(k):
                        for lane in range(L):
                            xh[lane] = xh[lane] + u32[col, lane] * c32[col * n + i, lane]
                    for lane in range(nl):
                        E_out[base + lane, t, i] = np.float32(x[t * n + i, lane]) - xh[lane]
    return 0


def rmm_positions(X: np.ndarray, Q: np.ndarray, k: int, rtol: float, mu: np.ndarray, U: np.ndarray,
                  C: np.ndarray, E: np.ndarray | None, lo: int, hi: int) -> int:
    """Steps 1-3 of the RMM method for positions ``[lo, hi)`` of ``X`` [P, r, n] (float32, any
    strides), written into ``mu`` [P, r], ``U`` [P, r, k], ``C`` [P, k, n] (float32 or float64; any
    strides) and, when ``E`` [P, r, n] (float32) is given, the residuals ``x − x̂`` of the stored
    values, x̂ = μ + Σ_c U[:, c] C[c, :] in float32 (what :meth:`ModuleBasis.factors` rebuilds).

    ``n − 1 ≤ r``: Y = X Q with ``Q`` [n, n − 1] the Helmert basis of 1^⊥, eigh of YᵀY = W Σ² Wᵀ,
    U = Y W_k Σ⁻¹ (columns with σ² ≤ rtol · σ²_max are zero), C = Σ W_kᵀ Qᵀ. Otherwise eigh of
    X_c X_cᵀ, U = its top-k eigenvectors, C = Uᵀ X_c. Everything in float64; μ is the float64 mean.
    Returns 0, or 1 + the first position whose mean is not finite (NaN/Inf in its factors)."""
    e = E if E is not None else np.empty((1, 1, 1), dtype=np.float32)
    return int(_rmm_block(X, Q, k, rtol, mu, U, C, e, E is not None, lo, hi))


# --------------------------------------------------------------------------------- merges
#
# One chunk of one tensor at a time: ``x`` [n, cnt] the n inputs (compute dtype), ``b`` [cnt] the
# base (``has_base=False``: a zero base, x already holds the task vectors). τ_i = x_i − b.


@_compiled
def _task_row(x: np.ndarray, b: np.ndarray, has_base: bool, i: int, tau: np.ndarray) -> None:
    if has_base:
        for j in range(tau.shape[0]):
            tau[j] = x[i, j] - b[j]
    else:
        for j in range(tau.shape[0]):
            tau[j] = x[i, j]


@_compiled
def _top_histogram32(x: np.ndarray, b: np.ndarray, has_base: bool, tau: np.ndarray, bits: np.ndarray,
                     hist: np.ndarray, dirty: np.ndarray) -> None:
    # literal masks and shifts: ≈1.4× faster than the same loop with run-time ones
    for i in range(x.shape[0]):
        _task_row(x, b, has_base, i, tau)
        for j in range(tau.shape[0]):
            mag = np.int64(bits[j]) & 0x7FFFFFFF
            d = mag >> 16
            hist[i, d] += 1
            if mag & 0xFFFF:
                dirty[i, d] += 1


@_compiled
def _top_histogram64(x: np.ndarray, b: np.ndarray, has_base: bool, tau: np.ndarray, bits: np.ndarray,
                     hist: np.ndarray, dirty: np.ndarray) -> None:
    for i in range(x.shape[0]):
        _task_row(x, b, has_base, i, tau)
        for j in range(tau.shape[0]):
            mag = bits[j] & 0x7FFFFFFFFFFFFFFF
            d = mag >> 48
            hist[i, d] += 1
            if mag & 0xFFFFFFFFFFFF:
                dirty[i, d] += 1


@_compiled
def _prefix_histogram(x: np.ndarray, b: np.ndarray, has_base: bool, tau: np.ndarray, bits: np.ndarray,
                      mask: int, shift: int, prefix_shift: int, prefix: np.ndarray, hist: np.ndarray) -> None:
    for i in range(x.shape[0]):
        _task_row(x, b, has_base, i, tau)
        want = prefix[i]
        for j in range(tau.shape[0]):
            mag = np.int64(bits[j]) & mask
            if (mag >> prefix_shift) == want:
                hist[i, (mag >> shift) & 0xFFFF] += 1


def magnitude_histogram(x: np.ndarray, b: np.ndarray | None, shift: int, prefix_shift: int,
                        prefix: np.ndarray, hist: np.ndarray, dirty: np.ndarray) -> None:
    """Add to ``hist[i, d]`` the number of elements of input i whose magnitude bits |τ_i| have the
    16-bit digit ``d`` at ``shift``, among those whose bits above ``prefix_shift`` equal
    ``prefix[i]`` (``prefix_shift`` = the bit width: no condition, the top digit, and then also
    ``dirty[i, d]`` += the elements of that digit with a non-zero bit below ``shift``). ``x`` [n, cnt]
    float32/float64 C-contiguous; ``b`` [cnt] or None (zero base)."""
    tau = np.empty(x.shape[1], dtype=x.dtype)
    width = 8 * x.dtype.itemsize
    bits = tau.view(np.int32 if width == 32 else np.int64)
    mask = (1 << (width - 1)) - 1  # clears the sign bit: the bits of |τ|
    base = x[0] if b is None else b
    if prefix_shift >= width:
        assert shift == width - 16
        top = _top_histogram32 if width == 32 else _top_histogram64
        top(x, base, b is not None, tau, bits, hist, dirty)
    else:
        _prefix_histogram(x, base, b is not None, tau, bits, mask, shift, prefix_shift, prefix, hist)


@_compiled
def _sum_sq(t: np.ndarray, part: np.ndarray) -> float:
    """Σ t² in float64 with 8 interleaved partial sums (a fixed order: the same bits on every CPU,
    and a shape the compiler turns into SIMD instructions)."""
    cnt = t.shape[0]
    part[:] = 0.0
    full = cnt - cnt % 8
    for j in range(0, full, 8):
        for u in range(8):
            v = np.float64(t[j + u])
            part[u] += v * v
    total = 0.0
    for u in range(8):
        total += part[u]
    for j in range(full, cnt):
        v = np.float64(t[j])
        total += v * v
    return total


@_compiled
def _trim(t: np.ndarray, thr: float, need: np.ndarray, i: int, zero: float) -> None:
    """Magnitude trim of one row in place: keep |τ| > T and the first need[i] elements equal to T."""
    if need[i] == 0:
        for j in range(t.shape[0]):
            t[j] = t[j] if abs(t[j]) > thr else t[j] * zero  # PEFT's τ · mask: a signed zero
        return
    for j in range(t.shape[0]):
        mag = abs(t[j])
        if mag > thr:
            continue
        if mag == thr and need[i] > 0:
            need[i] -= 1
            continue
        t[j] = t[j] * zero


# --------------------------------------------------------------------------------- DARE masks
#
# Input i of tensor ``name`` keeps flat element j iff u_j / 2^53 < density, u_j = the top 53 bits of
# the (j + 1)-th output of SplitMix64 seeded with the input's 64-bit key (``merge.tensor_seed``):
# z = key + (j + 1)·γ (mod 2^64), then the SplitMix64 finaliser. Counter-based: any element's draw is
# computed from (key, j) alone, so chunks, their order, threads and devices never change a mask.
# ``merge.dare_mask`` is the public entry point; its torch-ops twin (other devices) is tested equal.

#: SplitMix64 constants (Steele, Lea & Flood 2014; Vigna's reference ``splitmix64.c``)
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB
#: bits of each output compared with the density: keep iff (z >> 11) < ceil(density · 2^53)
DARE_BITS = 53

_GAMMA = np.uint64(SPLITMIX_GAMMA)
_MUL1 = np.uint64(SPLITMIX_MUL1)
_MUL2 = np.uint64(SPLITMIX_MUL2)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SHIFT = np.uint64(64 - DARE_BITS)


@_compiled
def _splitmix(key: np.uint64, j: int) -> np.uint64:
    """The (j + 1)-th SplitMix64 output of seed ``key`` (uint64 throughout: wraps mod 2^64)."""
    z = key + np.uint64(j + 1) * _GAMMA
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@_compiled
def _dare_row(t: np.ndarray, key: np.uint64, first: int, below: np.uint64, density: float, zero: float) -> None:
    """τ ← (τ · m) / density in place (PEFT's ``random_pruning``: a dropped entry is τ · 0, a signed
    zero), m_j = 1 iff the draw of element ``first + j`` is below ``below``."""
    for j in range(t.shape[0]):
        v = t[j] if (_splitmix(key, first + j) >> _SHIFT) < below else t[j] * zero
        t[j] = v / density


@_compiled
def _dare_keep(key: np.uint64, first: int, below: np.uint64, out: np.ndarray) -> None:
    for j in range(out.shape[0]):
        out[j] = (_splitmix(key, first + j) >> _SHIFT) < below


def dare_keep(key: int, first: int, count: int, below: int) -> np.ndarray:
    """DARE keep flags (bool [count]) of flat elements ``[first, first + count)`` for the 64-bit
    ``key``: element j is kept iff ``(splitmix64_{j+1}(key) >> 11) < below`` (``below`` =
    ``ceil(density · 2^53)``)."""
    out = np.empty(count, dtype=np.bool_)
    _dare_keep(np.uint64(key), first, np.uint64(below), out)
    return out


@_compiled
def _combine(x: np.ndarray, b: np.ndarray, has_base: bool, w: np.ndarray, trim: bool, thr: np.ndarray,
             need: np.ndarray, elect: bool, frequency: bool, tau: np.ndarray, acc: np.ndarray,
             count: np.ndarray, out: np.ndarray, sq: np.ndarray, consts: np.ndarray, part: np.ndarray,
             dare: bool, keys: np.ndarray, first: int, below: np.ndarray) -> int:
    n, cnt = x.shape
    zero, one, minus = consts[0], consts[1], consts[2]  # in the compute dtype: no float64 promotion
    density = consts[3]
    if has_base:
        sq[n] += _sum_sq(b, part)
        if not np.isfinite(sq[n]):
            for j in range(cnt):
                if not np.isfinite(b[j]):
                    return int(n + 1)
    for i in range(n):
        row = tau[i]
        _task_row(x, b, has_base, i, row)
        sq[i] += _sum_sq(row, part)
        if not np.isfinite(sq[i]):
            for j in range(cnt):
                if not np.isfinite(row[j]):
                    return i + 1
        if trim:
            _trim(row, thr[i], need, i, zero)
        elif dare:
            _dare_row(row, keys[i], first, below[0], density, zero)
    for j in range(cnt):
        out[j] = zero
    if not elect:  # Σ_i w_i τ_i, summed from +0 in input order (torch's sum over a stack of ≤ 4)
        for i in range(n):
            wi = w[i]
            for j in range(cnt):
                out[j] = out[j] + tau[i, j] * wi
        return 0
    for j in range(cnt):  # elected sign γ = sgn(Σ τ_i) or sgn(Σ sgn τ_i), +1 on ties
        acc[j] = zero
        count[j] = zero
    for i in range(n):
        if frequency:
            for j in range(cnt):
                v = tau[i, j]
                acc[j] = acc[j] + (one if v > 0 else (minus if v < 0 else zero))
        else:
            for j in range(cnt):
                acc[j] = acc[j] + tau[i, j]
    for i in range(n):  # disjoint mean: Σ_{sgn τ_i = γ} w_i τ_i / max(1, #{i: sgn τ_i = γ})
        wi = w[i]
        for j in range(cnt):
            v = tau[i, j]
            agree = (v > 0) if acc[j] >= 0 else (v < 0)
            out[j] = out[j] + (v * wi) * (one if agree else zero)
            count[j] = count[j] + (one if agree else zero)
    for j in range(cnt):
        out[j] = out[j] / max(count[j], one)
    return 0


def combine(x: np.ndarray, b: np.ndarray | None, w: np.ndarray, thr: np.ndarray | None, need: np.ndarray,
            elect: bool, frequency: bool, out: np.ndarray, sq: np.ndarray, *, keys: np.ndarray | None = None,
            first: int = 0, below: int = 0, density: float = 1.0) -> int:
    """One merged chunk ``out`` [cnt] = τ_m of ``x`` [n, cnt] (minus ``b`` [cnt], None: zero base),
    in the compute dtype of ``x``, with the operations and rounding of PEFT's ``merge_utils`` (the
    sums run from +0 in input order, as torch sums a stack of up to 4 rows): magnitude trim when
    ``thr`` (per input T_i; ties at T_i kept while ``need[i]`` > 0, decremented); DARE's drop and
    rescale when ``keys`` (per input its SplitMix64 key, :func:`dare_keep` with ``first`` = the flat
    index of the chunk's first element and ``below``: τ_i ← (τ_i · m_i) / density, PEFT's
    ``random_pruning`` with ``m_i`` for the Bernoulli draw); the elected sign and disjoint mean when
    ``elect`` (``frequency``: vote by signs), else Σ_i w_i τ_i. Adds Σ τ_i² (before any trim) to
    ``sq[i]`` and Σ b² to ``sq[n]`` (float64). Returns 0, or 1 + the input whose τ is not finite
    (n + 1: the base)."""
    tau = np.empty(x.shape, dtype=x.dtype)
    acc = np.empty(x.shape[1], dtype=x.dtype)
    count = np.empty(x.shape[1], dtype=x.dtype)
    trim = thr is not None
    t = thr if thr is not None else w
    consts = np.array([0.0, 1.0, -1.0, density], dtype=x.dtype)
    dare = keys is not None
    k = keys if keys is not None else np.zeros(1, dtype=np.uint64)
    return int(_combine(x, x[0] if b is None else b, b is not None, w, trim, t, need, elect, frequency, tau,
                        acc, count, out, sq, consts, np.empty(8), dare, k, first,
                        np.array([below], dtype=np.uint64)))


# --------------------------------------------------------------------------------- rANS
#
# The coder of :mod:`registry.weights.codec` (state in [2^31, 2^39), 24-bit probabilities, bytes out
# in reverse), in int64: the state stays below 2^39 and a product freq · (x >> 24) below 2^39.

_RANS_PROB_BITS = 24
_RANS_L = 1 << 31
_RANS_BOUND = (_RANS_L >> _RANS_PROB_BITS) << 8


@_compiled
def _rans_encode(cum: np.ndarray, freq: np.ndarray, out: np.ndarray) -> int:
    """Encode the symbols (cum[j], freq[j]) last to first; bytes go to ``out`` in reverse stream order
    (at most 4 per symbol + 5). Returns the number written."""
    x = np.int64(_RANS_L)
    pos = 0
    for j in range(cum.shape[0] - 1, -1, -1):
        f = freq[j]
        x_max = np.int64(_RANS_BOUND) * f
        while x >= x_max:
            out[pos] = np.uint8(x & 0xFF)
            pos += 1
            x >>= 8
        x = ((x // f) << _RANS_PROB_BITS) + (x % f) + cum[j]
    for _ in range(5):
        out[pos] = np.uint8(x & 0xFF)
        pos += 1
        x >>= 8
    return pos


def rans_encode(cum: np.ndarray, freq: np.ndarray) -> bytes:
    """The rANS stream of symbols given by their cumulative counts ``cum`` and frequencies ``freq``
    (int64, in push order; frequencies ≥ 1 of a 2^24 total); b"" for no symbols."""
    n = cum.shape[0]
    if n == 0:
        return b""
    out = np.empty(4 * n + 5, dtype=np.uint8)
    used = int(_rans_encode(np.ascontiguousarray(cum, dtype=np.int64), np.ascontiguousarray(freq, dtype=np.int64),
                            out))
    return out[:used][::-1].tobytes()


#: slots of a bucket of the decoder's symbol lookup (2^12 buckets of a 2^24 total)
RANS_BUCKET_BITS = 12


@_compiled
def _rans_decode(data: np.ndarray, state: np.ndarray, counts: np.ndarray, model: np.ndarray,
                 start: np.ndarray, size: np.ndarray, ks: np.ndarray, cums: np.ndarray, freqs: np.ndarray,
                 lookup: np.ndarray, out: np.ndarray) -> int:
    """Decode ``counts[r]`` codes of each row r under model ``model[r]`` (its table: ``size`` symbols
    from ``start`` in ``cums`` / ``freqs``, codes −K … K with K = ``ks``; ``lookup[m, b]`` the symbol
    holding the first slot of bucket b) into ``out``, from the state (x, pos) = ``state``, which is
    updated. Returns the number of codes decoded: fewer than asked when the stream ended early."""
    x = state[0]
    pos = state[1]
    n_bytes = data.shape[0]
    mask = np.int64((1 << _RANS_PROB_BITS) - 1)
    last = lookup.shape[1] - 1
    o = 0
    for r in range(counts.shape[0]):
        mi = model[r]
        base = start[mi]
        n = size[mi]
        k = ks[mi]
        for _ in range(counts[r]):
            slot = x & mask
            b = slot >> (_RANS_PROB_BITS - RANS_BUCKET_BITS)
            lo = np.int64(lookup[mi, b])  # the symbol is the last one with cum ≤ slot, in [lo, hi)
            hi = np.int64(lookup[mi, b + 1]) + 1 if b < last else n
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                if cums[base + mid] <= slot:
                    lo = mid
                else:
                    hi = mid
            out[o] = lo - k
            x = freqs[base + lo] * (x >> _RANS_PROB_BITS) + slot - cums[base + lo]
            while x < _RANS_L:
                if pos >= n_bytes:
                    state[0] = x
                    state[1] = pos
                    return o
                x = (x << 8) | np.int64(data[pos])
                pos += 1
            o += 1
    state[0] = x
    state[1] = pos
    return o


def rans_decode(data: np.ndarray, state: np.ndarray, counts: np.ndarray, model: np.ndarray, start: np.ndarray,
                size: np.ndarray, ks: np.ndarray, cums: np.ndarray, freqs: np.ndarray, lookup: np.ndarray
                ) -> tuple[np.ndarray, bool]:
    """All rows of a stream in one call: ``counts[r]`` codes of row r (int64 ``counts``, ``model``) under
    the table ``model[r]`` of the concatenated tables (``start``, ``size``, ``ks`` per table; ``cums``,
    ``freqs`` int64; ``lookup`` [tables, 2^RANS_BUCKET_BITS] int32: per bucket of slots the index of
    the symbol whose range holds the bucket's first slot), from ``data`` (uint8) at the state
    ``state`` = [x, pos] (int64, updated). Returns (the codes, int64, rows concatenated; whether the
    stream held them all)."""
    out = np.empty(int(counts.sum()), dtype=np.int64)
    done = int(_rans_decode(data, state, counts, model, start, size, ks, cums, freqs, lookup, out))
    return out, done == out.shape[0]


# --------------------------------------------------------------------------------- packed storage
#
# The per-element passes of :mod:`registry.weights.packing`, one pass per frame each way. Elements
# are the segment's little-endian unsigned integers (uint8/16/32/64, any strides), computed in
# uint64 and masked to their width ``mask`` (2^bits − 1). ``method`` is the payload's: 1 byte
# planes (rotated left by ``rot``), 2 XOR with the reference (then rotated), 3 the zigzagged
# difference from the reference. ``keyed``: the elements go in the stable order of the reference's
# key ``(r >> shift) & kmask`` -- a counting sort: ``start[v]`` is where key v's run begins (the
# array is advanced while the pass runs), so no index array is ever built.

_PLANES, _XOR, _SUB = 1, 2, 3


def _compiled_inline(fn: F) -> F:
    """:func:`_compiled` for a helper that numba inlines into its callers (a loop-invariant branch
    in it is then hoisted out of the caller's loop)."""
    try:
        return cast(F, njit(cache=True, nogil=True, error_model="numpy", boundscheck=False, inline="always")(fn))
    except RuntimeError:
        return cast(F, njit(cache=False, nogil=True, error_model="numpy", boundscheck=False, inline="always")(fn))


@_compiled_inline
def _forward(v: np.uint64, rr: np.uint64, method: int, rot: np.uint64, back: np.uint64, top: np.uint64,
             mask: np.uint64) -> np.uint64:
    one = np.uint64(1)
    if method == _SUB:
        d = (v - rr) & mask
        return ((d << one) & mask) ^ (mask * ((d >> top) & one))
    if method == _XOR:
        v = v ^ rr
    if rot != 0:
        v = ((v << rot) | (v >> back)) & mask
    return v


@_compiled_inline
def _inverse(z: np.uint64, rr: np.uint64, method: int, rot: np.uint64, back: np.uint64,
             mask: np.uint64) -> np.uint64:
    one = np.uint64(1)
    if method == _SUB:
        return (((z >> one) ^ (mask * (z & one))) + rr) & mask
    if rot != 0:
        z = ((z >> rot) | (z << back)) & mask
    if method == _XOR:
        z = z ^ rr
    return z


@_compiled_inline
def _split_w(a: np.ndarray, r: np.ndarray, method: int, rot: np.uint64, back: np.uint64, top: np.uint64,
             mask: np.uint64, keyed: bool, shift: np.uint64, kmask: np.uint64, start: np.ndarray,
             grid: np.ndarray, w: int) -> None:
    has_ref = method != _PLANES
    zero = np.uint64(0)
    byte = np.uint64(0xFF)
    for i in range(a.shape[0]):
        rr = np.uint64(r[i]) if has_ref else zero
        z = _forward(np.uint64(a[i]), rr, method, rot, back, top, mask)
        p = i
        if keyed:
            k = (rr >> shift) & kmask
            p = start[k]
            start[k] = p + 1
        # one literal width per branch (w is the same for every element): the stores unroll
        if w == 2:
            grid[0, p] = np.uint8(z & byte)
            grid[1, p] = np.uint8(z >> np.uint64(8))
        elif w == 4:
            grid[0, p] = np.uint8(z & byte)
            grid[1, p] = np.uint8((z >> np.uint64(8)) & byte)
            grid[2, p] = np.uint8((z >> np.uint64(16)) & byte)
            grid[3, p] = np.uint8(z >> np.uint64(24))
        elif w == 1:
            grid[0, p] = np.uint8(z)
        else:
            for j in range(w):
                grid[j, p] = np.uint8((z >> np.uint64(8 * j)) & byte)


@_compiled
def _split(a: np.ndarray, r: np.ndarray, method: int, rot: np.uint64, back: np.uint64, top: np.uint64,
           mask: np.uint64, keyed: bool, shift: np.uint64, kmask: np.uint64, start: np.ndarray,
           grid: np.ndarray) -> None:
    # the width and the ordering as constants of each call below: every loop is compiled for its
    # own case (the stores of a known width unroll; the method's branch is cheap, well predicted)
    w = grid.shape[0]
    for ww in (1, 2, 4, 8):
        if w == ww:
            if keyed:
                _split_w(a, r, method, rot, back, top, mask, True, shift, kmask, start, grid, ww)
            else:
                _split_w(a, r, method, rot, back, top, mask, False, shift, kmask, start, grid, ww)


@_compiled_inline
def _join_w(x: np.ndarray, r: np.ndarray, method: int, rot: np.uint64, back: np.uint64, mask: np.uint64,
            keyed: bool, shift: np.uint64, kmask: np.uint64, start: np.ndarray, out: np.ndarray, w: int) -> None:
    has_ref = method != _PLANES
    zero = np.uint64(0)
    for i in range(out.shape[0]):
        rr = np.uint64(r[i]) if has_ref else zero
        p = i
        if keyed:
            k = (rr >> shift) & kmask
            p = start[k]
            start[k] = p + 1
        if w == 2:
            z = np.uint64(x[0, p]) | (np.uint64(x[1, p]) << np.uint64(8))
        elif w == 4:
            z = (np.uint64(x[0, p]) | (np.uint64(x[1, p]) << np.uint64(8)) | (np.uint64(x[2, p]) << np.uint64(16))
                 | (np.uint64(x[3, p]) << np.uint64(24)))
        elif w == 1:
            z = np.uint64(x[0, p])
        else:
            z = zero
            for j in range(w):
                z |= np.uint64(x[j, p]) << np.uint64(8 * j)
        out[i] = _inverse(z, rr, method, rot, back, mask)


@_compiled
def _join(x: np.ndarray, r: np.ndarray, method: int, rot: np.uint64, back: np.uint64, mask: np.uint64,
          keyed: bool, shift: np.uint64, kmask: np.uint64, start: np.ndarray, out: np.ndarray) -> None:
    """``x`` [width, n]: the byte planes; every case compiled on its own, as in :func:`_split`."""
    w = x.shape[0]
    for ww in (1, 2, 4, 8):
        if w == ww:
            if keyed:
                _join_w(x, r, method, rot, back, mask, True, shift, kmask, start, out, ww)
            else:
                _join_w(x, r, method, rot, back, mask, False, shift, kmask, start, out, ww)


@_compiled
def _key_counts(r: np.ndarray, shift: np.uint64, kmask: np.uint64, counts: np.ndarray) -> None:
    # four partial histograms: consecutive equal keys do not wait on each other's increments
    part = np.zeros((4, counts.shape[0]), dtype=np.int64)
    n = r.shape[0]
    full = n - n % 4
    for i in range(0, full, 4):
        part[0, (np.uint64(r[i]) >> shift) & kmask] += 1
        part[1, (np.uint64(r[i + 1]) >> shift) & kmask] += 1
        part[2, (np.uint64(r[i + 2]) >> shift) & kmask] += 1
        part[3, (np.uint64(r[i + 3]) >> shift) & kmask] += 1
    for i in range(full, n):
        part[0, (np.uint64(r[i]) >> shift) & kmask] += 1
    for v in range(counts.shape[0]):
        counts[v] += part[0, v] + part[1, v] + part[2, v] + part[3, v]


def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only view of an input array: inputs arrive both ways, and each way is a compiled
    variant of its own (compiling every kernel takes seconds on first use)."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _params(width: int, rot: int) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    bits = 8 * width
    return np.uint64(rot), np.uint64((bits - rot) % bits), np.uint64(bits - 1), np.uint64((1 << bits) - 1)


def _starts(counts: np.ndarray | None) -> tuple[bool, np.ndarray]:
    if counts is None:
        return False, np.zeros(1, dtype=np.int64)
    start = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=start[1:])
    return True, start


def split_planes(a: np.ndarray, r: np.ndarray | None, method: int, rot: int, shift: int, kbits: int,
                 counts: np.ndarray | None, grid: np.ndarray) -> None:
    """The byte planes of the transformed elements of ``a`` into ``grid`` [width, len(a)] (uint8):
    ``grid[j, p]`` = byte j of element p, the elements transformed by ``method`` against the
    reference ``r`` (None for method 1) and, when ``counts`` (the number of elements per key value,
    :func:`key_counts`) is given, put in the stable order of the reference's ``kbits``-bit key at
    ``shift``."""
    w = a.dtype.itemsize
    rot_, back, top, mask = _params(w, rot)
    keyed, start = _starts(counts)
    a = _ro(a)
    _split(a, a if r is None else _ro(r), method, rot_, back, top, mask, keyed, np.uint64(shift),
           np.uint64((1 << kbits) - 1), start, grid)


def join_planes(x: np.ndarray, r: np.ndarray | None, method: int, rot: int, shift: int, kbits: int,
                counts: np.ndarray | None, out: np.ndarray) -> None:
    """The inverse of :func:`split_planes`: ``out`` (the elements) from ``x`` [width, len(out)], the
    byte planes of the transformed elements (in the reference's key order when ``counts`` is
    given)."""
    w = out.dtype.itemsize
    rot_, back, _, mask = _params(w, rot)
    keyed, start = _starts(counts)
    _join(x, _ro(out) if r is None else _ro(r), method, rot_, back, mask, keyed, np.uint64(shift),
          np.uint64((1 << kbits) - 1), start, out)


def key_counts(r: np.ndarray, shift: int, kbits: int) -> np.ndarray:
    """The number of elements of ``r`` per value of the key ``(r >> shift) & (2^kbits − 1)`` (int64)."""
    counts = np.zeros(1 << kbits, dtype=np.int64)
    _key_counts(_ro(r), np.uint64(shift), np.uint64((1 << kbits) - 1), counts)
    return counts


@_compiled
def _pack(s: np.ndarray, lut: np.ndarray, bits: int, esc: int, packed: np.ndarray, escapes: np.ndarray) -> int:
    per = 8 // bits
    n = s.shape[0]
    e = 0
    for g in range(packed.shape[0]):
        acc = 0
        for u in range(per):
            i = g * per + u
            if i < n:
                v = s[i]
                c = int(lut[v])
                if c == esc:
                    escapes[e] = v
                    e += 1
                acc |= c << (bits * u)
        packed[g] = np.uint8(acc)
    return e


@_compiled
def _byte_tables(values: np.ndarray, bits: int, first_escape: int) -> tuple[np.ndarray, np.ndarray]:
    """For every packed byte: the values of its codes, and how many of them are escapes."""
    per = 8 // bits
    cmask = (1 << bits) - 1
    table = np.empty((256, per), dtype=np.uint8)
    nesc = np.zeros(256, dtype=np.int64)
    for b in range(256):
        for u in range(per):
            c = (b >> (bits * u)) & cmask
            table[b, u] = values[c]
            if c >= first_escape:
                nesc[b] += 1
    return table, nesc


@_compiled
def _unpack(packed: np.ndarray, values: np.ndarray, bits: int, first_escape: int, dst: np.ndarray) -> int:
    per = 8 // bits
    cmask = (1 << bits) - 1
    table, nesc = _byte_tables(values, bits, first_escape)
    n = dst.shape[0]
    full = n // per
    count = 0
    if per == 2:
        for g in range(full):
            b = packed[g]
            dst[2 * g] = table[b, 0]
            dst[2 * g + 1] = table[b, 1]
            count += nesc[b]
    else:
        for g in range(full):
            b = packed[g]
            dst[4 * g] = table[b, 0]
            dst[4 * g + 1] = table[b, 1]
            dst[4 * g + 2] = table[b, 2]
            dst[4 * g + 3] = table[b, 3]
            count += nesc[b]
    for i in range(full * per, n):  # the last, partial group (its padding codes are not counted)
        c = (np.int64(packed[i // per]) >> (bits * (i % per))) & cmask
        dst[i] = values[c]
        if c >= first_escape:
            count += 1
    return count


@_compiled
def _place_escapes(packed: np.ndarray, bits: int, first_escape: int, escapes: np.ndarray, dst: np.ndarray) -> None:
    per = 8 // bits
    cmask = (1 << bits) - 1
    _, nesc = _byte_tables(np.zeros(16, dtype=np.uint8), bits, first_escape)
    n = dst.shape[0]
    e = 0
    for g in range(packed.shape[0]):
        b = np.int64(packed[g])
        if nesc[b] == 0:
            continue
        for u in range(per):
            i = g * per + u
            if i < n and ((b >> (bits * u)) & cmask) >= first_escape:
                dst[i] = escapes[e]
                e += 1


def pack_symbols(s: np.ndarray, lut: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes ``s`` as codes ``lut[s]`` of ``bits`` (2 or 4) bits, ``8 // bits`` to a byte (code u of a
    group in bits ``[bits*u, bits*(u+1))``, the last group padded with code 0), and the escapes: the
    values whose code is the largest, ``2^bits − 1``, in order."""
    per = 8 // bits
    packed = np.empty(-(-len(s) // per), dtype=np.uint8)
    escapes = np.empty(len(s), dtype=np.uint8)
    e = _pack(_ro(s), _ro(lut), bits, (1 << bits) - 1, packed, escapes)
    return packed, escapes[:e]


def unpack_symbols(packed: np.ndarray, values: np.ndarray, bits: int, first_escape: int, dst: np.ndarray) -> int:
    """The inverse of :func:`pack_symbols` into ``dst`` (its length is the number of codes; any
    strides): ``dst[i] = values[code i]``. Returns the number of codes at or above ``first_escape``
    (those :func:`place_escapes` then overwrites)."""
    return int(_unpack(_ro(packed), _ro(values), bits, first_escape, dst))


def place_escapes(packed: np.ndarray, bits: int, first_escape: int, escapes: np.ndarray, dst: np.ndarray) -> None:
    """``dst[i]`` = the next of ``escapes`` wherever code i is at or above ``first_escape``."""
    _place_escapes(_ro(packed), bits, first_escape, _ro(escapes), dst)
