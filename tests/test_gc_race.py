"""gc running concurrently with commits never removes bytes a commit references (issue: 18 of 40
versions committed `ready` with no bytes when staged files were older than the grace period).

In-process on purpose: the race is between service calls, so threads calling the services
directly make it as likely as it can be, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from sqlalchemy import select

from registry.config import Settings
from registry.models import Blob
from registry.services import drafts, gc, recording
from registry.services.context import RegistryContext

from .conftest import new_pg_database


def _context(tmp_path: Path, backend: str, pg_databases: list[str]) -> RegistryContext:
    url = new_pg_database(pg_databases) if backend == "postgres" else f"sqlite:///{tmp_path / 'registry.db'}"
    settings = Settings(home=tmp_path, database_url=url, gc_grace_seconds=3600, draft_ttl_seconds=24 * 3600,
                        check_finite="off")
    return RegistryContext.open(settings, migrate=True)


def _weights(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({"w": torch.randn(256, 1024, generator=g)})


def _stage(ctx: RegistryContext, name: str, data: bytes) -> str:
    d = drafts.create_draft(ctx, drafts.DraftSpec(model=name, kind="base", base=None, tags={}, aliases=[],
                                                  description="", parents=[]), actor=None)
    src = ctx.settings.home / f"{name}.safetensors"
    src.write_bytes(data)
    drafts.stage_local_file(ctx, d["id"], "model.safetensors", src)
    src.unlink()
    # the staged bytes arrived long ago (a slow push, a draft kept open for hours)
    old = time.time() - 2 * 3600
    for p in (ctx.staging.root / d["id"]).iterdir():
        os.utime(p, (old, old))
    return str(d["id"])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_gc_concurrent_with_commits_loses_nothing(tmp_path: Path, backend: str, pg_databases: list[str]) -> None:
    ctx = _context(tmp_path, backend, pg_databases)
    try:
        n = 40
        payloads = {f"gc-race-{i}": _weights(i) for i in range(n)}
        staged = {name: _stage(ctx, name, data) for name, data in payloads.items()}
        stop = threading.Event()
        gc_runs = 0
        errors: list[BaseException] = []

        def gc_loop() -> None:
            nonlocal gc_runs
            while not stop.is_set():
                try:
                    gc.collect(ctx)
                    gc_runs += 1
                except BaseException as e:  # pragma: no cover - reported below
                    errors.append(e)
                    return

        def commit_all(names: list[str]) -> None:
            for name in names:
                try:
                    recording.commit(ctx, staged[name], actor=None)
                except BaseException as e:  # pragma: no cover - reported below
                    errors.append(e)

        names = sorted(payloads)
        collector = threading.Thread(target=gc_loop)
        committers = [threading.Thread(target=commit_all, args=(names[i::4],)) for i in range(4)]
        collector.start()
        for t in committers:
            t.start()
        for t in committers:
            t.join(300)
        time.sleep(0.2)  # one more gc pass after the last commit
        stop.set()
        collector.join(60)
        assert not errors, errors
        assert gc_runs > 0
        gc.collect(ctx)

        lost = []
        for name, data in payloads.items():
            sha = hashlib.sha256(data).hexdigest()
            if not ctx.store.exists(sha) or ctx.store.read_bytes(sha) != data:
                lost.append(name)
        assert lost == [], f"{len(lost)} of {n} committed versions lost their bytes"
        with ctx.db.read() as s:
            rows = set(s.scalars(select(Blob.sha256)))
        assert {hashlib.sha256(d).hexdigest() for d in payloads.values()} <= rows
    finally:
        ctx.close()


def test_claim_waits_for_gc_and_gc_finishes_what_a_dead_gc_left(tmp_path: Path, pg_databases: list[str]) -> None:
    """A row left ``deleting`` by a gc that died blocks new claims of those bytes until a gc
    finishes the removal; the push that waited then stores its bytes afresh."""
    from sqlalchemy import insert

    from registry.models import BlobState, utcnow

    ctx = _context(tmp_path, "sqlite", pg_databases)
    try:
        data = _weights(7)
        sha = hashlib.sha256(data).hexdigest()
        stale = tmp_path / "stale"
        stale.write_bytes(data[: len(data) // 2])  # what the dead gc had not deleted yet: wrong bytes
        ctx.store.put(sha, stale)
        with ctx.db.write() as s:
            s.execute(insert(Blob).values(sha256=sha, size=len(data), created_at=utcnow(), touched_at=utcnow(),
                                          state=BlobState.deleting.value))
        timer = threading.Timer(0.5, gc.collect, args=(ctx,))
        timer.start()
        t0 = time.monotonic()
        draft = _stage(ctx, "after-gc", data)  # waits until the timer's gc removed object and row
        assert time.monotonic() - t0 >= 0.4
        timer.join()
        recording.commit(ctx, draft, actor=None)
        assert ctx.store.read_bytes(sha) == data
        with ctx.db.read() as s:
            assert s.get(Blob, sha).state == BlobState.ready.value
    finally:
        ctx.close()


def test_aborted_draft_releases_its_claims(tmp_path: Path, pg_databases: list[str]) -> None:
    """An aborted draft leaves no blob row behind; a claim another draft shares stays."""
    ctx = _context(tmp_path, "sqlite", pg_databases)
    try:
        data = _weights(11)
        sha = hashlib.sha256(data).hexdigest()
        first, second = _stage(ctx, "abort-a", data), _stage(ctx, "abort-b", data)
        drafts.abort_draft(ctx, first)
        with ctx.db.read() as s:
            assert s.get(Blob, sha) is not None  # still claimed by the second draft
        drafts.abort_draft(ctx, second)
        with ctx.db.read() as s:
            assert s.get(Blob, sha) is None
        assert not ctx.store.exists(sha)
    finally:
        ctx.close()
