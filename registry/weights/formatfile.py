"""Reading the project's own single-file formats (an RMM basis, a compression plan): safetensors
whose metadata names the format and its version. One reader, so every such file fails the same
way — :class:`CheckpointFormatError` with the path and the reason."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import dtype_from_safetensors
from .errors import CheckpointFormatError


@contextmanager
def _unreadable(where: Path) -> Iterator[None]:
    try:
        yield
    except CheckpointFormatError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointFormatError(f"{where}: unreadable safetensors file: {exc}") from exc


class FormatFile:
    """An open file of one of these formats: ``where``, ``meta`` (its string metadata), ``names``
    (its tensors), and :meth:`shape` / :meth:`tensor` / :meth:`rows` read on demand (the file is
    memory-mapped; nothing is read until asked for). Errors are :class:`CheckpointFormatError`
    with the path and the reason."""

    def __init__(self, path: str | os.PathLike[str], fmt: str, version: str, what: str) -> None:
        self.where = where = Path(path)
        if not where.is_file():
            raise CheckpointFormatError(f"{where}: cannot read {what} file (missing or not a file)")
        with _unreadable(where):
            self._fh: Any = safe_open(str(where), framework="pt")
            self.meta: dict[str, str] = dict(self._fh.metadata() or {})  # type: ignore[no-untyped-call]
            self.names: list[str] = list(self._fh.keys())  # type: ignore[no-untyped-call]
        if self.meta.get("format") != fmt:
            raise CheckpointFormatError(f"{where}: not {what} file (format={self.meta.get('format')!r})")
        if self.meta.get("format_version") != version:
            raise CheckpointFormatError(f"{where}: unsupported format_version {self.meta.get('format_version')!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        with _unreadable(self.where):
            return tuple(int(d) for d in self._fh.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with _unreadable(self.where):
            return dtype_from_safetensors(str(self._fh.get_slice(name).get_dtype()))

    def tensor(self, name: str) -> torch.Tensor:
        with _unreadable(self.where):
            t: torch.Tensor = self._fh.get_tensor(name)
            return t

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``[lo, hi)`` of the first dimension (only their bytes are read)."""
        with _unreadable(self.where):
            t: torch.Tensor = self._fh.get_slice(name)[lo:hi]
            return t


def read_format_file(path: str | os.PathLike[str], fmt: str, version: str,
                     what: str) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    """(path, metadata, tensors) of a file of format ``fmt`` at ``version``; ``what`` names the
    kind of file in errors, with its article ("an RMM basis", "a compression plan")."""
    f = FormatFile(path, fmt, version, what)
    return f.where, f.meta, {key: f.tensor(key) for key in f.names}


def varint(n: int) -> bytes:
    """``n`` ≥ 0 as a LEB128 varint (7 bits a byte, high bit set on all but the last)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
