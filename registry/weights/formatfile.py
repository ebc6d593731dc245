"""Reading the project's own single-file formats (an RMM basis, a compression plan): safetensors
whose metadata names the format and its version. One reader, so every such file fails the same
way — :class:`CheckpointFormatError` with the path and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointFormatError


def read_format_file(path: str | os.PathLike[str], fmt: str, version: str,
                     what: str) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    """(path, metadata, tensors) of a file of format ``fmt`` at ``version``; ``what`` names the
    kind of file in errors, with its article ("an RMM basis", "a compression plan")."""
    where = Path(path)
    if not where.is_file():
        raise CheckpointFormatError(f"{where}: cannot read {what} file (missing or not a file)")
    try:
        with safe_open(str(where), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            if meta.get("format") != fmt:
                raise CheckpointFormatError(f"{where}: not {what} file (format={meta.get('format')!r})")
            if meta.get("format_version") != version:
                raise CheckpointFormatError(f"{where}: unsupported format_version {meta.get('format_version')!r}")
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except CheckpointFormatError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointFormatError(f"{where}: unreadable safetensors file: {exc}") from exc
    return where, meta, tensors


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
