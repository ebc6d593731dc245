"""Files a version serves without storing them: derived versions and format views.

A version's **native** files are either blobs (``stored``) or generated (``derived:basis``: an
adapter rebuilt from an RMM basis; ``derived:plan``: an adapter rebuilt from a compression plan;
``derived:diff``: a transfer rebuilt as target + α(fine-tune − source)). Any adapter version can
also be served in the **delta** format (dense per-module deltas) and the **merged** format (base +
adapter as full model weights, sharded with an index for large models). Generated files are:

- *defined once*: the first time a (version, format) is asked for (or when a derived version is
  created), the files are generated in full, hashed, and their sha256 and size recorded
  (:class:`registry.models.DerivedFile`); every later response carries that sha256 as ETag and
  checksum, and the ``Content-Length`` is known before a byte is generated;
- *deterministic*: the same inputs give the same bytes (computed on the CPU, fixed order, one
  rounding), so every response is byte-identical, across restarts;
- *streamed*: safetensors files are produced tensor by tensor and row chunk by row chunk from a
  precomputed header (:func:`registry.weights.checkpoint.safetensors_layout`), so memory stays at a
  few chunks; a ``Range`` request computes only the tensors it overlaps;
- *cached*: a complete response is teed into a size-limited on-disk cache keyed by sha256
  (least recently used first out); later requests read the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ..errors import InvalidInput, NotFound
from ..formats.paths import clean_path
from ..models import DerivedFile, ModelVersion, StorageMode, VersionFile
from ..storage.cache import GeneratedCache
from .context import RegistryContext
from .materialize import link_blobs, write_checked
from .sql import insert_ignore

log = logging.getLogger("registry.derived")

FORMATS = ("native", "delta", "merged")
PIECE = 8 << 20  # bytes computed per step of a generated stream
ROWS_BYTES = 8 << 20  # rows of a computed tensor per chunk (in output bytes)

RawRead = Callable[[str, int, int], bytes]  # (tensor name, byte lo, byte hi) -> raw bytes of that slice


# ----------------------------------------------------------------------------- streaming helpers


def _tensor_bytes(t: Any) -> bytes:
    import torch

    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def computed_rows(spec: Any, rows: Callable[[int, int], Any]) -> RawRead:
    """A :data:`RawRead` for a tensor computed row block by row block: ``rows(r0, r1)`` returns rows
    ``[r0, r1)`` already in the output dtype. Any byte range is served by computing only the rows
    it touches (deterministic: each row's value does not depend on the block it is computed in)."""
    itemsize = spec.dtype.itemsize
    row_bytes = max(1, spec.nbytes // max(1, spec.shape[0])) if spec.shape else spec.nbytes

    def read(_name: str, lo: int, hi: int) -> bytes:
        if not spec.shape:
            return _tensor_bytes(rows(0, 1))[lo:hi]
        r0, r1 = lo // row_bytes, -(-hi // row_bytes)
        step = max(1, ROWS_BYTES // row_bytes)
        out = bytearray()
        for a in range(r0, r1, step):
            out += _tensor_bytes(rows(a, min(r1, a + step)))
        base = r0 * row_bytes
        assert itemsize > 0
        return bytes(out[lo - base:hi - base])

    return read


# ----------------------------------------------------------------------------- generators


class Generator(ABC):
    """The files of one (version, format), produced on request."""

    @abstractmethod
    def sizes(self) -> dict[str, int]:
        """File path -> size in bytes (known before generating)."""

    @abstractmethod
    def read_range(self, path: str, start: int, end: int) -> Iterator[bytes]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class StaticFiles(Generator):
    """Files held in memory or on local disk (small generated files, copies of blobs)."""

    def __init__(self, files: dict[str, bytes | Path]) -> None:
        self.files = files

    def sizes(self) -> dict[str, int]:
        return {p: (len(v) if isinstance(v, bytes) else v.stat().st_size) for p, v in self.files.items()}

    def read_range(self, path: str, start: int, end: int) -> Iterator[bytes]:
        v = self.files[path]
        if isinstance(v, bytes):
            yield v[start:end]
            return
        with open(v, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(PIECE, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk


class Composite(Generator):
    """Several generators' files as one set."""

    def __init__(self, parts: list[Generator]) -> None:
        self.parts = parts
        self.owner: dict[str, Generator] = {}
        for g in parts:
            for p in g.sizes():
                self.owner[p] = g

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.parts:
            out.update(g.sizes())
        return out

    def read_range(self, path: str, start: int, end: int) -> Iterator[bytes]:
        return self.owner[path].read_range(path, start, end)

    def close(self) -> None:
        for g in self.parts:
            g.close()


class SafetensorsFiles(Generator):
    """Safetensors files from layouts (plus an optional index) and a raw reader per tensor."""

    def __init__(self, layouts: dict[str, Any], read: RawRead, extra: dict[str, bytes] | None = None) -> None:
        self.layouts = layouts
        self.read = read
        self.extra = extra or {}

    def sizes(self) -> dict[str, int]:
        out = {p: lay.total_size for p, lay in self.layouts.items()}
        out.update({p: len(b) for p, b in self.extra.items()})
        return out

    def read_range(self, path: str, start: int, end: int) -> Iterator[bytes]:
        from ..weights.checkpoint import safetensors_range

        if path in self.extra:
            yield self.extra[path][start:end]
            return
        yield from safetensors_range(self.layouts[path], start, end, self.read, PIECE)


class TensorSource:
    """The tensors of a version, readable slice by slice (a stored checkpoint on local disk)."""

    def __init__(self, folder: Path) -> None:
        from ..weights.checkpoint import open_checkpoint

        self.folder = folder
        self.ck = open_checkpoint(folder)

    def specs(self) -> list[Any]:
        return list(self.ck.specs())

    def raw(self, name: str, lo: int, hi: int) -> bytes:
        info = self.ck.info(name)
        with open(info.file, "rb") as f:
            f.seek(info.start + lo)
            return f.read(hi - lo)

    def rows(self, name: str, r0: int, r1: int) -> Any:
        import torch

        spec = self.ck.info(name)
        row_bytes = spec.nbytes // max(1, spec.shape[0])
        data = bytearray(self.raw(name, r0 * row_bytes, r1 * row_bytes))
        return torch.frombuffer(data, dtype=spec.dtype).reshape(r1 - r0, *spec.shape[1:])

    def close(self) -> None:
        self.ck.close()


def _adapter_for(ctx: RegistryContext, v: ModelVersion, work: Path) -> Any:
    """The LoraAdapter of an adapter version, stored or derived."""
    from ..weights.adapters import load_peft_adapter

    return load_peft_adapter(materialize(ctx, v.id, work / f"adapter-{v.id}"))


def _delta_generator(ctx: RegistryContext, v: ModelVersion, work: Path) -> Generator:
    import torch

    from ..weights.checkpoint import TensorSpec, safetensors_layout

    adapter = _adapter_for(ctx, v, work)
    specs = []
    for name, m in adapter.modules.items():
        shape = (m.in_features, m.out_features) if adapter.fan_in_fan_out else (m.out_features, m.in_features)
        specs.append(TensorSpec(f"{name}.weight", adapter.dtype, shape))
    layout = safetensors_layout(specs, {"format": "delta", "adapter": v.ref})
    readers: dict[str, RawRead] = {}
    for spec in specs:
        m = adapter.modules[spec.name.removesuffix(".weight")]
        if adapter.fan_in_fan_out:  # weight layout (in, out): rows of (B A)^T = A^T[rows] B^T
            def rows(a: int, b: int, m: Any = m) -> Any:
                return (m.A.T[a:b].to(torch.float32) @ m.B.T.to(torch.float32)).to(adapter.dtype)
        else:
            def rows(a: int, b: int, m: Any = m) -> Any:
                return (m.B[a:b].to(torch.float32) @ m.A.to(torch.float32)).to(adapter.dtype)
        readers[spec.name] = computed_rows(spec, rows)
    manifest = json.dumps({"format": "delta", "adapter": v.ref, "modules": sorted(adapter.modules),
                           "note": "W_merged = W_base + delta (same tensor names as the base)"},
                          indent=2, sort_keys=True).encode() + b"\n"
    return SafetensorsFiles({"delta.safetensors": layout}, lambda n, lo, hi: readers[n](n, lo, hi),
                            {"delta_config.json": manifest})


def _merged_generator(ctx: RegistryContext, v: ModelVersion, work: Path) -> Generator:
    import torch

    from ..weights.checkpoint import sharded_layout

    if v.base_version_id is None:
        raise InvalidInput(f"{v.ref} has no base to merge into", code="invalid_format")
    adapter = _adapter_for(ctx, v, work)
    with ctx.db.read() as s:
        base = s.get(ModelVersion, v.base_version_id)
        assert base is not None
        base_folder = work / f"base-{base.id}"
    base_files = [f.path for f in served_files(ctx, base.id)]
    materialize(ctx, base.id, base_folder)
    src = TensorSource(base_folder)
    specs = src.specs()
    lay = sharded_layout(specs, ctx.settings.merged_shard_bytes, {"format": "pt"})
    targets = {f"{name}.weight": m for name, m in adapter.modules.items()}

    def read(name: str, lo: int, hi: int) -> bytes:
        m = targets.get(name)
        if m is None:
            return src.raw(name, lo, hi)
        spec = src.ck.info(name)

        def rows(a: int, b: int) -> Any:
            w = src.rows(name, a, b).to(torch.float32)
            if adapter.fan_in_fan_out:
                d = m.A.T[a:b].to(torch.float32) @ m.B.T.to(torch.float32)
            else:
                d = m.B[a:b].to(torch.float32) @ m.A.to(torch.float32)
            return (w + d).to(spec.dtype)

        return computed_rows(spec, rows)(name, lo, hi)

    extra = {}
    if lay.index is not None:
        extra["model.safetensors.index.json"] = lay.index
    side = {p: base_folder / p for p in base_files if not p.endswith(".safetensors") and not
            p.endswith(".safetensors.index.json")}
    gen = Composite([SafetensorsFiles(dict(lay.files), read, extra), StaticFiles(side)])  # type: ignore[arg-type]
    orig_close = gen.close

    def close() -> None:
        src.close()
        orig_close()

    gen.close = close  # type: ignore[method-assign]
    return gen


# ----------------------------------------------------------------------------- collection members


@dataclass(frozen=True)
class MemberSource:
    """How a pruned member of a collection is rebuilt: its recipe's ``recipe_key`` names the version
    holding the collection's file (one safetensors file: an RMM basis, a compression plan);
    ``load(file)`` reads that file, ``rebuild(loaded, position)`` gives member ``position`` as a
    LoraAdapter (on the CPU, deterministic: the same bytes on every call)."""

    recipe_key: str
    load: Callable[[Path], Any]
    rebuild: Callable[[Any, int], Any]


def _load_basis(file: Path) -> Any:
    from ..weights.rmm import load_basis

    return load_basis(file)


def _load_plan(file: Path) -> Any:
    from ..weights.compress import load_plan

    return load_plan(file)


MEMBER_SOURCES: dict[str, MemberSource] = {
    # x̂_i = μ + U_p C[:, i]
    StorageMode.derived_basis.value: MemberSource("basis_version_id", _load_basis,
                                                  lambda basis, i: basis.reconstruct(i, device="cpu")),
    # member i's blob of the plan decoded (see registry.weights.compress)
    StorageMode.derived_plan.value: MemberSource("plan_version_id", _load_plan, lambda plan, i: plan.reconstruct(i)),
}


def collection_file(ctx: RegistryContext, version_id: int, work: Path) -> Path:
    """The one safetensors file of the version holding a collection (materialised under ``work``)."""
    folder = work / f"collection-{version_id}"
    if not folder.exists():
        materialize(ctx, version_id, folder)
    files = sorted(folder.rglob("*.safetensors"))
    if len(files) != 1:
        raise InvalidInput(f"version {version_id} holds {len(files)} safetensors files, not one collection file",
                           code="invalid_collection")
    return files[0]


def rebuild_members(mode: str, file: Path, positions: list[int], work: Path) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Members ``positions`` of the collection ``file`` as their PEFT files (path -> bytes), one at a
    time: what pruning records and what serving regenerates come from this one function (for a
    basis: :meth:`registry.weights.rmm.RmmBasis.member_files`, which serving streams)."""
    from ..weights.adapters import save_peft_adapter

    src = MEMBER_SOURCES[mode]
    loaded = src.load(file)
    for position in positions:
        if mode == StorageMode.derived_basis.value:  # the bytes _member_generator streams
            yield position, _joined(loaded.member_files(position))
            continue
        out = work / f"member-{position}"
        shutil.rmtree(out, ignore_errors=True)
        save_peft_adapter(src.rebuild(loaded, position), out)
        yield position, {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        shutil.rmtree(out, ignore_errors=True)


def _joined(member: Any) -> dict[str, bytes]:
    """A basis member's PEFT files (:class:`registry.weights.rmm.MemberFiles`) as path -> bytes."""
    from ..weights.adapters import CONFIG_NAME, WEIGHTS_NAME
    from ..weights.checkpoint import safetensors_range

    lay = member.layout
    return {CONFIG_NAME: member.config, WEIGHTS_NAME: b"".join(safetensors_range(lay, 0, lay.total_size, member.read))}


def _member_generator(ctx: RegistryContext, v: ModelVersion, work: Path) -> Generator:
    """A pruned member rebuilt from its collection's file (its other files stay blobs); the
    generated files sit where the pushed adapter's were (the recipe's ``prefix``)."""
    recipe = v.recipe or {}
    file = collection_file(ctx, int(recipe[MEMBER_SOURCES[v.storage_mode].recipe_key]), work)
    prefix = str(recipe.get("prefix") or "")
    if v.storage_mode == StorageMode.derived_basis.value:
        # streamed module by module as its bytes are sent, reading only this member's share of the
        # basis (μ, U, its row of C): the bytes rebuild_members gives, without a folder written and read
        from ..weights.adapters import CONFIG_NAME, WEIGHTS_NAME
        from ..weights.rmm import load_member_files

        member = load_member_files(file, int(recipe["position"]))
        return Composite([SafetensorsFiles({prefix + WEIGHTS_NAME: member.layout}, member.read),
                          StaticFiles({prefix + CONFIG_NAME: member.config})])
    _, files = next(rebuild_members(v.storage_mode, file, [int(recipe["position"])], work / f"rebuilt-{v.id}"))
    return StaticFiles({prefix + p: data for p, data in files.items()})


def plan_transfer_files(ctx: RegistryContext, ids: tuple[int, int, int], alpha: float, work: Path,
                        diagnostics: bool = True) -> Any:
    """The streaming plan of m_t + α (m'_s − m_s) for the versions ``ids`` = (fine-tune, source
    base, target base), any storage mode (materialised under ``work``); ``diagnostics=False``
    (serving) skips the report's base-shift sums."""
    from ..weights.transfer_stream import plan_transfer

    dirs = [materialize(ctx, vid, work / label) for vid, label in zip(ids, ("finetune", "source", "target"),
                                                                        strict=True)]
    return plan_transfer(dirs[0], dirs[1], dirs[2], alpha, max_shard_bytes=ctx.settings.merged_shard_bytes,
                         device="cpu", diagnostics=diagnostics)


class _DiffFiles(Generator):
    """A ``derived:diff`` version's generated files: m_t + α (m'_s − m_s), range by range."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.side = {sf.name: sf.data for sf in plan.side_files if sf.data is not None}

    def sizes(self) -> dict[str, int]:
        return {**self.plan.file_sizes(), **{k: len(d) for k, d in self.side.items()}}

    def read_range(self, path: str, start: int, end: int) -> Iterator[bytes]:
        if path in self.side:
            return iter([self.side[path][start:end]])
        return self.plan.iter_file(path, start, end)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.plan.close()


def _diff_generator(ctx: RegistryContext, v: ModelVersion, work: Path) -> Generator:
    r = v.recipe or {}
    return _DiffFiles(plan_transfer_files(
        ctx, (r["finetune_version_id"], r["source_version_id"], r["target_version_id"]),
        float(r.get("alpha", 1.0)), work, diagnostics=False))


def native_generator(ctx: RegistryContext, v: ModelVersion, work: Path) -> Generator:
    """Generated native files of a derived version (its stored side files are blobs)."""
    if v.storage_mode in MEMBER_SOURCES:
        return _member_generator(ctx, v, work)
    if v.storage_mode == "derived:diff":
        return _diff_generator(ctx, v, work)
    raise InvalidInput(f"{v.ref} is stored, not derived", code="not_derived")


def generator(ctx: RegistryContext, v: ModelVersion, fmt: str, work: Path) -> Generator:
    if fmt == "native":
        return native_generator(ctx, v, work)
    if v.kind != "adapter":
        raise InvalidInput(f"format {fmt!r} is for adapters; {v.ref} is a {v.kind}", code="invalid_format")
    if fmt == "delta":
        return _delta_generator(ctx, v, work)
    if fmt == "merged":
        return _merged_generator(ctx, v, work)
    raise InvalidInput(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", code="invalid_format")


# ----------------------------------------------------------------------------- cache


def cache(ctx: RegistryContext) -> GeneratedCache:
    return GeneratedCache(ctx.settings.resolved_cache_dir, ctx.settings.derived_cache_bytes)


# ----------------------------------------------------------------------------- manifests


@dataclass
class ServedFile:
    path: str
    sha256: str
    size: int
    blob: bool  # True: bytes are a blob in the store; False: generated


def define(ctx: RegistryContext, version_id: int, fmt: str) -> list[ServedFile]:
    """Generate a (version, format)'s files once to learn their sha256 and size; record them."""
    with ctx.db.read() as s:
        v = s.get(ModelVersion, version_id)
        assert v is not None
        s.expunge(v)
    ctx.settings.resolved_work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="define-", dir=ctx.settings.resolved_work_dir))
    rows = []
    try:
        g = generator(ctx, v, fmt, work)
        try:
            c = cache(ctx)
            for path, size in sorted(g.sizes().items()):
                h = hashlib.sha256()
                for _ in c.keep(size, g.read_range(path, 0, size), h):
                    pass
                rows.append({"version_id": version_id, "format": fmt, "path": path, "sha256": h.hexdigest(),
                             "size": size})
        finally:
            g.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with ctx.db.write() as s:
        insert_ignore(s, DerivedFile.__table__, rows)
    return [ServedFile(r["path"], r["sha256"], r["size"], False) for r in rows]


def served_files(ctx: RegistryContext, version_id: int, fmt: str = "native") -> list[ServedFile]:
    """Every file of a version in a format: stored blobs and generated files."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", code="invalid_format")
    with ctx.db.read() as s:
        v = s.get(ModelVersion, version_id)
        if v is None:
            raise NotFound("version not found", code="version_not_found")
        gen = list(s.scalars(select(DerivedFile).where(DerivedFile.version_id == version_id,
                                                       DerivedFile.format == fmt).order_by(DerivedFile.path)))
        stored = [] if fmt != "native" else list(s.scalars(
            select(VersionFile).where(VersionFile.version_id == version_id).order_by(VersionFile.path)))
        needs_define = fmt != "native" and not gen
    if needs_define:
        return define(ctx, version_id, fmt)
    files = [ServedFile(f.path, f.blob_sha256, f.size, True) for f in stored]
    files += [ServedFile(f.path, f.sha256, f.size, False) for f in gen]
    return sorted(files, key=lambda f: f.path)


def materialize(ctx: RegistryContext, version_id: int, dest: Path) -> Path:
    """Any version as a local folder that looks exactly like the pushed one, whatever its storage
    mode: stored files are linked (:func:`registry.services.materialize.link_blobs`), generated
    files are read from the cache or generated, and checked against their recorded sha256. Every
    job input and every derived view reads its inputs through here."""
    files = served_files(ctx, version_id, "native")
    link_blobs(ctx, [(f.path, f.sha256) for f in files if f.blob], dest)
    for f in files:
        if not f.blob:
            target = dest / clean_path(f.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_checked(target, f.sha256, open_generated(ctx, version_id, "native", f, 0, f.size))
    return dest


def open_generated(ctx: RegistryContext, version_id: int, fmt: str, f: ServedFile, start: int,
                   end: int) -> Iterator[bytes]:
    """Bytes [start, end) of a generated file: from the cache, else generated (and, for a full
    response, teed into the cache)."""
    c = cache(ctx)
    cached = c.get(f.sha256)
    if cached is not None:
        yield from StaticFiles({f.path: cached}).read_range(f.path, start, end)
        return
    from ..weights.device import set_cpu_threads

    set_cpu_threads(ctx.settings.torch_threads)
    with ctx.db.read() as s:
        v = s.get(ModelVersion, version_id)
        assert v is not None
        s.expunge(v)
    work = Path(tempfile.mkdtemp(prefix="serve-", dir=c.root))
    try:
        g = generator(ctx, v, fmt, work)
        try:
            stream = g.read_range(f.path, start, end)
            if start == 0 and end == f.size:
                stream = c.tee(f.sha256, f.size, stream)
            yield from stream
        finally:
            g.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
