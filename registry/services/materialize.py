"""Versions as local folders for the weight math.

Local blob store: the folder holds hard links to the blobs (no copy; the math only reads; a
symlink would point outside the folder, which checkpoint readers rightly refuse for shards), or
copies when the work directory is on another filesystem. Other stores: the files are downloaded.
Either way the result looks exactly like the pushed folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sqlalchemy import select

from ..formats.paths import clean_path
from ..models import ModelVersion, VersionFile
from ..storage import HashingWriter
from .context import RegistryContext


def materialize(ctx: RegistryContext, version_id: int, dest: Path) -> Path:
    with ctx.db.read() as s:
        v = s.get(ModelVersion, version_id)
        if v is None:
            raise ValueError(f"no version {version_id}")
        files = [(f.path, f.blob_sha256) for f in s.scalars(select(VersionFile).where(VersionFile.version_id == v.id))]
    dest.mkdir(parents=True, exist_ok=True)
    for path, sha in files:
        target = dest / clean_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        local = ctx.store.local_path(sha)
        if local is not None:
            try:
                os.link(local, target)
            except OSError:
                shutil.copyfile(local, target)
            continue
        writer = HashingWriter(target)
        try:
            for chunk in ctx.store.iter_range(sha):
                writer.write(chunk)
            if writer.close() != sha:
                raise OSError(f"blob {sha} read back with a different hash")
        except BaseException:
            writer.abort()
            raise
    return dest
