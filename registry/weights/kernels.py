"""Compiled CPU kernels (numba) for the two hot loops torch cannot batch well on a CPU.

* :func:`rmm_positions` -- steps 1-3 of an RMM fit (:mod:`registry.weights.rmm`) for a range of
  positions: mean, Helmert-projected Gram, its eigendecomposition, directions U, coefficients C,
  and (optionally) the reconstruction residuals the member errors are computed from. torch solves a
  batch of tiny eigenproblems one LAPACK call at a time (≈3 µs per 7 × 7 matrix on this project's
  CPUs); here ``LANES`` positions are solved together by a cyclic Jacobi method whose inner loops run
  across the positions, so they compile to SIMD instructions (≈1 µs per matrix).

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

__all__ = ["LANES", "rmm_positions"]

#: positions solved together (the SIMD width of the inner loops; 128 amortises the per-rotation
#: bookkeeping best on AVX2/AVX-512 CPUs)
LANES = 128
_JACOBI_TOL = 1e-12  # rotate (p, q) while |g_pq| > tol · sqrt(g_pp g_qq): eigenvalues to ≈ tol² relative
_MAX_SWEEPS = 60
_TINY = float(np.finfo(np.float64).tiny)

F = TypeVar("F", bound=Callable[..., object])


def _compiled(fn: F) -> F:
    """numba ``njit`` with the options every kernel here uses (disk cache, GIL released, numpy's
    float semantics: division by zero gives inf/nan instead of raising)."""
    return cast(F, njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)(fn))


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
