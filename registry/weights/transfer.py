"""Fine-tuning transfer (Lin et al., EMNLP 2025, arXiv 2503.20110).

A fine-tune ``m'_s`` of a source base ``m_s`` has the diff vector ``Δ_s = m'_s − m_s`` (every
tensor, embeddings and lm_head included). Transferring it to a target base ``m_t`` gives
``m_t + α Δ_s`` (α = 1 in the paper). Three entry points, all streamed tensor by tensor and chunk
by chunk (peak memory = a few chunk buffers plus what the OS caches, never whole models):

* :func:`compute_diff`  ``Δ = m'_s − m_s``, stored as float32 (float64 when an input is float64)
  so that applying it later gives exactly what :func:`transfer` gives;
* :func:`apply_diff`    ``m_t + α Δ``;
* :func:`transfer`      ``m_t + α (m'_s − m_s)`` in one pass, without materialising Δ.

Arithmetic: per element, in float32 (float64 when any participating tensor is float64), in this
order: ``d = f − s``; ``d = α·d`` (skipped when α = 1); ``out = t + d``; then one rounding to the
output dtype (the target's dtype; float32 for a diff). Elementwise, so chunking never changes a bit.

Tensor matching, by name (the output always has exactly the target's tensors, except for padding):

* all three present, float, same shape -> ``t + α(f − s)``;
* ``f`` has more rows (dim 0) than ``s``, other dims equal, and ``t`` has ``s``'s shape (vocabulary
  growth) -> ``s`` and ``t`` are padded with zero rows to ``f``'s rows; the output tensor has ``f``'s
  rows (reported in ``padded``; ``config.json``'s ``vocab_size`` is updated to match when it equals
  the target's old row count);
* fewer rows in ``f``, any other shape mismatch, a non-float ``f``/``s`` for a float ``t``, a tensor
  missing from ``s``: the target tensor is copied unchanged and the tensor is listed in
  ``skipped`` with a reason -- or, with ``on_mismatch="refuse"``, :class:`ShapeMismatchError`
  listing every such tensor is raised before anything is written;
* fine-tune-only tensors (absent from the target) are dropped and listed in ``skipped``
  (``not_in_target``; refused too under ``"refuse"``);
* target tensors absent from the fine-tune, and non-float target tensors (integer buffers), are
  copied unchanged and listed in ``copied``.

Non-finite values in any tensor that enters the arithmetic (or a result that overflows the
output dtype) raise :class:`NonFiniteError` naming the tensor. Tensors copied unchanged are not
inspected.

Output ``out``: a directory (``model.safetensors``, or shards + index when ``max_shard_bytes`` is
set and exceeded), built in a temporary sibling and renamed into place at the end, so a failure
leaves nothing behind; or a path ending in ``.safetensors`` for a single bare file. A directory
output also receives the target base's config files (``TARGET_FILES``) and the fine-tune's
tokenizer / chat-template files (``TOKENIZER_FILES``) when the inputs are directories holding
them. A diff directory keeps the fine-tune's tokenizer files so that
:func:`apply_diff` can pass them on.

Diagnostics (paper: transfer works when source and target are close): with sums accumulated in
float64 over all tensors where Δ is applied (per-chunk partial sums in the compute dtype),
``relative_base_shift = ‖m_t − m_s‖ / ‖m_s‖`` and ``cosine = ⟨m_t − m_s, Δ_s⟩ / (‖m_t − m_s‖ ‖Δ_s‖)``.

The planning (:func:`plan_tensors`) and the chunked arithmetic (:class:`Engine` and its
:class:`Chunk`, :class:`Slot` buffers) are public beyond ``__all__`` for one more user:
:mod:`registry.weights.transfer_stream` produces the same output files range by range with them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import (
    Checkpoint,
    CheckpointOutput,
    SafetensorsWriter,
    ShardedWriter,
    TensorSpec,
    open_checkpoint,
)
from .device import resolve_device
from .errors import NonFiniteError, ShapeMismatchError, WeightsError

__all__ = [
    "TARGET_FILES",
    "TOKENIZER_FILES",
    "PaddedTensor",
    "SkippedTensor",
    "TransferReport",
    "apply_diff",
    "compute_diff",
    "transfer",
]

OnMismatch = Literal["skip", "refuse"]
CkptLike = str | os.PathLike[str] | Checkpoint

#: Files copied from the target base's directory into a transfer / apply output.
TARGET_FILES: tuple[str, ...] = ("config.json", "generation_config.json")
#: Files copied from the fine-tune's (or diff's) directory: tokenizer and chat template.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
CHUNK = 1 << 18  # elements per chunk: buffers stay cache-sized; results do not depend on it
FORMAT_META = {"format": "pt"}


@dataclass(frozen=True)
class SkippedTensor:
    """A tensor whose Δ was not applied (``skipped``) or that was copied as is (``copied``)."""

    name: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class PaddedTensor:
    """Vocabulary growth: base tensors padded with zero rows from ``rows_from`` to ``rows_to``."""

    name: str
    rows_from: int
    rows_to: int


@dataclass
class TransferReport:
    """What a transfer / diff / apply did. :meth:`as_dict` is JSON-safe.

    Norms are square roots of float64 sums over the tensors where Δ was applied; a ratio whose
    denominator is zero (or a quantity the operation cannot see) is ``None``:
    ``relative_base_shift = ‖m_t − m_s‖/‖m_s‖``, ``cosine = cos(m_t − m_s, Δ)``,
    ``relative_diff = ‖Δ‖/‖m_s‖``, ``relative_update = ‖αΔ‖/‖m_t‖``.
    """

    operation: str
    alpha: float
    tensors: int = 0
    applied: int = 0
    skipped: list[SkippedTensor] = field(default_factory=list)
    copied: list[SkippedTensor] = field(default_factory=list)
    padded: list[PaddedTensor] = field(default_factory=list)
    source_norm: float | None = None
    target_norm: float | None = None
    diff_norm: float | None = None
    base_shift_norm: float | None = None
    relative_base_shift: float | None = None
    cosine: float | None = None
    relative_diff: float | None = None
    relative_update: float | None = None
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    side_files: dict[str, str] = field(default_factory=dict)
    config_updates: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: ``out = base + scale·(plus − minus)``; absent terms are zero; ``minus``
    and ``base`` hold only the first ``limit`` elements (the rest is zero padding)."""

    out: TensorSpec
    plus: str | None  # name in the "plus" checkpoint (fine-tune or diff); None -> copy base
    minus: str | None
    base: str | None
    limit: int


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _shape_note(**shapes: tuple[int, ...]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())


def _pair_shapes(plus: tuple[int, ...], base: tuple[int, ...]) -> tuple[str, str] | None | int:
    """Compare the shape of the Δ-side tensor with the base side. Returns ``None`` when equal,
    the padded row count when the Δ side has more rows, or ``(reason, detail)`` for a skip."""
    if plus == base:
        return None
    if len(plus) == len(base) >= 1 and plus[1:] == base[1:]:
        if plus[0] > base[0]:
            return plus[0]
        return ("fewer_rows", f"{plus[0]} rows in the fine-tune/diff < {base[0]} in the base")
    return ("shape_mismatch", f"{list(plus)} vs {list(base)}")


def plan_tensors(
    plus: Checkpoint, minus: Checkpoint | None, t: Checkpoint, plus_role: str = "finetune"
) -> tuple[list[TensorJob], list[SkippedTensor], list[SkippedTensor], list[PaddedTensor]]:
    """One plan for both forms: ``t + α (plus − minus)`` (a transfer: plus = fine-tune, minus =
    source base) and ``t + α plus`` (applying a stored diff: ``minus`` None). Per target tensor: a
    job computing it, or a copy of the target's tensor with the reason (non-float, no counterpart,
    shapes that do not pair); vocabulary growth pads with zero rows."""
    jobs: list[TensorJob] = []
    skipped: list[SkippedTensor] = []
    copied: list[SkippedTensor] = []
    padded: list[PaddedTensor] = []
    for name in t.names:
        ti = t.info(name)
        spec = TensorSpec(name, ti.dtype, ti.shape)
        copy = TensorJob(spec, None, None, name, ti.numel)
        if not _is_float(ti.dtype):
            copied.append(SkippedTensor(name, "non_float", str(ti.dtype)))
            jobs.append(copy)
            continue
        if name not in plus:
            copied.append(SkippedTensor(name, f"missing_in_{plus_role}"))
            jobs.append(copy)
            continue
        pi = plus.info(name)
        cmp: tuple[str, str] | None | int
        if minus is None:
            ref_shape = ti.shape
            cmp = _pair_shapes(pi.shape, ref_shape) if _is_float(pi.dtype) else ("non_float_input", str(pi.dtype))
        elif name not in minus:
            cmp = ("missing_in_source_base", "")
        else:
            mi = minus.info(name)
            ref_shape = mi.shape
            if not (_is_float(pi.dtype) and _is_float(mi.dtype)):
                cmp = ("non_float_input", f"fine-tune {pi.dtype}, source {mi.dtype}")
            elif mi.shape != ti.shape:
                cmp = ("shape_mismatch", _shape_note(source=mi.shape, target=ti.shape))
            else:
                cmp = _pair_shapes(pi.shape, mi.shape)
        if isinstance(cmp, tuple):
            skipped.append(SkippedTensor(name, cmp[0], cmp[1]))
            jobs.append(copy)
            continue
        if isinstance(cmp, int):
            padded.append(PaddedTensor(name, ref_shape[0], cmp))
            spec = TensorSpec(name, ti.dtype, pi.shape)
        jobs.append(TensorJob(spec, name, None if minus is None else name, name, ti.numel))
    skipped += [SkippedTensor(n, "not_in_target") for n in plus.names if n not in t]
    return jobs, skipped, copied, padded


# ------------------------------------------------------------------------------------- engine


class Sums:
    """float64 accumulators of the diagnostics."""

    def __init__(self) -> None:
        self.ss = self.tt = self.dd = self.ww = self.wd = 0.0
        self.has_s = self.has_t = self.has_w = False


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


@dataclass(frozen=True)
class Chunk:
    """Flat elements ``[lo, lo + n)`` of one computed output tensor; ``inside`` is False in the
    zero-padded rows (beyond ``job.limit``)."""

    job: TensorJob
    lo: int
    n: int
    inside: bool
    cdtype: torch.dtype


class Slot:
    """Chunk buffers, allocated once and reused: raw input bytes (CPU, source dtypes), compute
    buffers (compute dtype, on the device) and the rounded output (CPU)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def buf(self, role: str, dtype: torch.dtype, device: torch.device, n: int) -> torch.Tensor:
        key = (role, dtype, device)
        b = self._bufs.get(key)
        if b is None:
            b = self._bufs[key] = torch.empty(CHUNK, dtype=dtype, device=device)
        return b[:n]


class ResultNotFinite(Exception):
    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk


_CPU = torch.device("cpu")


class Engine:
    """Chunked evaluation of ``out = base + scale·(plus − minus)`` for a list of jobs.

    Per chunk: ``pread`` the inputs' raw bytes, convert, compute, round, ``pwrite`` at the output
    offset; tensors copied unchanged go through ``copy_file_range``. Memory: one set of chunk
    buffers, whatever the tensor sizes. Elementwise arithmetic: chunking never changes a bit.
    (An I/O thread prefetching the next chunk was measured slower on 2 cores and dropped.)
    """

    def __init__(
        self,
        device: torch.device,
        scale: float,
        plus: Checkpoint,
        minus: Checkpoint | None,
        base: Checkpoint | None,
        writer: ShardedWriter | SafetensorsWriter,
    ) -> None:
        self.device, self.scale, self.writer = device, scale, writer
        self.roles: dict[str, Checkpoint | None] = {"plus": plus, "minus": minus, "base": base}
        self.sums = Sums()
        self.diagnostics = True  # False: skip the base-shift sums (cosine, shift), which only a report needs

    def name_in(self, job: TensorJob, role: str) -> str | None:
        return job.plus if role == "plus" else job.minus if role == "minus" else job.base

    def chunks(self, job: TensorJob, e0: int = 0, e1: int | None = None) -> Iterator[Chunk]:
        """The chunks covering flat elements ``[e0, e1)`` (default: all) of a computed tensor; no
        chunk straddles the padding boundary ``job.limit``."""
        e1 = job.out.numel if e1 is None else e1
        dtypes = [job.out.dtype]
        for role, ck in self.roles.items():
            name = self.name_in(job, role)
            if ck is not None and name is not None:
                dtypes.append(ck.info(name).dtype)
        cdtype = torch.float64 if torch.float64 in dtypes else torch.float32
        bounds = sorted({e0, e1, *(b for b in (job.limit,) if e0 < b < e1)})
        for a, b in zip(bounds, bounds[1:], strict=False):
            for lo in range(a, b, CHUNK):
                yield Chunk(job, lo, min(CHUNK, b - lo), lo < job.limit, cdtype)

    def _chunks(self, jobs: Sequence[TensorJob]) -> Iterator[TensorJob | Chunk]:
        for job in jobs:
            if job.plus is None:
                yield job
                continue
            yield from self.chunks(job)

    def _copy(self, job: TensorJob) -> None:
        base = self.roles["base"]
        assert base is not None and job.base is not None
        info = base.info(job.base)
        self.writer.copy_from(job.out.name, info.file, info.start)

    def read_chunk(self, c: Chunk, slot: Slot) -> None:
        for role, ck in self.roles.items():
            name = self.name_in(c.job, role)
            if ck is not None and name is not None and (c.inside or role == "plus"):
                ck.read_into(name, slot.buf(role + ":raw", ck.info(name).dtype, _CPU, c.n), c.lo)

    def _operand(self, c: Chunk, slot: Slot, role: str) -> torch.Tensor | None:
        ck, name = self.roles[role], self.name_in(c.job, role)
        if ck is None or name is None:
            return None
        if not (c.inside or role == "plus"):
            return slot.buf(role, c.cdtype, self.device, c.n).zero_()
        raw = slot.buf(role + ":raw", ck.info(name).dtype, _CPU, c.n)
        if raw.dtype == c.cdtype and self.device.type == "cpu":
            return raw
        return slot.buf(role, c.cdtype, self.device, c.n).copy_(raw)

    def compute(self, c: Chunk, slot: Slot, out: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's result in the output dtype (on the CPU), written into ``out`` when given."""
        scale, sums, spec = self.scale, self.sums, c.job.out
        d = self._operand(c, slot, "plus")
        s = self._operand(c, slot, "minus")
        t = self._operand(c, slot, "base")
        assert d is not None
        c_ss = c_tt = 0.0
        if s is not None:
            c_ss = _dot(s, s)
            d.sub_(s)
        c_dd = _dot(d, d)
        if t is not None:
            c_tt = _dot(t, t)
            if s is not None and self.diagnostics:
                w = torch.sub(t, s, out=slot.buf("shift", c.cdtype, self.device, c.n))
                sums.has_w = True
                sums.ww += _dot(w, w)
                sums.wd += _dot(w, d)
            if scale != 1.0:
                d.mul_(scale)
            res = t.add_(d)
        else:
            res = d.mul_(scale) if scale != 1.0 else d
        if out is not None:
            res = out.copy_(res)
        elif spec.dtype != c.cdtype or self.device.type != "cpu":
            res = slot.buf("out", spec.dtype, _CPU, c.n).copy_(res)
        # The chunk is certainly finite in the output dtype when every input chunk is finite (its
        # sum of squares is) and sqrt(Σt²) + |α|·sqrt(Σd²), a bound on every |t + α·d|, stays below
        # the dtype's largest value; otherwise the chunk itself is checked.
        bound = math.sqrt(c_tt) + abs(scale) * math.sqrt(c_dd)
        certain = math.isfinite(c_ss) and bound < 0.99 * torch.finfo(spec.dtype).max
        if not certain and not bool(torch.isfinite(res).all()):
            raise ResultNotFinite(c)
        sums.has_s |= s is not None
        sums.has_t |= t is not None
        sums.ss += c_ss
        sums.tt += c_tt
        sums.dd += c_dd
        return res

    def run(self, jobs: Sequence[TensorJob]) -> None:
        slot = Slot()
        try:
            for item in self._chunks(jobs):
                if isinstance(item, TensorJob):
                    self._copy(item)
                    continue
                self.read_chunk(item, slot)
                self.writer.write_range(item.job.out.name, item.lo, self.compute(item, slot))
        except ResultNotFinite as e:
            self.raise_nonfinite(e.chunk)

    def raise_nonfinite(self, c: Chunk) -> None:
        slot = Slot()
        for role, ck in self.roles.items():
            name = self.name_in(c.job, role)
            if ck is None or name is None or not (c.inside or role == "plus"):
                continue
            raw = slot.buf("check", ck.info(name).dtype, _CPU, c.n)
            ck.read_into(name, raw, c.lo)
            if not bool(torch.isfinite(raw).all()):
                raise NonFiniteError(f"tensor {name!r} of {ck.path} holds NaN or Inf values")
        raise NonFiniteError(f"tensor {c.job.out.name!r}: the result overflows {c.job.out.dtype} (inputs are finite)")


# ------------------------------------------------------------------------------------- output


def _side_files(
    output: CheckpointOutput,
    report: TransferReport,
    config_dir: Path | None,
    tokenizer_dir: Path | None,
    tokenizer_role: str,
) -> None:
    if not output.is_dir:
        return
    if config_dir is not None:
        for fname in TARGET_FILES:
            src = config_dir / fname
            if not src.is_file():
                continue
            data = None
            if fname == "config.json" and report.padded:
                data = patched_config(src, report)
            output.add_file(src, fname, data)
            report.side_files[fname] = "target"
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = tokenizer_dir / fname
            if src.is_file():
                output.add_file(src, fname)
                report.side_files[fname] = tokenizer_role


def patched_config(src: Path, report: TransferReport) -> bytes | None:
    """``config.json`` with ``vocab_size`` raised to the padded row count, when it held the
    target's old row count and all padded tensors agree on the new one."""
    rows = {(p.rows_from, p.rows_to) for p in report.padded}
    if len(rows) != 1:
        return None
    old, new = rows.pop()
    try:
        cfg = json.loads(src.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict) or cfg.get("vocab_size") != old:
        return None
    cfg["vocab_size"] = new
    report.config_updates["vocab_size"] = [old, new]
    return (json.dumps(cfg, indent=2) + "\n").encode("utf-8")


def finish_report(report: TransferReport, sums: Sums, alpha: float) -> None:
    def root(x: float) -> float:
        return math.sqrt(x)

    def ratio(num: float, den: float) -> float | None:
        return num / den if den > 0 and math.isfinite(num / den) else None

    if sums.has_s:
        report.source_norm = root(sums.ss)
        report.relative_diff = ratio(root(sums.dd), root(sums.ss))
    if sums.has_t:
        report.target_norm = root(sums.tt)
        report.relative_update = ratio(abs(alpha) * root(sums.dd), root(sums.tt))
    report.diff_norm = root(sums.dd) if report.applied else None
    if sums.has_w:
        report.base_shift_norm = root(sums.ww)
        report.relative_base_shift = ratio(root(sums.ww), root(sums.ss))
        report.cosine = ratio(sums.wd, root(sums.ww) * root(sums.dd))


def check_args(alpha: float, on_mismatch: str) -> None:
    if on_mismatch not in ("skip", "refuse"):
        raise WeightsError(f"on_mismatch must be 'skip' or 'refuse', got {on_mismatch!r}")
    if not math.isfinite(alpha):
        raise WeightsError(f"alpha must be finite, got {alpha!r}")


def refuse(skipped: list[SkippedTensor], on_mismatch: str) -> None:
    if on_mismatch == "refuse" and skipped:
        lines = "; ".join(f"{s.name}: {s.reason}" + (f" ({s.detail})" if s.detail else "") for s in skipped[:20])
        more = f" (+{len(skipped) - 20} more)" if len(skipped) > 20 else ""
        raise ShapeMismatchError(f"{len(skipped)} tensor(s) cannot be transferred: {lines}{more}")


def _execute(
    report: TransferReport,
    jobs: list[TensorJob],
    out: str | os.PathLike[str],
    max_shard_bytes: int | None,
    plus: Checkpoint,
    minus: Checkpoint | None,
    base: Checkpoint | None,
    device: str | torch.device | None,
    scale: float,
    config_dir: Path | None,
    tokenizer_dir: Path | None,
    tokenizer_role: str,
) -> TransferReport:
    output = CheckpointOutput(out, [j.out for j in jobs], max_shard_bytes, FORMAT_META)
    engine = Engine(resolve_device(device), scale, plus, minus, base, output.writer)
    try:
        engine.run(jobs)
        report.tensors = len(jobs)
        report.applied = sum(1 for j in jobs if j.plus is not None)
        report.bytes_written = output.writer.bytes_written
        _side_files(output, report, config_dir, tokenizer_dir, tokenizer_role)
        report.files = output.finish()
    except BaseException:
        output.abort()
        raise
    finally:
        for ck in (plus, minus, base):
            if ck is not None:
                ck.close()
    finish_report(report, engine.sums, scale)
    return report


# ------------------------------------------------------------------------------------- public


def transfer(
    finetune: CkptLike,
    source_base: CkptLike,
    target_base: CkptLike,
    out: str | os.PathLike[str],
    alpha: float = 1.0,
    *,
    device: str | torch.device | None = None,
    on_mismatch: OnMismatch = "skip",
    max_shard_bytes: int | None = None,
) -> TransferReport:
    """Write ``m_t + α (m'_s − m_s)`` for every target tensor, streamed, in one pass.

    ``finetune`` = m'_s, ``source_base`` = m_s, ``target_base`` = m_t: checkpoint paths (file,
    directory, or sharded directory). Per element in float32 (float64 if an input is float64):
    ``t + α·(f − s)``, rounded once to the target tensor's dtype. Matching, padding, skip/refuse,
    side files and diagnostics: see the module docstring.
    """
    check_args(alpha, on_mismatch)
    f, s, t = open_checkpoint(finetune), open_checkpoint(source_base), open_checkpoint(target_base)
    jobs, skipped, copied, padded = plan_tensors(f, s, t)
    refuse(skipped, on_mismatch)
    report = TransferReport("transfer", float(alpha), skipped=skipped, copied=copied, padded=padded)
    return _execute(report, jobs, out, max_shard_bytes, f, s, t, device, alpha, t.directory, f.directory, "finetune")


def compute_diff(
    finetune: CkptLike,
    base: CkptLike,
    out: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    on_mismatch: OnMismatch = "skip",
    max_shard_bytes: int | None = None,
) -> TransferReport:
    """Write the diff vector ``Δ = m'_s − m_s`` as a checkpoint of float32 tensors.

    Float32 (float64 when an input is float64) keeps Δ exact for 16-bit models, so
    ``apply_diff(t, compute_diff(f, s))`` equals ``transfer(f, s, t)`` bit for bit. One Δ tensor
    per float tensor present in both; when ``m'_s`` has more rows, ``m_s`` is padded with zero rows
    (the new rows of Δ are the fine-tune's rows). Fine-tune-only, base-only, non-float and
    mismatched tensors are listed in ``skipped`` (or refused). The fine-tune's tokenizer files are
    kept beside a directory diff.
    """
    check_args(1.0, on_mismatch)
    f, s = open_checkpoint(finetune), open_checkpoint(base)
    jobs: list[TensorJob] = []
    skipped: list[SkippedTensor] = []
    padded: list[PaddedTensor] = []
    for name in f.names:
        fi = f.info(name)
        if name not in s:
            skipped.append(SkippedTensor(name, "missing_in_base"))
            continue
        si = s.info(name)
        if not (_is_float(fi.dtype) and _is_float(si.dtype)):
            skipped.append(SkippedTensor(name, "non_float", f"fine-tune {fi.dtype}, base {si.dtype}"))
            continue
        cmp = _pair_shapes(fi.shape, si.shape)
        if isinstance(cmp, tuple):
            skipped.append(SkippedTensor(name, cmp[0], cmp[1]))
            continue
        if isinstance(cmp, int):
            padded.append(PaddedTensor(name, si.shape[0], cmp))
        dtype = torch.float64 if torch.float64 in (fi.dtype, si.dtype) else torch.float32
        jobs.append(TensorJob(TensorSpec(name, dtype, fi.shape), name, name, None, si.numel))
    skipped += [SkippedTensor(n, "missing_in_finetune") for n in s.names if n not in f]
    refuse(skipped, on_mismatch)
    report = TransferReport("diff", 1.0, skipped=skipped, padded=padded)
    return _execute(report, jobs, out, max_shard_bytes, f, s, None, device, 1.0, None, f.directory, "finetune")


def apply_diff(
    target_base: CkptLike,
    diff: CkptLike,
    out: str | os.PathLike[str],
    alpha: float = 1.0,
    *,
    device: str | torch.device | None = None,
    on_mismatch: OnMismatch = "skip",
    max_shard_bytes: int | None = None,
) -> TransferReport:
    """Write ``m_t + α Δ`` for every target tensor (Δ from :func:`compute_diff`).

    Per element in float32 (float64 if an input is float64): ``t + α·d``, rounded once to the
    target dtype. A Δ with more rows than ``m_t`` pads ``m_t`` with zero rows; target tensors with no
    Δ (or non-float) are copied unchanged; Δ-only and mismatched tensors are skipped (or refused).
    Config files come from the target's directory, tokenizer files from the diff's directory.
    """
    check_args(alpha, on_mismatch)
    t, d = open_checkpoint(target_base), open_checkpoint(diff)
    jobs, skipped, copied, padded = plan_tensors(d, None, t, plus_role="diff")
    refuse(skipped, on_mismatch)
    report = TransferReport("apply", float(alpha), skipped=skipped, copied=copied, padded=padded)
    return _execute(report, jobs, out, max_shard_bytes, d, None, t, device, alpha, t.directory, d.directory, "diff")
