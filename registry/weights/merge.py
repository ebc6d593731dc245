"""Classic merges: task arithmetic, TIES, DARE -- per tensor, streamed, and for LoRA.

Task vectors ``τ_i = θ_i − θ_base`` (for LoRA adapters ``τ_i = ΔW_i = B_i A_i``). Every method is
one :class:`MergeMethod`: a name, the parameters it declares (validated in one place,
:meth:`MergeMethod.resolve`) and two switches -- how each τ_i is trimmed, and whether signs are
elected. The merged model is ``θ = θ_base + λ · τ_m`` with, per tensor (weights ``w_i``):

* ``task_arithmetic``: ``τ_m = Σ_i w_i τ_i``;
* ``ties`` (variant ``ties/per-tensor``): ``τ̂_i`` = τ_i with all but its top-k magnitudes zeroed,
  ``k = int(density · numel)`` counted **per tensor** (as PEFT and mergekit do; the TIES paper
  trims over the whole flattened task vector, which is not implemented); elected sign
  ``γ = sgn(Σ_i τ̂_i)`` (``majority_sign="total"``) or ``sgn(Σ_i sgn τ̂_i)`` (``"frequency"``),
  ``γ = +1`` on ties; disjoint mean ``τ_m = Σ_{i: sgn τ̂_i = γ} w_i τ̂_i / max(1, #{i: sgn τ̂_i = γ})``
  (zeros never count; the vote is unweighted, weights apply afterwards -- PEFT's semantics);
* ``dare_linear``: ``τ̃_i = m_i ⊙ τ_i / density`` with ``m_i ~ Bernoulli(density)`` (drop rate
  ``p = 1 − density``, rescaled as in PEFT ≥ 0.19; the mask from :func:`dare_mask`),
  ``τ_m = Σ_i w_i τ̃_i``;
* ``dare_ties``: the DARE-rescaled ``τ̃_i`` through TIES's sign election and disjoint mean.

Bit-for-bit these are PEFT's ``peft.utils.merge_utils`` functions (same operations in the same
order; tested), with two documented differences: the top-k set is found by an exact radix select
on the magnitudes' bit patterns (ties at the threshold kept in flat-index order -- PEFT's
``torch.topk`` leaves that order unspecified), and DARE's masks are not ``torch.bernoulli`` draws
from the global RNG but counter-based (:func:`dare_mask`, variant suffix ``mask-splitmix64``):
element j of input i of tensor ``name`` is kept iff the top 53 bits of the (j + 1)-th SplitMix64
output seeded with :func:`tensor_seed` ``(seed, name, i)``, over 2^53, are below ``density``. A
mask so depends only on (seed, tensor name, input, element): not on the order tensors are
processed in, the chunking, the threads or the device; it is computed inside the compiled merge
pass on the CPU and by the same hash in torch ops elsewhere (tested equal). PEFT's
``dare_linear`` / ``dare_ties`` given these masks for their Bernoulli draws give the same bytes
(tested). (Until this rule, masks were ``torch.bernoulli`` draws from a ``torch.Generator`` seeded
with :func:`tensor_seed`: the same seed now gives a different merge.)

Streaming: everything after the top-k threshold is elementwise per position, so each tensor is
processed in flat chunks of ``_CHUNK`` elements (the n task-vector chunks stacked ``[n, chunk]``);
TIES first finds each input's exact threshold with a 16-bit radix histogram over the same chunks.
Memory per tensor is a few ``n × chunk`` buffers whatever its size; chunking never changes a bit.

On the CPU with up to 4 inputs the chunks go through compiled kernels (:mod:`.kernels`): one fused
pass per chunk (trim, sign election, disjoint mean, the same float operations in the same order as
the torch ops, so the same bits), and a threshold that usually needs a single histogram pass
(:func:`_kernel_thresholds`: the top 16 bits plus a per-digit count of elements with lower bits set
decide it exactly unless those elements straddle the k-th; bf16/fp16 checkpoints almost never need
the second pass, float32 ones usually do); DARE needs no threshold and is that one pass, the mask
drawn per element in the same loop. Elsewhere (CUDA, 5+ inputs) the same computation runs as torch
ops: two histogram passes (four for float64), then the merge pass.

Arithmetic in float32 (float64 when an input is float64); the merged tensor is rounded once to the
base tensor's dtype. For LoRA adapters the merge runs in delta space (:func:`merge_adapters`);
:func:`merge_adapter_factors_separately` is the paper's baseline that merges A's and B's apart
(creating cross terms ``B_i A_j``) and exists only for comparison.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .adapters import LoraAdapter
from .checkpoint import Checkpoint, CheckpointOutput, SafetensorsWriter, ShardedWriter, open_checkpoint
from .device import resolve_device
from .errors import (
    IncompatibleAdaptersError,
    MergeParamsError,
    NonFiniteError,
    ShapeMismatchError,
)
from .merge_methods import (
    METHODS,
    MergeMethod,
    MergeParams,
    ParamsLike,
    get_method,
)
from .transfer import TARGET_FILES, TOKENIZER_FILES

__all__ = [
    "METHODS",
    "MergeMethod",
    "MergeParams",
    "MergeReport",
    "get_method",
    "merge_adapter_factors_separately",
    "merge_adapters",
    "merge_checkpoints",
    "merge_tensors",
    "dare_below",
    "dare_mask",
    "tensor_seed",
    "truncated_svd_factors",
]

def tensor_seed(seed: int, name: str, index: int = 0) -> int:
    """Key of input ``index``'s DARE mask for tensor ``name`` (:func:`dare_mask`): the first 8 bytes
    (little-endian) of ``sha256(f"{seed}:{name}:{index}")``, masked to 63 bits."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_below(density: float) -> int:
    """``ceil(density · 2^53)``: a draw ``u`` (53 bits) is kept iff ``u < dare_below(density)``, i.e.
    iff ``u / 2^53 < density`` exactly (density · 2^53 is exact in float64)."""
    return math.ceil(density * float(1 << 53))


def _splitmix_keep_torch(key: int, first: int, count: int, below: int, dev: torch.device) -> torch.Tensor:
    """:func:`registry.weights.kernels.dare_keep` in torch ops (int64 wraps mod 2^64 as uint64 does;
    ``>>`` is arithmetic, so each shift is masked to its logical result). Any device."""
    from .kernels import DARE_BITS, SPLITMIX_GAMMA, SPLITMIX_MUL1, SPLITMIX_MUL2

    def signed(c: int) -> int:
        return c - (1 << 64) if c >= 1 << 63 else c

    def shr(z: torch.Tensor, k: int) -> torch.Tensor:
        return (z >> k) & ((1 << (64 - k)) - 1)

    z = torch.arange(first + 1, first + count + 1, dtype=torch.int64, device=dev)
    z.mul_(signed(SPLITMIX_GAMMA)).add_(signed(key))
    z.bitwise_xor_(shr(z, 30)).mul_(signed(SPLITMIX_MUL1))
    z.bitwise_xor_(shr(z, 27)).mul_(signed(SPLITMIX_MUL2))
    z.bitwise_xor_(shr(z, 31))
    return shr(z, 64 - DARE_BITS) < below


def _dare_keep(key: int, first: int, count: int, below: int, dev: torch.device, kernel: bool | None) -> torch.Tensor:
    if kernel is None:
        kernel = dev.type == "cpu"
    if kernel:
        from .kernels import dare_keep

        return torch.from_numpy(dare_keep(key, first, count, below)).to(dev)
    return _splitmix_keep_torch(key, first, count, below, dev)


def dare_mask(
    shape: int | Sequence[int],
    density: float,
    seed: int,
    name: str,
    index: int = 0,
    *,
    first: int = 0,
    device: str | torch.device | None = "cpu",
    kernel: bool | None = None,
) -> torch.Tensor:
    """The DARE keep mask (bool, ``shape``) of input ``index`` of tensor ``name`` under ``seed`` --
    the one the merges apply (dropped entries become ``τ · 0``, kept ones ``τ / density``).

    Counter-based: flat element ``j`` (counted from ``first``, for a chunk of a larger tensor) is
    kept iff ``u_j / 2^53 < density``, ``u_j`` the top 53 bits of the ``(j + 1)``-th SplitMix64
    output seeded with ``tensor_seed(seed, name, index)``. The same mask on every device, for any
    chunking. ``kernel``: None picks the compiled kernel on the CPU and torch ops elsewhere; True /
    False forces one (True computes on the CPU, then moves the mask; both give the same mask, tested)."""
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(size)
    if not 0.0 < density <= 1.0:
        raise MergeParamsError(f"density must be in (0, 1], got {density}")
    dev = resolve_device(device)
    keep = _dare_keep(tensor_seed(seed, name, index), first, count, dare_below(density), dev, kernel)
    return keep.view(size)


# ------------------------------------------------------------------------------- streaming core

_CHUNK = 1 << 18  # elements per chunk; results do not depend on it
_DIGITS = 1 << 16

#: ``source(first, count)`` -> flat elements ``[first, first + count)`` in the compute dtype on the
#: compute device. The returned buffer may be reused by the next call to the same source.
Source = Callable[[int, int], torch.Tensor]
#: ``emit(first, update_chunk, base_chunk_or_None, bound)`` consumes one merged chunk.
Emit = Callable[[int, torch.Tensor, torch.Tensor | None, float], None]


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _tensor_source(t: torch.Tensor, cd: torch.dtype, dev: torch.device) -> Source:
    flat = t.detach().reshape(-1)

    def get(first: int, count: int) -> torch.Tensor:
        return flat[first : first + count].to(dev, cd)

    return get


class _CheckpointSource:
    """Chunks of one checkpoint tensor read with ``pread`` (no memory mapping)."""

    def __init__(self, ck: Checkpoint, name: str, cd: torch.dtype, dev: torch.device, chunk: int) -> None:
        self.ck, self.name, self.cd, self.dev = ck, name, cd, dev
        dtype = ck.info(name).dtype
        size = min(chunk, max(ck.info(name).numel, 1))
        self.raw = torch.empty(size, dtype=dtype)
        self.buf = None if (dtype == cd and dev.type == "cpu") else torch.empty(size, dtype=cd, device=dev)

    def __call__(self, first: int, count: int) -> torch.Tensor:
        raw = self.ck.read_into(self.name, self.raw[:count], first)
        return raw if self.buf is None else self.buf[:count].copy_(raw)


def _finite_sq(x: torch.Tensor, what: str) -> float:
    """Σx² (float64 accumulation across chunks by the caller); NonFiniteError if ``x`` is not finite."""
    q = float(torch.dot(x, x))
    if not math.isfinite(q) and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} holds NaN or Inf values")
    return q


def _stream_merge(
    m: MergeMethod,
    p: MergeParams,
    name: str,
    numel: int,
    base: Source | None,
    inputs: Sequence[Source],
    cd: torch.dtype,
    dev: torch.device,
    emit: Emit,
) -> tuple[list[float], float]:
    """Compute ``λ·τ_m`` of one tensor chunk by chunk; ``emit(first, update, base_chunk, bound)``
    receives each chunk, ``bound = ‖base_chunk‖ + ‖update‖`` bounding every ``|base + update|``.
    ``base=None`` means a zero base (LoRA deltas). Returns (Σ τ_i² per input, Σ (λτ_m)²)."""
    n, chunk = len(inputs), _CHUNK
    ranges = [(lo, min(chunk, numel - lo)) for lo in range(0, numel, chunk)]
    store = torch.empty(n * min(chunk, max(numel, 1)), dtype=cd, device=dev)
    where = f"tensor {name!r}"

    def load(lo: int, cnt: int, raw: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(base chunk, [n, cnt] task vectors τ_i; ``raw``: the inputs x_i themselves)."""
        taus = store[: n * cnt].view(n, cnt)
        b = base(lo, cnt) if base is not None else None
        for i, src in enumerate(inputs):
            x = src(lo, cnt)
            if b is None or raw:
                taus[i].copy_(x)
            else:
                torch.sub(x, b, out=taus[i])
        return b, taus

    density = p.density if p.density is not None else 1.0
    k = int(density * numel)
    magnitude = m.trim == "magnitude" and density < 1.0 and k < numel
    keys: list[int] = []  # DARE: input i's mask key (dare_mask)
    if m.trim == "random" and density < 1.0:
        keys = [tensor_seed(p.seed or 0, name, i) for i in range(n)]
    below = dare_below(density)
    assert p.weights is not None
    w = torch.tensor(p.weights, dtype=cd, device=dev).view(n, 1)
    lam = p.lam if p.lam is not None else 1.0
    if dev.type == "cpu" and n <= _KERNEL_MAX_INPUTS:
        return _stream_merge_cpu(m, p, name, ranges, load, n, k, magnitude, keys, density, w, lam, cd, emit)
    thresholds: list[torch.Tensor] = []
    need: list[int] = []
    if magnitude and k > 0:
        thresholds, need = _radix_thresholds(load, ranges, n, k, cd, dev, where)
    task_sq, update_sq = [0.0] * n, 0.0
    for lo, cnt in ranges:
        b, taus = load(lo, cnt)
        b_sq = 0.0
        if b is not None:
            b_sq = _finite_sq(b, f"{where} of the base")
        for i in range(n):
            task_sq[i] += _finite_sq(taus[i], f"{where} of input {i}")
        if magnitude and k == 0:
            taus.mul_(0.0)  # PEFT keeps no entry (signed zeros, as tensor * 0-mask)
        elif magnitude:
            for i in range(n):
                mag = taus[i].abs()
                keep = mag > thresholds[i]
                if need[i] > 0:  # ties at the threshold, in flat-index order
                    eq = mag == thresholds[i]
                    hits = int(eq.sum())
                    if hits > need[i]:
                        eq &= eq.cumsum(0) <= need[i]
                        hits = need[i]
                    keep |= eq
                    need[i] -= hits
                taus[i].mul_(keep)
        elif keys:  # PEFT's random_pruning with the counter-based mask: (τ · m) / density
            for i in range(n):
                taus[i].mul_(_dare_keep(keys[i], lo, cnt, below, dev, None)).div_(density)
        if m.elect:
            sign = taus.sign()
            total = taus.sum(dim=0) if p.majority_sign != "frequency" else sign.sum(dim=0)
            agree = sign == torch.where(total >= 0, 1, -1)
            del sign, total
            taus.mul_(w)
            count = agree.sum(dim=0)
            update = taus.mul_(agree).sum(dim=0) / torch.clamp(count, min=1.0)
        else:
            update = taus.mul_(w).sum(dim=0)
        if lam != 1.0:
            update = lam * update
        u_sq = float(torch.dot(update, update))
        update_sq += u_sq
        emit(lo, update, b, math.sqrt(b_sq if b is not None else 0.0) + math.sqrt(u_sq))
    return task_sq, update_sq


#: the compiled CPU kernels sum the n inputs from +0 in input order, which is how torch (and so
#: PEFT) sums a stack of up to 4 rows whatever its length; from 5 rows torch's order depends on
#: the length and the CPU's vector width, so the torch path runs
_KERNEL_MAX_INPUTS = 4


def _stream_merge_cpu(
    m: MergeMethod,
    p: MergeParams,
    name: str,
    ranges: Sequence[tuple[int, int]],
    load: Callable[[int, int, bool], tuple[torch.Tensor | None, torch.Tensor]],
    n: int,
    k: int,
    magnitude: bool,
    keys: Sequence[int],
    density: float,
    w: torch.Tensor,
    lam: float,
    cd: torch.dtype,
    emit: Emit,
) -> tuple[list[float], float]:
    """:func:`_stream_merge` on the CPU with the compiled kernels (:mod:`registry.weights.kernels`):
    one fused pass per chunk for trim or DARE drop + sign election + disjoint mean (bit-for-bit the
    torch path; DARE's mask drawn in the same loop), and the TIES threshold from
    :func:`_kernel_thresholds` (usually one histogram pass)."""
    from . import kernels

    where = f"tensor {name!r}"
    thr: np.ndarray | None = None
    need = np.zeros(n, dtype=np.int64)
    if magnitude:
        if k == 0:  # PEFT keeps no entry (signed zeros, as tensor * 0-mask)
            thr = np.full(n, np.inf, dtype=np.float64 if cd == torch.float64 else np.float32)
        else:
            thr, need = _kernel_thresholds(load, ranges, n, k, cd, where)
    wn = w.view(-1).numpy()
    dkeys = np.array(keys, dtype=np.uint64) if keys else None
    below = dare_below(density)
    task_sq, update_sq = [0.0] * n, 0.0
    for lo, cnt in ranges:
        b, xs = load(lo, cnt, True)
        sq = np.zeros(n + 1)
        update = torch.empty(cnt, dtype=cd)
        bad = kernels.combine(xs.numpy(), None if b is None else b.numpy(), wn, thr, need, m.elect,
                              p.majority_sign == "frequency", update.numpy(), sq, keys=dkeys, first=lo,
                              below=below, density=density)
        if bad:
            raise NonFiniteError(f"{where} of the base holds NaN or Inf values" if bad == n + 1
                                 else f"{where} of input {bad - 1} holds NaN or Inf values")
        b_sq = float(sq[n])
        for i in range(n):
            task_sq[i] += float(sq[i])
        if lam != 1.0:
            update = lam * update
        u_sq = float(torch.dot(update, update))
        update_sq += u_sq
        emit(lo, update, b, math.sqrt(b_sq) + math.sqrt(u_sq))
    return task_sq, update_sq


def _kernel_thresholds(
    load: Callable[[int, int, bool], tuple[torch.Tensor | None, torch.Tensor]],
    ranges: Sequence[tuple[int, int]],
    n: int,
    k: int,
    cd: torch.dtype,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Per input, the exact TIES threshold T_i and how many elements equal to T_i to keep: the same
    top-k set as :func:`_radix_thresholds`, usually from a single pass.

    Pass 1 histograms the top 16 bits of |τ_i| (sign cleared: 15 exponent/mantissa bits for
    float32) and counts, per digit, the elements with a non-zero bit below it ("dirty"). The digit d
    holding the k-th largest magnitude splits the elements into ``above`` (larger digits, kept),
    the digit's dirty elements (all larger than T = d·2^shift) and its clean ones (exactly T). When
    ``above + dirty ≤ k`` the top-k set is "everything > T plus the first k − above − dirty elements
    equal to T" -- exact, no further pass. That is the usual case for bf16/fp16 checkpoints, whose
    differences rarely need more than the top 16 bits; otherwise (float32 inputs) the remaining
    16-bit digits are selected as in :func:`_radix_thresholds`, one more pass per digit."""
    from . import kernels

    width = 64 if cd == torch.float64 else 32
    npd = np.float64 if width == 64 else np.float32
    nbits = np.int64 if width == 64 else np.int32
    hist = np.zeros((n, _DIGITS), dtype=np.int64)
    dirty = np.zeros((n, _DIGITS), dtype=np.int64)
    prefix = np.zeros(n, dtype=np.int64)
    shift = width - 16
    for lo, cnt in ranges:
        b, xs = load(lo, cnt, True)
        kernels.magnitude_histogram(xs.numpy(), None if b is None else b.numpy(), shift, width, prefix, hist, dirty)
    above = np.zeros(n, dtype=np.int64)
    left = []
    for i in range(n):
        digit, larger = _pick_digit(hist[i], k - int(above[i]), where, i)
        above[i] += larger
        prefix[i] = digit
        if above[i] + dirty[i, digit] <= k:
            above[i] += dirty[i, digit]  # every dirty element of the digit exceeds T: kept
            prefix[i] <<= shift
        else:
            left.append(i)
    while left and shift > 0:
        hist[:] = 0
        prefix_shift, shift = shift, shift - 16
        for lo, cnt in ranges:
            b, xs = load(lo, cnt, True)
            kernels.magnitude_histogram(xs.numpy(), None if b is None else b.numpy(), shift, prefix_shift, prefix,
                                        hist, dirty)
        for i in left:
            digit, larger = _pick_digit(hist[i], k - int(above[i]), where, i)
            above[i] += larger
            prefix[i] = (prefix[i] << 16) | digit
        if shift == 0:
            break
    for i in left:
        prefix[i] <<= shift
    thr = np.array([np.array([x], dtype=np.int64).astype(nbits).view(npd)[0] for x in prefix], dtype=npd)
    return thr, k - above


def _pick_digit(counts: np.ndarray, want: int, where: str, i: int) -> tuple[int, int]:
    """The digit holding the ``want``-th largest element of a 16-bit digit histogram, and how many
    elements have larger digits."""
    cum = np.cumsum(counts[::-1])  # cum[j] = #elements whose digit >= 0xFFFF - j
    j = int(np.searchsorted(cum, want))
    if j >= _DIGITS:
        raise NonFiniteError(f"{where} of input {i} holds NaN or Inf values")
    digit = _DIGITS - 1 - j
    return digit, int(cum[j]) - int(counts[digit])


def _radix_thresholds(
    load: Callable[[int, int], tuple[torch.Tensor | None, torch.Tensor]],
    ranges: Sequence[tuple[int, int]],
    n: int,
    k: int,
    cd: torch.dtype,
    dev: torch.device,
    where: str,
) -> tuple[list[torch.Tensor], list[int]]:
    """Per input, the exact k-th largest |τ_i| and how many of the top k tie with it.

    Radix select on the IEEE bit patterns (monotonic for non-negative floats): one pass over the
    chunks per 16-bit digit, most significant first, histogramming the digit among the elements
    that match the digits chosen so far, then picking the digit where the count of larger
    elements reaches k. Exact, O(numel) per pass, no sort and no full-size copy.
    """
    ibits, width = (torch.int64, 64) if cd == torch.float64 else (torch.int32, 32)
    prefix, above = [0] * n, [0] * n
    for shift in range(width - 16, -1, -16):
        counts = torch.zeros((n, _DIGITS), dtype=torch.int64, device=dev)
        for lo, cnt in ranges:
            _, taus = load(lo, cnt)
            for i in range(n):
                bits = taus[i].abs().view(ibits)
                if shift < width - 16:
                    bits = bits[(bits >> (shift + 16)) == prefix[i]]
                    digits = bits & 0xFFFF if shift == 0 else (bits >> shift) & 0xFFFF
                else:
                    digits = bits >> shift  # top digit: the sign bit is 0, no mask needed
                counts[i] += torch.bincount(digits, minlength=_DIGITS)
        for i in range(n):
            cum = counts[i].flip(0).cumsum(0)  # cum[j] = #elements whose digit >= 0xFFFF - j
            want = torch.tensor([k - above[i]], dtype=cum.dtype, device=dev)
            j = int(torch.searchsorted(cum, want)[0])
            if j >= _DIGITS:
                raise NonFiniteError(f"{where} of input {i} holds NaN or Inf values")
            digit = _DIGITS - 1 - j
            above[i] += int(cum[j]) - int(counts[i, digit])
            prefix[i] = (prefix[i] << 16) | digit
    thresholds = [torch.tensor([x], dtype=ibits).view(cd)[0].to(dev) for x in prefix]
    return thresholds, [k - a for a in above]


# ------------------------------------------------------------------------------- per tensor


def _check_tensors(base: torch.Tensor, finetuned: Sequence[torch.Tensor], name: str) -> None:
    if not base.dtype.is_floating_point or not all(f.dtype.is_floating_point for f in finetuned):
        raise ShapeMismatchError(f"tensor {name!r}: merges need floating-point tensors")
    bad = [i for i, f in enumerate(finetuned) if f.shape != base.shape]
    if bad:
        shapes = ", ".join(f"input {i}: {list(finetuned[i].shape)}" for i in bad)
        raise ShapeMismatchError(f"tensor {name!r}: base is {list(base.shape)}, {shapes}")


def _rounded(out: torch.Tensor, update: torch.Tensor, b: torch.Tensor | None, bound: float, name: str) -> torch.Tensor:
    """``out`` <- round(b + update) (once, to out's dtype), checked for overflow (only when ``bound``,
    a bound on every |b + update|, does not rule it out)."""
    out.copy_(update if b is None else b + update)
    certain = bound < 0.99 * torch.finfo(out.dtype).max
    if not certain and not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"tensor {name!r}: the merge overflows {out.dtype}")
    return out


def merge_tensors(
    method: str | MergeMethod,
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    params: ParamsLike = None,
    *,
    name: str = "",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Merge one tensor: ``θ_base + λ · τ_m(θ_i − θ_base)`` in the base's dtype (see module doc).

    ``name`` identifies the tensor for DARE seeding and error messages. Raises
    :class:`MergeParamsError`, :class:`ShapeMismatchError` or :class:`NonFiniteError`.
    """
    m = get_method(method)
    p = m.resolve(params, len(finetuned))
    _check_tensors(base, finetuned, name)
    dev = resolve_device(device)
    cd = _compute_dtype(base.dtype, *(f.dtype for f in finetuned))
    out = torch.empty(base.numel(), dtype=base.dtype, device=dev)

    def emit(lo: int, update: torch.Tensor, b: torch.Tensor | None, bound: float) -> None:
        _rounded(out[lo : lo + update.numel()], update, b, bound, name)

    srcs = [_tensor_source(f, cd, dev) for f in finetuned]
    _stream_merge(m, p, name, base.numel(), _tensor_source(base, cd, dev), srcs, cd, dev, emit)
    return out.view(base.shape)


# ------------------------------------------------------------------------------- checkpoints


@dataclass
class MergeReport:
    """What :func:`merge_checkpoints` did (JSON-safe via :meth:`as_dict`). ``task_norms[i]`` =
    ‖τ_i‖ and ``update_norm`` = ‖λ τ_m‖ over all merged tensors (float64 sums)."""

    method: str
    variant: str
    params: dict[str, Any]
    inputs: int
    tensors: int = 0
    merged: int = 0
    copied: list[str] = field(default_factory=list)
    task_norms: list[float] = field(default_factory=list)
    update_norm: float = 0.0
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    side_files: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_structure(base: Checkpoint, inputs: Sequence[Checkpoint]) -> None:
    problems: list[str] = []
    for i, ck in enumerate(inputs):
        for name in base.names:
            bi = base.info(name)
            if not bi.dtype.is_floating_point:
                continue
            if name not in ck:
                problems.append(f"{name!r} missing from input {i}")
            elif ck.info(name).shape != bi.shape or not ck.info(name).dtype.is_floating_point:
                ci = ck.info(name)
                problems.append(f"{name!r} is {ci.dtype} {list(ci.shape)} in input {i}, base {list(bi.shape)}")
        problems += [f"{n!r} in input {i} but not in the base" for n in ck.names if n not in base]
    if problems:
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ShapeMismatchError("inputs do not match the base: " + "; ".join(problems[:10]) + more)


def _chunk_writer(writer: ShardedWriter | SafetensorsWriter, name: str, stage: torch.Tensor) -> Emit:
    def emit(lo: int, update: torch.Tensor, b: torch.Tensor | None, bound: float) -> None:
        writer.write_range(name, lo, _rounded(stage[: update.numel()], update, b, bound, name))

    return emit


def merge_checkpoints(
    method: str | MergeMethod,
    base: str | os.PathLike[str] | Checkpoint,
    inputs: Sequence[str | os.PathLike[str] | Checkpoint],
    out: str | os.PathLike[str],
    params: ParamsLike = None,
    device: str | torch.device | None = None,
    *,
    max_shard_bytes: int | None = None,
) -> MergeReport:
    """Merge full checkpoints tensor by tensor into ``out`` (directory or ``.safetensors`` file).

    Every float tensor of ``base`` must exist with the same shape in every input (else
    :class:`ShapeMismatchError`, before anything is written); non-float tensors are copied from the
    base. Each tensor is merged exactly as :func:`merge_tensors` would, but streamed: its inputs are
    read chunk by chunk with ``pread`` and the result written chunk by chunk, so memory stays at a
    few ``n × chunk`` buffers. A directory output also gets the base's config and tokenizer files.
    """
    m = get_method(method)
    ck_base = open_checkpoint(base)
    cks = [open_checkpoint(x) for x in inputs]
    p = m.resolve(params, len(cks))
    _check_structure(ck_base, cks)
    dev = resolve_device(device)
    report = MergeReport(m.name, m.variant, p.as_dict(), len(cks))
    sq = [0.0] * len(cks)
    output = CheckpointOutput(out, ck_base.specs(), max_shard_bytes, {"format": "pt"})
    try:
        for name in ck_base.names:
            info = ck_base.info(name)
            if not info.dtype.is_floating_point:
                output.writer.copy_from(name, info.file, info.start)
                report.copied.append(name)
                continue
            cd = _compute_dtype(info.dtype, *(c.info(name).dtype for c in cks))
            emit = _chunk_writer(output.writer, name, torch.empty(min(_CHUNK, max(info.numel, 1)), dtype=info.dtype))
            srcs = [_CheckpointSource(c, name, cd, dev, _CHUNK) for c in cks]
            bsrc = _CheckpointSource(ck_base, name, cd, dev, _CHUNK)
            tsq, usq = _stream_merge(m, p, name, info.numel, bsrc, srcs, cd, dev, emit)
            sq = [a + b for a, b in zip(sq, tsq, strict=True)]
            report.update_norm += usq
            report.merged += 1
        report.tensors = len(ck_base)
        report.bytes_written = output.writer.bytes_written
        if output.is_dir and ck_base.directory is not None:
            for fname in TARGET_FILES + TOKENIZER_FILES:
                src = ck_base.directory / fname
                if src.is_file():
                    output.add_file(src, fname)
                    report.side_files[fname] = "base"
        report.files = output.finish()
    except BaseException:
        output.abort()
        raise
    finally:
        for ck in (ck_base, *cks):
            ck.close()
    report.task_norms = [math.sqrt(x) for x in sq]
    report.update_norm = math.sqrt(report.update_norm)
    return report


# ------------------------------------------------------------------------------- LoRA adapters


def truncated_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors of ``delta`` (out × in), ``r = min(rank, out, in)``: with
    ``delta = U Σ Vᵀ``, ``B = U_r Σ_r^½`` (out × r) and ``A = Σ_r^½ V_rᵀ`` (r × in), so ``B @ A`` is the
    truncated SVD (Eckart–Young optimal in Frobenius norm)."""
    if rank < 1:
        raise MergeParamsError(f"rank must be >= 1, got {rank}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


def _check_adapters(adapters: Sequence[LoraAdapter]) -> list[str]:
    if not adapters:
        raise MergeParamsError("needs at least one adapter to merge")
    first = adapters[0]
    names = first.module_names()
    for i, a in enumerate(adapters[1:], 1):
        if a.module_names() != names:
            diff = sorted(set(names).symmetric_difference(a.module_names()))
            raise IncompatibleAdaptersError(f"adapter {i} targets other modules than adapter 0: {diff[:10]}")
        if a.fan_in_fan_out != first.fan_in_fan_out:
            raise IncompatibleAdaptersError(f"adapter {i} has fan_in_fan_out={a.fan_in_fan_out}, adapter 0 not")
        for n in names:
            x, y = a.modules[n], first.modules[n]
            if (x.out_features, x.in_features) != (y.out_features, y.in_features):
                raise IncompatibleAdaptersError(
                    f"module {n!r}: adapter {i} is {x.out_features}x{x.in_features}, "
                    f"adapter 0 is {y.out_features}x{y.in_features}"
                )
    return names


def _merge_dense(
    m: MergeMethod, p: MergeParams, name: str, parts: Sequence[torch.Tensor], dev: torch.device
) -> torch.Tensor:
    """``λ · τ_m(parts)`` with a zero base (the parts are the task vectors), on the CPU."""
    cd = _compute_dtype(*(x.dtype for x in parts))
    out = torch.empty(parts[0].numel(), dtype=cd, device=dev)

    def emit(lo: int, update: torch.Tensor, b: torch.Tensor | None, bound: float) -> None:
        out[lo : lo + update.numel()] = update

    srcs = [_tensor_source(x, cd, dev) for x in parts]
    _stream_merge(m, p, name, parts[0].numel(), None, srcs, cd, dev, emit)
    return out.view(parts[0].shape).to("cpu")


def merge_adapters(
    method: str | MergeMethod,
    adapters: Sequence[LoraAdapter],
    params: ParamsLike = None,
    rank: int | None = None,
    *,
    device: str | torch.device | None = None,
) -> LoraAdapter | dict[str, torch.Tensor]:
    """Merge LoRA adapters in **delta space**: per module ``ΔW = λ · τ_m(ΔW_1, ..., ΔW_n)`` with
    ``ΔW_i = B_i A_i`` (scale folded in; the base is zero, so τ_i = ΔW_i).

    ``rank=None`` returns the dense deltas ``{module: ΔW}`` (out × in, float32/64 on the CPU);
    an int re-factorises each ΔW by :func:`truncated_svd_factors` and returns a
    :class:`LoraAdapter` (config, dtype, fan_in_fan_out from the first adapter). Merging one
    adapter with weight 1 and λ = 1 returns its ΔW exactly. Adapters must target the same modules
    with the same shapes (ranks may differ), else :class:`IncompatibleAdaptersError`.
    """
    m = get_method(method)
    names = _check_adapters(adapters)
    p = m.resolve(params, len(adapters))
    dev = resolve_device(device)
    cd = _compute_dtype(*(mod.A.dtype for a in adapters for mod in a.modules.values()))
    dense: dict[str, torch.Tensor] = {}
    for name in names:
        dense[name] = _merge_dense(m, p, name, [a.delta(name, dtype=cd, device=dev) for a in adapters], dev)
    if rank is None:
        return dense
    return refactorise(dense, rank, adapters[0]).adapter


@dataclass(frozen=True)
class Refactorised:
    """A merged delta stored as rank-r factors, and what that cost:
    ``error = ‖ΔŴ − ΔW‖_F / ‖ΔW‖_F`` over all modules (``module_errors`` per module), ΔŴ the delta of
    the stored factors (after rounding to the adapter's dtype), ΔW the exact merged delta."""

    adapter: LoraAdapter
    error: float
    module_errors: dict[str, float]


def refactorise(dense: Mapping[str, torch.Tensor], rank: int, like: LoraAdapter) -> Refactorised:
    """Each merged ``ΔW`` (out × in) as its best rank-``rank`` factors (:func:`truncated_svd_factors`),
    stored with ``like``'s config, dtype and ``fan_in_fan_out``; the error is measured on what is
    stored. A merge whose delta has rank ≤ ``rank`` is exact up to rounding."""
    factors = {n: truncated_svd_factors(d, rank) for n, d in dense.items()}
    adapter = LoraAdapter.from_factors(factors, config=like.config, dtype=like.dtype,
                                       fan_in_fan_out=like.fan_in_fan_out)
    num2: dict[str, float] = {}
    den2: dict[str, float] = {}
    for n, d in dense.items():
        exact = d.to(torch.float64)
        got = adapter.delta(n, dtype=torch.float64, device=d.device)
        num2[n] = float((got - exact).square().sum())
        den2[n] = float(exact.square().sum())
    def rel(num: float, den: float) -> float:
        return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)

    per = {n: rel(num2[n], den2[n]) for n in dense}
    return Refactorised(adapter, rel(sum(num2.values()), sum(den2.values())), per)


def merge_adapter_factors_separately(
    method: str | MergeMethod,
    adapters: Sequence[LoraAdapter],
    params: ParamsLike = None,
    *,
    device: str | torch.device | None = None,
) -> LoraAdapter:
    """BASELINE ONLY -- merges the A factors and the B factors **separately** (what PEFT's
    ``add_weighted_adapter`` does for linear/TIES/DARE without SVD), so the merged delta
    ``B_m A_m = (Σ_i √w_i B_i)(Σ_j √w_j A_j)`` contains cross terms ``B_i A_j`` (i ≠ j) that belong to
    no adapter. Use :func:`merge_adapters` for real merges.

    Per module: ``A_m = √λ · τ_m(A_1..A_n)``, ``B_m = √λ · τ_m(B_1..B_n)`` with weights ``√w_i``
    (PEFT's ``√(w_i · s_i)`` on unfolded factors), DARE seeds from ``"<module>.lora_A"`` /
    ``"<module>.lora_B"``. Needs equal ranks, weights ≥ 0 and λ ≥ 0.
    """
    m = get_method(method)
    names = _check_adapters(adapters)
    p = m.resolve(params, len(adapters))
    assert p.weights is not None
    lam = p.lam if p.lam is not None else 1.0
    if lam < 0 or any(w < 0 for w in p.weights):
        raise MergeParamsError("the separate-factor baseline takes square roots: weights and lam must be >= 0")
    pf = replace(p, weights=tuple(math.sqrt(w) for w in p.weights), lam=1.0)
    root = math.sqrt(lam)
    dev = resolve_device(device)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        ranks = {a.modules[name].rank for a in adapters}
        if len(ranks) != 1:
            raise IncompatibleAdaptersError(f"module {name!r}: ranks differ {sorted(ranks)}")
        merged = []
        for part in ("A", "B"):
            t = _merge_dense(m, pf, f"{name}.lora_{part}", [getattr(a.modules[name], part) for a in adapters], dev)
            merged.append(t if root == 1.0 else root * t)
        factors[name] = (merged[0], merged[1])
    first = adapters[0]
    return LoraAdapter.from_factors(
        factors, config=first.config, dtype=first.dtype, fan_in_fan_out=first.fan_in_fan_out
    )
