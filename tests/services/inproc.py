"""The in-process harness: a real :class:`RegistryContext` driven by direct calls, no HTTP, no
subprocess, no broker.

Jobs reach "the broker" through ``ctx.job_sender`` exactly as in the API and the dispatcher; here
the sender only records the job id (and hands back a task id, so the job is marked sent like a
real one). :meth:`InProcess.run_sent` then runs each recorded job on this thread with the runner's
``run(ctx, job_id, worker)``, which is what a Celery worker does with the id it receives.

Pushes go through the public functions of :mod:`registry.services.drafts` and nowhere else, so a
change of where those functions live touches this file only.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import select

from registry.demo import Shape, make_adapter, make_base, make_finetune, random_weights, save_checkpoint
from registry.models import Job, JobState
from registry.services import dispatcher, drafts, jobs, recording, runner, uploads
from registry.services.context import RegistryContext
from registry.services.views import VersionView

WORKER = "inproc@test"
# Small enough that a basis or a transfer takes a fraction of a second on one CPU thread.
TINY = Shape(vocab=32, hidden=16, intermediate=32, layers=1)
RANK = 4


def weights_bytes(seed: int = 0, names: Iterable[str] = ("w",), shape: tuple[int, ...] = (4, 4)) -> bytes:
    """A small safetensors file, in memory (distinct bytes per seed)."""
    g = torch.Generator().manual_seed(seed)
    return save_safetensors({n: torch.randn(shape, generator=g) for n in names}, metadata={"format": "pt"})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _chunks(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@dataclass
class InProcess:
    ctx: RegistryContext
    backend: str  # "sqlite" | "postgres"
    root: Path  # scratch space of the test (model folders built here)
    sent: list[int] = field(default_factory=list)  # job ids handed to the "broker", in order

    # ----------------------------------------------------------------- jobs

    def send(self, job_id: int, queue: str) -> str:
        """``ctx.job_sender``: record the id instead of publishing it."""
        self.sent.append(job_id)
        return f"inproc-{job_id}-{len(self.sent)}"

    def dispatch(self) -> dispatcher.PassStats:
        """One dispatcher pass: events -> jobs (subscribers), reap, send what is due."""
        return dispatcher.dispatch_once(self.ctx)

    def run(self, job_id: int) -> str:
        """Run one job now, as a worker that received its id would."""
        return runner.run(self.ctx, job_id, WORKER)

    def run_sent(self, types: Iterable[str] | None = None) -> dict[int, str]:
        """Run the jobs sent so far (only those of ``types`` when given; the others stay sent and
        are left for a later call). Returns job id -> outcome."""
        wanted = set(types) if types is not None else None
        pending, self.sent = self.sent, []
        outcomes: dict[int, str] = {}
        for job_id in pending:
            if wanted is not None and self.job(job_id)["type"] not in wanted:
                self.sent.append(job_id)
                continue
            outcomes[job_id] = self.run(job_id)
        return outcomes

    def settle(self, types: Iterable[str], passes: int = 10) -> dict[int, str]:
        """Dispatch and run jobs of ``types`` until a pass creates and sends none of them."""
        wanted = set(types)
        done: dict[int, str] = {}
        for _ in range(passes):
            self.dispatch()
            ran = self.run_sent(wanted)
            if not ran:
                return done
            done.update(ran)
        raise AssertionError(f"jobs of {sorted(wanted)} still being created after {passes} passes")

    def job(self, job_id: int) -> dict[str, Any]:
        return jobs.get(self.ctx, job_id)

    def jobs_of(self, type: str, state: str | None = None) -> list[dict[str, Any]]:
        rows, _ = jobs.list_jobs(self.ctx, type=type, state=state, limit=500)
        return sorted(rows, key=lambda j: j["id"])

    def make_due(self, job_id: int) -> None:
        """Move a retry's ``not_before`` into the past (instead of sleeping through its backoff)."""
        from registry.models import utcnow

        with self.ctx.db.write() as s:
            job = s.scalar(select(Job).where(Job.id == job_id, Job.state == JobState.queued.value))
            assert job is not None, f"job {job_id} is not queued"
            job.not_before = utcnow()

    # ----------------------------------------------------------------- pushes

    def spec(self, model: str, *, kind: str | None = None, base: str | None = None,
             tags: Mapping[str, str] | None = None, aliases: Iterable[str] = (), description: str = "",
             parents: Iterable[Mapping[str, Any]] = ()) -> drafts.DraftSpec:
        return drafts.DraftSpec(model=model, kind=kind, base=base, tags=dict(tags or {}), aliases=list(aliases),
                                description=description, parents=[dict(p) for p in parents])

    def draft(self, model: str, **spec: Any) -> str:
        return str(drafts.create_draft(self.ctx, self.spec(model, **spec), actor="tester")["id"])

    def add_bytes(self, draft_id: str, path: str, data: bytes, expected_sha256: str | None = None) -> dict[str, Any]:
        """Stream ``data`` into the draft as an upload body would arrive."""
        return asyncio.run(drafts.receive_file(self.ctx, draft_id, path, _chunks(data),
                                               expected_sha256=expected_sha256, content_length=len(data)))

    def get_draft(self, draft_id: str) -> dict[str, Any]:
        return drafts.get_draft(self.ctx, draft_id)

    def abort(self, draft_id: str) -> None:
        drafts.abort_draft(self.ctx, draft_id)

    def start_upload(self, draft_id: str, path: str, size: int | None) -> str:
        """A resumable upload session for one file of the draft; returns its id."""
        return str(uploads.create_upload(self.ctx, draft_id, path, size)["id"])

    def append(self, upload_id: str, offset: int, data: bytes) -> int:
        """Send one chunk at ``offset``; returns the bytes received so far."""
        return int(asyncio.run(uploads.append_chunk(self.ctx, upload_id, offset, _chunks(data)))["received"])

    def finish_upload(self, upload_id: str, sha256: str) -> dict[str, Any]:
        return uploads.complete_upload(self.ctx, upload_id, sha256)

    def link(self, draft_id: str, path: str, sha256: str, size: int | None = None) -> dict[str, Any]:
        return drafts.link_file(self.ctx, draft_id, path, sha256, size)

    def commit(self, draft_id: str, status: str = "ready") -> VersionView:
        """Commit a draft; ``status="candidate"`` records it as a machine-made version would be."""
        options = None if status == "ready" else recording.CommitOptions(status=status)
        return recording.commit(self.ctx, draft_id, actor="tester", options=options)

    def push_files(self, model: str, files: Mapping[str, bytes], status: str = "ready", **spec: Any) -> VersionView:
        draft_id = self.draft(model, **spec)
        for path, data in files.items():
            self.add_bytes(draft_id, path, data)
        return self.commit(draft_id, status)

    def push_weights(self, model: str, seed: int, **spec: Any) -> VersionView:
        """A version holding one small ``model.safetensors`` (distinct per seed)."""
        return self.push_files(model, {"model.safetensors": weights_bytes(seed)}, **spec)

    def push_folder(self, model: str, folder: Path, **spec: Any) -> VersionView:
        return recording.ingest_folder(self.ctx, folder, self.spec(model, **spec), actor="tester")

    # ----------------------------------------------------------------- small models built in code

    def folder(self, label: str) -> Path:
        return self.root / label

    def push_base(self, model: str, seed: int = 0, **spec: Any) -> VersionView:
        return self.push_folder(model, make_base(self.folder(f"{model}-base-{seed}"), seed=seed, shape=TINY), **spec)

    def push_base_update(self, model: str, seed: int = 0, drift_seed: int = 99, **spec: Any) -> VersionView:
        """A continued base: the weights of ``push_base(model, seed)`` plus a small seeded drift."""
        g = torch.Generator().manual_seed(drift_seed)
        tensors = {n: t + torch.randn(t.shape, generator=g) * 0.001 for n, t in random_weights(TINY, seed).items()}
        return self.push_folder(model, save_checkpoint(self.folder(f"{model}-update-{drift_seed}"), tensors, TINY),
                                **spec)

    def push_adapter(self, model: str, base: str, seed: int = 1, init_seed: int = 7, **spec: Any) -> VersionView:
        folder = make_adapter(self.folder(f"{model}-adapter-{seed}"), seed=seed, r=RANK, shape=TINY,
                              init_seed=init_seed)
        return self.push_folder(model, folder, base=base, **spec)

    def push_finetune(self, model: str, base: str, base_seed: int = 0, seed: int = 3, **spec: Any) -> VersionView:
        folder = make_finetune(self.folder(f"{model}-ft-{seed}"), random_weights(TINY, base_seed), seed=seed,
                               shape=TINY)
        return self.push_folder(model, folder, base=base, **spec)
