"""`registry gc`: removes unreferenced and orphaned blobs older than the grace period, never
referenced or young ones."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert

from registry.models import Blob, utcnow

from .conftest import Server


def _object(server: Server, data: bytes, age_seconds: float) -> str:
    sha = hashlib.sha256(data).hexdigest()
    p = server.blob_dir / "sha256" / sha[:2] / sha[2:4] / sha
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    t = time.time() - age_seconds
    os.utime(p, (t, t))
    return sha


def _gc(server: Server, *args: str) -> dict[str, object]:
    p = subprocess.run([sys.executable, "-m", "registry", "gc", "--json", *args], env=server.env,
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def test_gc_removes_only_unreferenced_old_blobs(sqlite_server: Server, demo: dict[str, Path], name: str,
                                                tmp_path: Path) -> None:
    srv = sqlite_server
    with srv.client() as rc:
        v = rc.push(demo["base"], name)
    referenced = {f.sha256 for f in v.files}
    old_orphan = _object(srv, b"orphan from a crashed commit", 2 * 3600)
    young_orphan = _object(srv, b"bytes of a commit in flight", 10)
    # an old blob row nothing references (e.g. left by a purge), with its object
    unref = _object(srv, b"unreferenced row", 2 * 3600)
    engine = create_engine(srv.database_url)
    with engine.begin() as c:
        old = utcnow() - timedelta(hours=2)
        c.execute(insert(Blob).values(sha256=unref, size=16, created_at=old, touched_at=old))
    engine.dispose()

    dry = _gc(srv, "--dry-run")
    assert set(dry["removed"]) == {old_orphan, unref}
    assert {old_orphan, young_orphan, unref} <= srv.blob_files()

    report = _gc(srv)
    assert set(report["removed"]) == {old_orphan, unref}
    assert report["blob_rows_removed"] == 1 and report["objects_removed"] == 2
    files = srv.blob_files()
    assert old_orphan not in files and unref not in files
    assert young_orphan in files and referenced <= files
    with srv.client() as rc:
        rc.pull(v.ref, tmp_path / "out")  # still complete
    assert _gc(srv)["removed"] == []
