"""Streamed safetensors checkpoints: lazy reading, header-first writing, sharding.

A *checkpoint* is a single ``.safetensors`` file, or a directory holding ``model.safetensors`` or a
sharded ``model.safetensors.index.json`` plus its shards. :func:`open_checkpoint` reads only the
headers (names, dtypes, shapes, byte offsets); tensor bytes are read one tensor (or one chunk of a
tensor) at a time, so memory stays at a few tensors whatever the model size.

Writing layout (chosen to match ``safetensors.torch.save_file`` byte for byte):

* 8-byte little-endian header length ``n``, then ``n`` bytes of compact JSON, padded with spaces
  to a multiple of 8, then the tensor data back to back with no gaps;
* JSON: ``"__metadata__"`` first when metadata is given (keys **sorted**), then one entry per
  tensor ``{"dtype":..,"shape":[..],"data_offsets":[begin,end]}`` in data order;
* data order: descending dtype alignment rank (safetensors' ``Dtype`` enum order: U64, I64, F64,
  C64, F32, U32, I32, BF16, F16, U16, I16, F8_E5M2FNUZ, F8_E4M3FNUZ, F8_E8M0, F8_E4M3, F8_E5M2,
  I8, U8, BOOL), then tensor name (bytewise).

The only difference from ``save_file``: with two or more metadata keys ``save_file`` emits them
in Rust ``HashMap`` order, which changes from run to run; here they are sorted, so the output is
deterministic. With zero or one metadata key the bytes are identical (tested).

Because the header depends only on (name, dtype, shape, metadata), :func:`safetensors_layout` gives
the exact header bytes and total file length before any tensor exists (a server can send
``Content-Length`` first), :func:`safetensors_range` streams any byte range of such a file from a
reader of tensor bytes (the one streamer of generated safetensors files), and
:class:`SafetensorsWriter` accepts tensors one at a time, in any order, written at their
precomputed offsets.
:class:`ShardedWriter` does the same for a ``model-0000i-of-0000n.safetensors`` set plus
``model.safetensors.index.json``.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open

from . import jsonfile
from .errors import CheckpointFormatError, ShapeMismatchError, WeightsError
from .safetensors_header import HeaderError, parse_header

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "Checkpoint",
    "CheckpointOutput",
    "SafetensorsLayout",
    "SafetensorsWriter",
    "ShardedLayout",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "dtype_from_safetensors",
    "dtype_to_safetensors",
    "iter_safetensors_bytes",
    "open_checkpoint",
    "read_header",
    "safetensors_layout",
    "safetensors_range",
    "sharded_layout",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PIECE = 8 << 20  # at most this many tensor bytes per read of a streamed range
_MAX_HEADER = 100_000_000  # same limit as the safetensors reader

if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian on disk
    raise ImportError("registry.weights.checkpoint assumes a little-endian host")

# safetensors dtype code -> torch dtype, listed in *ascending* serializer rank (Rust enum order).
_ST_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("BOOL", torch.bool),
    ("U8", torch.uint8),
    ("I8", torch.int8),
    ("F8_E5M2", torch.float8_e5m2),
    ("F8_E4M3", torch.float8_e4m3fn),
    ("F8_E8M0", torch.float8_e8m0fnu),
    ("F8_E4M3FNUZ", torch.float8_e4m3fnuz),
    ("F8_E5M2FNUZ", torch.float8_e5m2fnuz),
    ("I16", torch.int16),
    ("U16", torch.uint16),
    ("F16", torch.float16),
    ("BF16", torch.bfloat16),
    ("I32", torch.int32),
    ("U32", torch.uint32),
    ("F32", torch.float32),
    ("C64", torch.complex64),
    ("F64", torch.float64),
    ("I64", torch.int64),
    ("U64", torch.uint64),
)
_RANK: dict[str, int] = {code: i for i, (code, _) in enumerate(_ST_DTYPES)}
_TO_TORCH: dict[str, torch.dtype] = dict(_ST_DTYPES)
_TO_CODE: dict[torch.dtype, str] = {dt: code for code, dt in _ST_DTYPES}


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    """The safetensors dtype code (``"F32"``, ``"BF16"``...) of a torch dtype."""
    try:
        return _TO_CODE[dtype]
    except KeyError:
        raise WeightsError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_from_safetensors(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    try:
        return _TO_TORCH[code]
    except KeyError:
        raise CheckpointFormatError(f"unsupported safetensors dtype {code!r}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor: all a header needs."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @staticmethod
    def of(name: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec of an existing tensor."""
        return TensorSpec(name, tensor.dtype, tuple(int(d) for d in tensor.shape))


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor inside a checkpoint: its spec plus the file and absolute byte offset of its data."""

    file: Path = Path()
    start: int = 0


def _itemsize(dtype: torch.dtype) -> int:
    return int(dtype.itemsize)


# --------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class SafetensorsLayout:
    """The exact byte layout of one safetensors file.

    ``header`` is the full prefix (8-byte length + padded JSON); tensor ``name`` occupies bytes
    ``[len(header) + offsets[name][0], len(header) + offsets[name][1])``; ``total_size`` is the
    file length. ``order`` lists the names in data order.
    """

    header: bytes
    order: tuple[str, ...]
    specs: Mapping[str, TensorSpec]
    offsets: Mapping[str, tuple[int, int]]
    total_size: int

    @property
    def data_start(self) -> int:
        return len(self.header)


def _json_str(s: str) -> str:
    # Same escaping as serde_json: \" \\ \b \f \n \r \t, other controls as \u00xx, rest raw UTF-8.
    return json.dumps(s, ensure_ascii=False)


def _check_spec(spec: TensorSpec) -> None:
    if not isinstance(spec.name, str) or spec.name == "__metadata__":
        raise WeightsError(f"invalid tensor name {spec.name!r}")
    try:
        spec.name.encode("utf-8")
    except UnicodeEncodeError:
        raise WeightsError(f"tensor name {spec.name!r} is not valid UTF-8") from None
    dtype_to_safetensors(spec.dtype)
    if any((not isinstance(d, int)) or d < 0 for d in spec.shape):
        raise WeightsError(f"invalid shape {spec.shape!r} for tensor {spec.name!r}")


def safetensors_layout(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> SafetensorsLayout:
    """Compute header bytes, data order, offsets and total length of a safetensors file.

    Nothing is written; the result depends only on (name, dtype, shape) per tensor and the
    metadata, so it is known before any tensor is computed. Order: descending safetensors dtype
    rank, then name; offsets are cumulative byte sizes (``numel * itemsize``) in that order;
    the JSON is padded with spaces to a multiple of 8 bytes. Total = 8 + header + sum of sizes.
    """
    items: dict[str, TensorSpec] = {}
    for spec in specs:
        _check_spec(spec)
        if spec.name in items:
            raise WeightsError(f"duplicate tensor name {spec.name!r}")
        items[spec.name] = TensorSpec(spec.name, spec.dtype, tuple(spec.shape))
    order = sorted(items, key=lambda n: (-_RANK[dtype_to_safetensors(items[n].dtype)], n))
    parts: list[str] = []
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise WeightsError("safetensors metadata must map str to str")
        meta = ",".join(f"{_json_str(k)}:{_json_str(metadata[k])}" for k in sorted(metadata))
        parts.append(f'"__metadata__":{{{meta}}}')
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name in order:
        spec = items[name]
        end = pos + spec.nbytes
        offsets[name] = (pos, end)
        shape = ",".join(str(d) for d in spec.shape)
        parts.append(
            f'{_json_str(name)}:{{"dtype":"{dtype_to_safetensors(spec.dtype)}",'
            f'"shape":[{shape}],"data_offsets":[{pos},{end}]}}'
        )
        pos = end
    body = ("{" + ",".join(parts) + "}").encode("utf-8")
    body += b" " * ((8 - len(body) % 8) % 8)
    header = len(body).to_bytes(8, "little") + body
    return SafetensorsLayout(
        header=header,
        order=tuple(order),
        specs=items,
        offsets=offsets,
        total_size=len(header) + pos,
    )


def _as_bytes_tensor(tensor: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ShapeMismatchError(
            f"tensor {spec.name!r}: got {tensor.dtype} {tuple(tensor.shape)}, declared {spec.dtype} {spec.shape}"
        )
    return tensor.detach().to("cpu").contiguous()


def _raw_view(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory (caller keeps ``tensor`` alive)."""
    n = tensor.numel() * tensor.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * n).from_address(tensor.data_ptr())).cast("B")


def safetensors_range(
    layout: SafetensorsLayout, start: int, end: int, read: Callable[[str, int, int], bytes], piece: int = PIECE
) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of the file ``layout`` describes. Tensor bytes come from ``read(name,
    lo, hi)`` (bytes ``[lo, hi)`` of tensor ``name`` as stored), in pieces of at most ``piece``
    bytes, and only for the tensors the range overlaps: a range computes nothing it does not cover."""
    header = layout.header
    if start < len(header):
        yield header[start:min(end, len(header))]
    ds = len(header)
    for name in layout.order:
        b, e = layout.offsets[name]
        fb, fe = ds + b, ds + e
        if fe <= start or fb >= end or fe == fb:
            continue
        lo, hi = max(start, fb) - fb, min(end, fe) - fb
        for p in range(lo, hi, piece):
            yield read(name, p, min(hi, p + piece))


def iter_safetensors_bytes(layout: SafetensorsLayout, get: Callable[[str], torch.Tensor]) -> Iterator[bytes]:
    """Yield the file's bytes for streaming (e.g. an HTTP body of length ``layout.total_size``):
    the header, then ``get(name)`` for each name in ``layout.order``, validated against its spec
    (one piece per tensor, through :func:`safetensors_range`). Only one tensor is held at a time."""
    for name in layout.order:  # tensors without bytes are never read below: check them here
        if layout.specs[name].nbytes == 0:
            _as_bytes_tensor(get(name), layout.specs[name])
    held: dict[str, torch.Tensor] = {}

    def read(name: str, lo: int, hi: int) -> bytes:
        if name not in held:
            held.clear()
            held[name] = _as_bytes_tensor(get(name), layout.specs[name])
        return bytes(_raw_view(held[name])[lo:hi])

    whole = max((spec.nbytes for spec in layout.specs.values()), default=0)
    yield from safetensors_range(layout, 0, layout.total_size, read, piece=max(1, whole))


# --------------------------------------------------------------------------------------- writers


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, header first.

    ``SafetensorsWriter(path, specs, metadata)`` computes the :class:`SafetensorsLayout`, writes the
    header to a temporary file beside ``path`` and sizes it; each :meth:`write` (or sequence of
    :meth:`write_range` calls) puts a tensor at its precomputed offset, in any tensor order; dtype
    and shape are checked against the declaration. :meth:`close` checks that every tensor was
    fully written and atomically renames the file into place; on error (or :meth:`abort`) the
    temporary file is removed, so a partial file is never visible under ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.layout = safetensors_layout(specs, metadata)
        self._done: dict[str, int] = dict.fromkeys(self.layout.order, 0)  # bytes written per tensor
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._fd: int | None = fd
        self._tmp = Path(tmp)
        try:
            _pwrite_all(fd, memoryview(self.layout.header), 0)
            os.ftruncate(fd, self.layout.total_size)
        except BaseException:
            self.abort()
            raise

    @property
    def bytes_written(self) -> int:
        return self.layout.total_size

    def _locate(self, name: str) -> tuple[TensorSpec, int]:
        if self._fd is None:
            raise WeightsError(f"writer for {self.path} is closed")
        spec = self.layout.specs.get(name)
        if spec is None:
            raise WeightsError(f"tensor {name!r} was not declared for {self.path.name}")
        return spec, self.layout.data_start + self.layout.offsets[name][0]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name`` (dtype and shape must equal the declaration)."""
        spec, start = self._locate(name)
        if self._done[name]:
            raise WeightsError(f"tensor {name!r} written twice")
        t = _as_bytes_tensor(tensor, spec)
        assert self._fd is not None
        _pwrite_all(self._fd, _raw_view(t), start)
        self._done[name] = spec.nbytes

    def write_range(self, name: str, first: int, chunk: torch.Tensor) -> None:
        """Write flat elements ``[first, first + chunk.numel())`` of tensor ``name``.

        Chunks of one tensor must come in order and without gaps (``first`` equals the number of
        elements already written); this lets a tensor be produced piece by piece."""
        spec, start = self._locate(name)
        item = _itemsize(spec.dtype)
        if chunk.dtype != spec.dtype:
            raise ShapeMismatchError(f"tensor {name!r}: chunk dtype {chunk.dtype}, declared {spec.dtype}")
        if first * item != self._done[name] or (first + chunk.numel()) * item > spec.nbytes:
            raise WeightsError(f"tensor {name!r}: chunk at element {first} is out of order or too long")
        t = chunk.detach().to("cpu").contiguous()
        assert self._fd is not None
        _pwrite_all(self._fd, _raw_view(t), start + first * item)
        self._done[name] += t.numel() * item

    def copy_from(self, name: str, src_file: Path, src_start: int) -> None:
        """Copy the raw bytes of tensor ``name`` from ``src_file`` at byte ``src_start`` (no decode;
        ``os.copy_file_range`` when the platform has it)."""
        spec, start = self._locate(name)
        if self._done[name]:
            raise WeightsError(f"tensor {name!r} written twice")
        assert self._fd is not None
        left, src_off, dst_off = spec.nbytes, src_start, start
        with open(src_file, "rb", buffering=0) as src:
            sfd = src.fileno()
            if hasattr(os, "copy_file_range"):
                try:
                    while left:
                        n = os.copy_file_range(sfd, self._fd, left, src_off, dst_off)
                        if n == 0:
                            raise CheckpointFormatError(f"{src_file}: unexpected end of file")
                        left, src_off, dst_off = left - n, src_off + n, dst_off + n
                except OSError:
                    pass  # fall back to read/write below for whatever is left
            buf = bytearray(min(left, 8 << 20))
            while left:
                n = os.preadv(sfd, [memoryview(buf)[: min(left, len(buf))]], src_off)
                if n == 0:
                    raise CheckpointFormatError(f"{src_file}: unexpected end of file")
                _pwrite_all(self._fd, memoryview(buf)[:n], dst_off)
                left, src_off, dst_off = left - n, src_off + n, dst_off + n
        self._done[name] = spec.nbytes

    def close(self) -> Path:
        """Check completeness and move the file into place; returns the final path."""
        if self._fd is None:
            return self.path
        missing = [n for n in self.layout.order if self._done[n] != self.layout.specs[n].nbytes]
        if missing:
            self.abort()
            raise WeightsError(f"{self.path.name}: tensors not (fully) written: {missing[:10]}")
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Discard the temporary file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class ShardedLayout:
    """How a checkpoint is split: ``files`` maps file name -> its layout (in shard order);
    ``index`` is the exact ``model.safetensors.index.json`` content (``None`` for one file)."""

    files: Mapping[str, SafetensorsLayout]
    weight_map: Mapping[str, str]
    index: bytes | None

    @property
    def total_size(self) -> int:
        return sum(x.total_size for x in self.files.values()) + len(self.index or b"")


def sharded_layout(
    specs: Sequence[TensorSpec],
    max_shard_bytes: int | None,
    metadata: Mapping[str, str] | None = None,
) -> ShardedLayout:
    """Split ``specs`` (in the given order) into shards of at most ``max_shard_bytes`` tensor bytes.

    Greedy, like ``huggingface_hub.split_torch_state_dict_into_shards``: a tensor goes to the
    current shard unless that would exceed the limit, then a new shard starts; a tensor larger
    than the limit gets a shard of its own. One shard -> ``model.safetensors`` and no index;
    otherwise ``model-0000i-of-0000n.safetensors`` plus an index
    ``{"metadata": {"total_size": sum of tensor bytes}, "weight_map": {name: file}}`` written with
    ``json.dumps(indent=2, sort_keys=True) + "\\n"``.
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise WeightsError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if max_shard_bytes is not None and groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        lay = safetensors_layout(groups[0], metadata)
        return ShardedLayout({SINGLE_NAME: lay}, dict.fromkeys(lay.order, SINGLE_NAME), None)
    n = len(groups)
    files: dict[str, SafetensorsLayout] = {}
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        files[fname] = safetensors_layout(group, metadata)
        for spec in group:
            if spec.name in weight_map:
                raise WeightsError(f"duplicate tensor name {spec.name!r}")
            weight_map[spec.name] = fname
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    return ShardedLayout(files, weight_map, text.encode("utf-8"))


class ShardedWriter:
    """Write a checkpoint directory (one file or shards + index) tensor by tensor.

    Same contract as :class:`SafetensorsWriter` (declared specs, any order, atomic per file); the
    index is written last, on :meth:`close`, so a reader never sees an index whose shards are
    incomplete.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        max_shard_bytes: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.layout = sharded_layout(specs, max_shard_bytes, metadata)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, SafetensorsWriter] = {}
        try:
            for fname, lay in self.layout.files.items():
                self._writers[fname] = SafetensorsWriter(
                    self.out_dir / fname, (lay.specs[n] for n in lay.order), metadata
                )
        except BaseException:
            self.abort()
            raise

    @property
    def files(self) -> list[str]:
        return list(self.layout.files) + ([INDEX_NAME] if self.layout.index is not None else [])

    @property
    def bytes_written(self) -> int:
        return self.layout.total_size

    def writer_for(self, name: str) -> SafetensorsWriter:
        """The single-file writer that holds tensor ``name``."""
        try:
            return self._writers[self.layout.weight_map[name]]
        except KeyError:
            raise WeightsError(f"tensor {name!r} was not declared") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer_for(name).write(name, tensor)

    def write_range(self, name: str, first: int, chunk: torch.Tensor) -> None:
        self.writer_for(name).write_range(name, first, chunk)

    def copy_from(self, name: str, src_file: Path, src_start: int) -> None:
        self.writer_for(name).copy_from(name, src_file, src_start)

    def close(self) -> list[Path]:
        paths: list[Path] = []
        try:
            for w in self._writers.values():
                paths.append(w.close())
        except BaseException:
            self.abort()
            raise
        if self.layout.index is not None:
            idx = self.out_dir / INDEX_NAME
            tmp = idx.with_name(f".{INDEX_NAME}.tmp")
            tmp.write_bytes(self.layout.index)
            os.replace(tmp, idx)
            paths.append(idx)
        return paths

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------- reading


def read_header(path: Path) -> tuple[dict[str, str] | None, list[TensorInfo]]:
    """Parse and validate one safetensors header (no tensor bytes are read) with the one header
    parser (:mod:`registry.weights.safetensors_header`, the same the push validates uploads with).

    Returns the ``__metadata__`` mapping (or ``None``) and the tensors in data order. A dtype
    torch cannot hold (``F4``, ``F6_*``) is refused here by name: the file is valid, the math
    cannot read it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:

            def read_at(offset: int, length: int) -> bytes:
                f.seek(offset)
                return f.read(length)

            header = parse_header(read_at, size, max_header_bytes=_MAX_HEADER)
    except HeaderError as e:
        raise CheckpointFormatError(f"{path}: {e.reason}") from None
    except OSError as e:
        raise CheckpointFormatError(f"cannot read {path}: {e}") from e
    infos = [TensorInfo(t.name, dtype_from_safetensors(t.dtype), t.shape, file=path,
                        start=header.data_start + t.begin) for t in header.in_data_order()]
    return header.metadata, infos


class Checkpoint:
    """A lazily opened checkpoint: headers in memory, tensor bytes read on demand.

    ``names`` are in storage order (shard by shard, by offset), which makes a pass over all
    tensors read each file sequentially. :meth:`get` loads one whole tensor through
    ``safetensors.safe_open`` (the file is closed again right away, so pages it mapped are
    released with the tensor); :meth:`read_into` reads a flat element range with ``pread`` into a
    caller buffer (no mapping at all: what the streaming math uses).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.directory: Path | None = self.path if self.path.is_dir() else None
        self.metadata: dict[str, str] | None = None
        self._infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        if self.directory is not None:
            index = self.path / INDEX_NAME
            single = self.path / SINGLE_NAME
            if index.exists():
                self._open_index(index)
            elif single.exists():
                self._open_files([single])
            else:
                found = sorted(p.name for p in self.path.glob("*.safetensors"))[:5]
                raise CheckpointFormatError(
                    f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}" + (f" (found {', '.join(found)})" if found else "")
                )
        elif self.path.is_file():
            self._open_files([self.path])
        else:
            raise CheckpointFormatError(f"checkpoint {self.path} does not exist")
        self.files: tuple[Path, ...] = tuple(dict.fromkeys(i.file for i in self._infos.values()))

    def _open_files(self, files: list[Path]) -> None:
        for file in files:
            meta, infos = read_header(file)
            if self.metadata is None:
                self.metadata = meta
            for info in infos:
                if info.name in self._infos:
                    other = self._infos[info.name].file.name
                    raise CheckpointFormatError(f"tensor {info.name!r} appears in both {other} and {file.name}")
                self._infos[info.name] = info

    def _open_index(self, index: Path) -> None:
        try:
            doc = jsonfile.parse(index.read_bytes(), object_pairs_hook=jsonfile.no_duplicate_keys)
        except (OSError, jsonfile.JsonError) as e:
            raise CheckpointFormatError(f"{index}: not a valid index JSON ({e})") from e
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointFormatError(f"{index}: missing or malformed 'weight_map'")
        root = self.path.resolve()
        shards: list[Path] = []
        for fname in dict.fromkeys(wm.values()):
            p = (self.path / fname).resolve()
            if p.parent != root:
                raise CheckpointFormatError(f"{index}: shard {fname!r} is outside the checkpoint")
            if not p.is_file():
                raise CheckpointFormatError(f"{index}: shard {fname!r} is missing")
            shards.append(self.path / fname)
        self._open_files(shards)
        for name, fname in wm.items():
            info = self._infos.get(name)
            if info is None or info.file.name != fname:
                raise CheckpointFormatError(f"{index}: tensor {name!r} is not in shard {fname!r}")
        extra = [n for n in self._infos if n not in wm]
        if extra:
            raise CheckpointFormatError(f"{index}: tensors in shards but not in weight_map: {extra[:5]}")
        meta = doc.get("metadata")
        self.metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None

    # -- metadata only
    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: no tensor {name!r}") from None

    def specs(self) -> list[TensorSpec]:
        """Name, dtype, shape of every tensor, in storage order."""
        return [TensorSpec(i.name, i.dtype, i.shape) for i in self._infos.values()]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # -- data
    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load tensor ``name`` (one ``safe_open`` per call; nothing else is loaded)."""
        info = self.info(name)
        with safe_open(str(info.file), framework="pt", device="cpu") as f:
            t: torch.Tensor = f.get_tensor(name)
        return t if torch.device(device).type == "cpu" else t.to(device)

    def read_into(self, name: str, out: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Read flat elements ``[first, first + out.numel())`` of ``name`` into ``out`` (a contiguous
        CPU tensor of the same dtype) with ``pread``; returns ``out``."""
        info = self.info(name)
        if out.dtype != info.dtype or out.device.type != "cpu" or not out.is_contiguous():
            raise WeightsError(f"read_into({name!r}): need a contiguous CPU {info.dtype} buffer")
        item = out.element_size()
        if first < 0 or first + out.numel() > info.numel:
            raise WeightsError(f"read_into({name!r}): range beyond {info.numel} elements")
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view, off = _raw_view(out), info.start + first * item
        while len(view):
            n = os.preadv(fd, [view], off)
            if n == 0:
                raise CheckpointFormatError(f"{info.file}: unexpected end of file reading {name!r}")
            view, off = view[n:], off + n
        return out

    def close(self) -> None:
        """Close file descriptors opened by :meth:`read_into`."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self)}, files={len(self.files)})"


def open_checkpoint(path: str | os.PathLike[str] | Checkpoint) -> Checkpoint:
    """Open a checkpoint (file, directory with ``model.safetensors``, or sharded directory)."""
    return path if isinstance(path, Checkpoint) else Checkpoint(path)


class CheckpointOutput:
    """Where a derived checkpoint is written, made visible only when complete.

    ``out`` ending in ``.safetensors`` -> one bare file (:class:`SafetensorsWriter`). Otherwise a
    directory (``model.safetensors``, or shards + index when ``max_shard_bytes`` is exceeded) built
    in a temporary sibling directory, with any extra files (:meth:`add_file`), and renamed onto
    ``out`` by :meth:`finish`; ``out`` must not exist or be an empty directory. :meth:`abort`
    removes everything written. ``writer`` takes the tensors (any order, chunks in order).
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        max_shard_bytes: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.out = Path(out)
        self.tmp: Path | None = None
        self.writer: ShardedWriter | SafetensorsWriter
        if self.out.suffix == ".safetensors":
            if max_shard_bytes is not None:
                raise WeightsError("max_shard_bytes needs a directory output, not a .safetensors file")
            self.writer = SafetensorsWriter(self.out, specs, metadata)
            return
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise WeightsError(f"output {self.out} already exists and is not an empty directory")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp"))
        try:
            self.writer = ShardedWriter(self.tmp, specs, max_shard_bytes, metadata)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    @property
    def is_dir(self) -> bool:
        return self.tmp is not None

    def add_file(self, src: Path, name: str, data: bytes | None = None) -> None:
        """Copy ``src`` (or write ``data``) as ``name`` into the output directory."""
        if self.tmp is None:
            raise WeightsError("extra files need a directory output")
        if data is None:
            shutil.copyfile(src, self.tmp / name)
        else:
            (self.tmp / name).write_bytes(data)

    def finish(self) -> list[str]:
        """Close the writer and move the output into place; returns the file names written."""
        if isinstance(self.writer, SafetensorsWriter):
            self.writer.close()
            return [self.out.name]
        names = [p.name for p in self.writer.close()]
        assert self.tmp is not None
        extra = sorted(p.name for p in self.tmp.iterdir() if p.name not in names)
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        self.tmp = None
        return names + extra

    def abort(self) -> None:
        """Discard everything written so far."""
        self.writer.abort()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
