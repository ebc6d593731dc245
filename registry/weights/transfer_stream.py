"""Transfer outputs as byte streams: the exact files :func:`registry.weights.transfer.transfer`
would write, produced on demand, any byte range at a time.

:func:`plan_transfer` matches tensors exactly as ``transfer`` does (same planning code), computes
the output layout (header bytes, offsets, shards, index) from shapes and dtypes before any tensor
exists, and :meth:`TransferPlan.read` returns the raw bytes ``[lo, hi)`` of one output tensor,
computing only the elements that range covers with the same chunked arithmetic
``t + α·(f − s)`` (float32/float64, one rounding). Elementwise arithmetic means the bytes equal
``transfer``'s output bit for bit, whatever ranges are asked for; memory stays at one chunk.
This is what lets a server keep a transferred model as a recipe and stream it on request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import PIECE, Checkpoint, ShardedLayout, TensorSpec, open_checkpoint, safetensors_range, sharded_layout
from .device import resolve_device
from .errors import WeightsError
from .transfer import (
    FORMAT_META,
    TARGET_FILES,
    TOKENIZER_FILES,
    Engine,
    OnMismatch,
    ResultNotFinite,
    Slot,
    TensorJob,
    TransferReport,
    check_args,
    finish_report,
    patched_config,
    plan_tensors,
    refuse,
)

__all__ = ["SideFile", "TransferPlan", "plan_transfer"]


@dataclass(frozen=True)
class SideFile:
    """A non-weight file of the output: copied from ``source`` (``role`` "target" or "finetune"),
    or, when ``data`` is set, written with that content (``config.json`` with a grown vocab)."""

    name: str
    role: str
    source: Path
    data: bytes | None = None


class _NoWriter:
    """The engine's writer is unused: :meth:`TransferPlan.read` computes chunks directly."""

    def write_range(self, *_: object) -> None:  # pragma: no cover
        raise AssertionError

    def copy_from(self, *_: object) -> None:  # pragma: no cover
        raise AssertionError


@dataclass
class TransferPlan:
    layout: ShardedLayout
    report: TransferReport
    side_files: list[SideFile]
    jobs: dict[str, TensorJob]
    _f: Checkpoint
    _s: Checkpoint
    _t: Checkpoint
    _engine: Engine
    _slot: Slot = field(default_factory=Slot)

    def finish_report(self) -> TransferReport:
        """Complete :attr:`report` (norms, ratios, cosine) once every output tensor was streamed."""
        finish_report(self.report, self._engine.sums, self.report.alpha)
        return self.report

    def file_sizes(self) -> dict[str, int]:
        """Output weight files (and the index when sharded) -> size in bytes."""
        out = {name: lay.total_size for name, lay in self.layout.files.items()}
        if self.layout.index is not None:
            out["model.safetensors.index.json"] = len(self.layout.index)
        return out

    def read(self, name: str, lo: int, hi: int) -> bytes:
        """Raw bytes ``[lo, hi)`` of output tensor ``name`` (as stored in the output file)."""
        job = self.jobs[name]
        if job.plus is None:  # copied unchanged from the target
            assert job.base is not None
            info = self._t.info(job.base)
            with open(info.file, "rb") as fh:
                fh.seek(info.start + lo)
                return fh.read(hi - lo)
        isz = job.out.dtype.itemsize
        e0, e1 = lo // isz, -(-hi // isz)
        dest = torch.empty(e1 - e0, dtype=job.out.dtype)  # each chunk is rounded straight into it
        pos = 0
        for c in self._engine.chunks(job, e0, e1):
            self._engine.read_chunk(c, self._slot)
            try:
                self._engine.compute(c, self._slot, dest[pos:pos + c.n])
            except ResultNotFinite as e:
                self._engine.raise_nonfinite(e.chunk)
            pos += c.n
        skip = lo - e0 * isz
        return dest.view(torch.uint8).numpy()[skip:skip + (hi - lo)].tobytes()

    def iter_file(self, name: str, start: int = 0, end: int | None = None, piece: int = PIECE) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of output file ``name`` (a weight file or the index)."""
        if name == "model.safetensors.index.json" and self.layout.index is not None:
            yield self.layout.index[start:end]
            return
        lay = self.layout.files[name]
        end = lay.total_size if end is None else end
        yield from safetensors_range(lay, start, end, self.read, piece)

    def close(self) -> None:
        for ck in (self._f, self._s, self._t):
            ck.close()


def plan_transfer(
    finetune: str | os.PathLike[str],
    source_base: str | os.PathLike[str],
    target_base: str | os.PathLike[str],
    alpha: float = 1.0,
    *,
    on_mismatch: OnMismatch = "skip",
    max_shard_bytes: int | None = None,
    device: str | torch.device | None = "cpu",
    diagnostics: bool = True,
) -> TransferPlan:
    """Plan ``transfer(finetune, source_base, target_base, out_dir, alpha, max_shard_bytes=...)``
    without writing anything (directory inputs and output). Diagnostics are not computed (they
    need a full pass): ``report`` lists skipped, copied and padded tensors, and
    :meth:`TransferPlan.finish_report` completes it after a full pass; ``diagnostics=False`` skips
    their sums (for serving bytes: the same bytes, less arithmetic per chunk)."""
    check_args(alpha, on_mismatch)
    f, s, t = open_checkpoint(finetune), open_checkpoint(source_base), open_checkpoint(target_base)
    try:
        jobs, skipped, copied, padded = plan_tensors(f, s, t)
        refuse(skipped, on_mismatch)
        report = TransferReport("transfer", float(alpha), skipped=skipped, copied=copied, padded=padded)
        layout = sharded_layout([j.out for j in jobs], max_shard_bytes, FORMAT_META)
        report.tensors = len(jobs)
        report.applied = sum(1 for j in jobs if j.plus is not None)
        report.bytes_written = layout.total_size
    except BaseException:
        for ck in (f, s, t):
            ck.close()
        raise
    side: list[SideFile] = []
    if t.directory is not None:
        for fname in TARGET_FILES:
            src = t.directory / fname
            if src.is_file():
                data = patched_config(src, report) if fname == "config.json" and report.padded else None
                side.append(SideFile(fname, "target", src, data))
                report.side_files[fname] = "target"
    if f.directory is not None:
        for fname in TOKENIZER_FILES:
            src = f.directory / fname
            if src.is_file():
                side.append(SideFile(fname, "finetune", src))
                report.side_files[fname] = "finetune"
    names = {n for n in layout.files}
    if layout.index is not None:
        names.add("model.safetensors.index.json")
    if any(sf.name in names for sf in side):
        raise WeightsError("a side file collides with a weight file name")
    report.files = sorted(names) + sorted(sf.name for sf in side)
    engine = Engine(resolve_device(device), float(alpha), f, s, t, _NoWriter())  # type: ignore[arg-type]
    engine.diagnostics = diagnostics
    return TransferPlan(layout, report, side, {j.out.name: j for j in jobs}, f, s, t, engine)


def tensor_index(plan: TransferPlan) -> dict[str, list[object]]:
    """name -> [safetensors dtype, shape, file] of the planned output (the registry's index)."""
    from .checkpoint import dtype_to_safetensors

    out: dict[str, list[object]] = {}
    for fname, lay in plan.layout.files.items():
        for n in lay.order:
            spec: TensorSpec = lay.specs[n]
            out[n] = [dtype_to_safetensors(spec.dtype), list(spec.shape), fname]
    return out

