"""Garbage collection in process: what ``gc.collect`` removes (abandoned drafts and their claims,
unreferenced old blob rows, old objects with no row) and what it keeps (referenced bytes, young
bytes, live drafts' claims).

``tests/test_gc.py`` and ``tests/test_gc_race.py`` stay: they drive ``registry gc`` and its races
against a running server.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, update

from registry.errors import NotFound
from registry.models import Blob, Draft, utcnow
from registry.services import gc

from .inproc import InProcess, sha, weights_bytes

pytestmark = pytest.mark.services

HOUR = 3600


def _object(reg: InProcess, data: bytes, age_seconds: float) -> str:
    """Bytes in the store with no row (a commit that crashed, bytes written by hand)."""
    digest = hashlib.sha256(data).hexdigest()
    tmp = reg.root / f"obj-{digest[:8]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    reg.ctx.store.put(digest, tmp)
    path = reg.ctx.store.local_path(digest)
    assert path is not None
    t = time.time() - age_seconds
    os.utime(path, (t, t))
    return digest


def _row(reg: InProcess, data: bytes, age_seconds: float, state: str = "ready") -> str:
    """An object with a blob row nothing references, last touched ``age_seconds`` ago."""
    digest = _object(reg, data, age_seconds)
    when = utcnow() - timedelta(seconds=age_seconds)
    with reg.ctx.db.write() as s:
        s.execute(insert(Blob).values(sha256=digest, size=len(data), created_at=when, touched_at=when, state=state))
    return digest


def _age_drafts(reg: InProcess, seconds: float) -> None:
    with reg.ctx.db.write() as s:
        s.execute(update(Draft).values(created_at=utcnow() - timedelta(seconds=seconds)))


def _rows(reg: InProcess) -> set[str]:
    with reg.ctx.db.read() as s:
        return set(s.scalars(select(Blob.sha256)))


def _objects(reg: InProcess) -> set[str]:
    return {o.sha256 for o in reg.ctx.store.list_objects()}


def test_removes_only_unreferenced_old_bytes(reg: InProcess) -> None:
    v = reg.push_weights("m", 1)
    referenced = v.files[0].sha256  # type: ignore[index]
    old_orphan = _object(reg, b"orphan from a crashed commit", 2 * HOUR)
    young_orphan = _object(reg, b"bytes of a commit in flight", 10)
    old_row = _row(reg, b"unreferenced row", 2 * HOUR)
    young_row = _row(reg, b"claimed a minute ago", 60)

    dry = gc.collect(reg.ctx, dry_run=True)
    assert set(dry.removed) == {old_orphan, old_row}
    assert _objects(reg) == {referenced, old_orphan, young_orphan, old_row, young_row}  # nothing touched

    report = gc.collect(reg.ctx)
    assert set(report.removed) == {old_orphan, old_row}
    assert (report.blob_rows_removed, report.objects_removed) == (1, 2)
    assert report.bytes_freed == len(b"orphan from a crashed commit") + len(b"unreferenced row")
    assert _objects(reg) == {referenced, young_orphan, young_row}
    assert _rows(reg) == {referenced, young_row}
    assert reg.ctx.store.read_bytes(referenced) == weights_bytes(1)
    assert gc.collect(reg.ctx).removed == []  # nothing left to do


def test_grace_period_is_configurable(reg: InProcess) -> None:
    young = _object(reg, b"ten seconds old", 10)
    assert gc.collect(reg.ctx).removed == []
    assert gc.collect(reg.ctx, grace_seconds=5).removed == [young]


def test_abandoned_draft_is_removed_with_its_claims(reg: InProcess) -> None:
    kept = weights_bytes(1)
    reg.push_files("a", {"model.safetensors": kept})
    old = reg.draft("m")
    reg.add_bytes(old, "own.safetensors", weights_bytes(2))
    reg.link(old, "kept.safetensors", sha(kept))
    _age_drafts(reg, reg.ctx.settings.draft_ttl_seconds + 60)
    live = reg.draft("m")
    reg.add_bytes(live, "live.safetensors", weights_bytes(3))

    report = gc.collect(reg.ctx)
    assert report.drafts_removed == 1
    with pytest.raises(NotFound):
        reg.get_draft(old)
    assert not (reg.ctx.staging.root / old).exists()
    # the old draft's own claim is gone, the linked blob (a@1's) and the live draft's claim stay
    assert _rows(reg) == {sha(kept), sha(weights_bytes(3))}
    assert reg.commit(live).ref == "m@1"


def test_staging_dir_without_draft_is_removed_after_grace(reg: InProcess) -> None:
    stray = reg.ctx.staging.draft_dir("no-such-draft")
    (stray / "x.part").write_bytes(b"half an upload")
    assert gc.collect(reg.ctx).staging_dirs_removed == 0  # young
    t = time.time() - 2 * HOUR
    os.utime(stray, (t, t))
    assert gc.collect(reg.ctx).staging_dirs_removed == 1
    assert not stray.exists()


def test_bytes_of_archived_versions_are_kept(reg: InProcess) -> None:
    from registry.services import versions

    v = reg.push_weights("m", 1)
    versions.archive(reg.ctx, "m@1", actor="alice")
    with reg.ctx.db.write() as s:  # old enough to go, were it unreferenced
        s.execute(update(Blob).values(touched_at=utcnow() - timedelta(hours=2)))
    path = reg.ctx.store.local_path(v.files[0].sha256)  # type: ignore[index]
    assert path is not None
    t = time.time() - 2 * HOUR
    os.utime(path, (t, t))
    assert gc.collect(reg.ctx).removed == []
    assert reg.ctx.store.exists(v.files[0].sha256)  # type: ignore[index]


def test_row_left_deleting_by_a_dead_gc_is_finished(reg: InProcess) -> None:
    stuck = _row(reg, b"gc died after taking me", 10, state="deleting")
    report = gc.collect(reg.ctx)
    assert report.removed == [stuck]
    assert stuck not in _rows(reg) and stuck not in _objects(reg)
