"""Stored bytes as local files for the weight math.

Local blob store: hard links to the blobs (no copy; the math only reads; a symlink would point
outside the folder, which checkpoint readers rightly refuse for shards), or copies when the work
directory is on another filesystem. Other stores: the files are downloaded and their sha256
checked. A whole version of any storage mode becomes a folder through
:func:`registry.services.derived.materialize`, which uses this for its stored files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..formats.paths import clean_path
from ..storage import HashingWriter
from . import content
from .context import RegistryContext


def link_blobs(ctx: RegistryContext, files: Iterable[tuple[str, str]], dest: Path) -> Path:
    """Place each (relative path, blob sha256) of ``files`` under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for path, sha in files:
        target = dest / clean_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        local = content.local_path(ctx, sha)
        if local is not None and _link_or_copy(local, target):
            continue
        write_checked(target, sha, content.iter_range(ctx, sha))
    return dest


def _link_or_copy(local: Path, target: Path) -> bool:
    """False when the raw object went away meanwhile (released after packing)."""
    try:
        os.link(local, target)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        shutil.copyfile(local, target)
        return True
    except FileNotFoundError:
        target.unlink(missing_ok=True)
        return False


def write_checked(target: Path, sha: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``target``; they must hash to ``sha`` (else nothing is left)."""
    writer = HashingWriter(target)
    try:
        for chunk in chunks:
            writer.write(chunk)
        if writer.close() != sha:
            raise OSError(f"{target.name}: bytes read back with a different hash than {sha}")
    except BaseException:
        writer.abort()
        raise
