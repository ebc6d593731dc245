"""Jobs in process: the state machine (create, claim, heartbeat, complete, fail, retry backoff),
idempotency keys, the dispatcher's reap and send passes, and the runner's outcomes.

Jobs run on the test's thread through ``runner.run(ctx, job_id, worker)``; "sending" records the
id (see ``tests/services/inproc.py``). The worker and broker tests over real processes
(``tests/test_workers.py``, ``tests/test_jobs_api.py``) stay for delivery, crashes and the protocol.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

import registry.services.verify  # noqa: F401  (registers the handler the runner tests stand in for)
from registry.errors import InvalidInput, NotFound
from registry.models import Event, Job, utcnow
from registry.services import dispatcher, jobs, runner
from registry.services.jobtypes import JobParams, PruneParams, VerifyParams
from registry.services.verify import request_verify

from .inproc import WORKER, InProcess

pytestmark = pytest.mark.services


def _params(type: str, n: int = 1) -> JobParams:
    return VerifyParams(version_id=n) if type == "verify" else PruneParams(basis_id=n, max_error=0.0)


def _new_job(reg: InProcess, key: str | None = None, max_attempts: int = 3, type: str = "verify") -> int:
    with reg.ctx.db.write() as s:
        job, created = jobs.create(s, _params(type), settings=reg.ctx.settings, idempotency_key=key,
                                   max_attempts=max_attempts)
        assert created
        return job.id


def _events(reg: InProcess, type: str) -> list[dict[str, Any]]:
    with reg.ctx.db.read() as s:
        return [e.payload for e in s.scalars(select(Event).where(Event.type == type).order_by(Event.id))]


def _seconds_until(when: Any) -> float:
    return float((when - utcnow()).total_seconds())


def test_idempotency_key_returns_the_existing_job(reg: InProcess) -> None:
    first = _new_job(reg, key="k-1")
    with reg.ctx.db.write() as s:
        again, created = jobs.create(s, _params("verify", 2), settings=reg.ctx.settings, idempotency_key="k-1")
        assert (again.id, created, again.params) == (first, False, {"version_id": 1})
    with reg.ctx.db.write() as s:
        other, created = jobs.create(s, _params("verify", 3), settings=reg.ctx.settings, idempotency_key="k-2")
        assert created and other.id != first

    class BakeCake(JobParams):
        n: int = 1

    with pytest.raises(InvalidInput) as e, reg.ctx.db.write() as s:
        jobs.create(s, BakeCake(), settings=reg.ctx.settings)
    assert e.value.code == "invalid_job_type"


def test_submit_queues_and_sends_once_committed(reg: InProcess) -> None:
    reg.push_weights("m", 1)
    view = request_verify(reg.ctx, "m@1", actor="alice")
    assert (view["type"], view["state"], view["created_by"], view["queue"]) == ("verify", "queued", "alice", "cpu")
    assert reg.sent == [view["id"]]
    job = reg.job(view["id"])
    assert job["celery_task_id"].startswith("inproc-")
    assert jobs.send(reg.ctx, [view["id"]]) == 0  # already sent
    with pytest.raises(NotFound) as e:
        request_verify(reg.ctx, "m@2")
    assert e.value.code == "version_not_found" and reg.sent == [view["id"]]  # no job for a bad request


def test_claim_heartbeat_complete(reg: InProcess) -> None:
    job_id = _new_job(reg)
    assert jobs.claim(reg.ctx, job_id, "w1") == 1
    assert jobs.claim(reg.ctx, job_id, "w2") is None  # running with a live heartbeat
    assert jobs.heartbeat(reg.ctx, job_id, 1, progress=1.7, message="half")
    assert not jobs.heartbeat(reg.ctx, job_id, 2)  # not this attempt
    job = reg.job(job_id)
    assert (job["state"], job["worker"], job["attempts"], job["progress"], job["message"]) == (
        "running", "w1", 1, 1.0, "half")
    with reg.ctx.db.write() as s:
        jobs.complete(s, job_id, 1, {"answer": 42})
    job = reg.job(job_id)
    assert (job["state"], job["result"], job["error"]) == ("succeeded", {"answer": 42}, None)
    assert _events(reg, "job.succeeded") == [{"job_id": job_id, "job_type": "verify", "result": {"answer": 42}}]
    with pytest.raises(jobs.JobSuperseded), reg.ctx.db.write() as s:
        jobs.complete(s, job_id, 1, {"answer": 43})
    assert jobs.claim(reg.ctx, job_id, "w2") is None  # finished


def test_stale_running_job_can_be_claimed_again(reg: InProcess) -> None:
    job_id = _new_job(reg)
    assert jobs.claim(reg.ctx, job_id, "w1") == 1
    reg.ctx.settings.job_stale_seconds = 0  # every heartbeat is old now
    assert jobs.claim(reg.ctx, job_id, "w2") == 2
    # the first attempt comes back: it can neither beat nor finish
    assert not jobs.heartbeat(reg.ctx, job_id, 1)
    assert jobs.fail(reg.ctx, job_id, 1, {"code": "x", "message": "late"}, None) == "superseded"
    with pytest.raises(jobs.JobSuperseded), reg.ctx.db.write() as s:
        jobs.complete(s, job_id, 1, {})
    assert reg.job(job_id)["worker"] == "w2"


def test_fail_retries_with_backoff_until_attempts_run_out(reg: InProcess) -> None:
    job_id = _new_job(reg, max_attempts=2)
    assert jobs.claim(reg.ctx, job_id, "w1") == 1
    assert jobs.fail(reg.ctx, job_id, 1, {"code": "boom", "message": "first"}, retry_in=30) == "queued"
    job = reg.job(job_id)
    assert job["state"] == "queued" and job["error"]["code"] == "boom"
    with reg.ctx.db.read() as s:
        not_before = s.get(Job, job_id).not_before  # type: ignore[union-attr]
    assert 25 < _seconds_until(not_before) <= 30
    assert jobs.claim(reg.ctx, job_id, "w1") is None  # not due yet
    reg.make_due(job_id)
    assert jobs.claim(reg.ctx, job_id, "w1") == 2
    assert jobs.fail(reg.ctx, job_id, 2, {"code": "boom", "message": "second"}, retry_in=30) == "failed"
    job = reg.job(job_id)
    assert (job["state"], job["message"], job["attempts"]) == ("failed", "second", 2)
    assert [e["job_id"] for e in _events(reg, "job.failed")] == [job_id]


def test_final_error_is_not_retried(reg: InProcess) -> None:
    job_id = _new_job(reg)
    jobs.claim(reg.ctx, job_id, "w1")
    assert jobs.fail(reg.ctx, job_id, 1, {"code": "invalid_input", "message": "bad"}, retry_in=None) == "failed"


def test_runner_outcomes(reg: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler's return value, a registry error (final), a crash (retried with backoff) and a
    RetryLater (retried after its own delay)."""
    behaviour: dict[str, Any] = {}

    def fake(run: runner.JobRun) -> dict[str, Any]:
        run.progress(0.5, "working")
        what = behaviour["do"]
        if what == "ok":
            return {"params": run.params.to_row(), "attempt": run.attempt}
        if what == "invalid":
            raise InvalidInput("no good", code="bad_params")
        if what == "crash":
            raise RuntimeError("disk on fire")
        raise jobs.RetryLater("busy", delay=7)

    monkeypatch.setitem(runner.HANDLERS, "verify", fake)

    behaviour["do"] = "ok"
    ok = _new_job(reg)
    assert reg.run(ok) == "succeeded"
    assert reg.job(ok)["result"] == {"params": {"version_id": 1}, "attempt": 1}
    assert reg.job(ok)["worker"] == WORKER
    assert reg.run(ok) == "skipped"  # a second delivery of the same id

    behaviour["do"] = "invalid"
    bad = _new_job(reg)
    assert reg.run(bad) == "failed"
    assert reg.job(bad)["error"]["code"] == "bad_params" and reg.job(bad)["attempts"] == 1

    behaviour["do"] = "crash"
    crash = _new_job(reg, max_attempts=2)
    assert reg.run(crash) == "queued"
    job = reg.job(crash)
    assert job["error"]["code"] == "internal" and "disk on fire" in job["error"]["message"]
    with reg.ctx.db.read() as s:
        wait = _seconds_until(s.get(Job, crash).not_before)  # type: ignore[union-attr]
    assert 0 < wait <= runner.backoff(1) == 5.0
    reg.make_due(crash)
    assert reg.run(crash) == "failed"  # second and last attempt

    behaviour["do"] = "later"
    later = _new_job(reg)
    assert reg.run(later) == "queued"
    assert reg.job(later)["error"]["code"] == "retry"
    assert runner.backoff(3) == 20.0 and runner.backoff(30) == 600.0


def test_reap_requeues_or_fails_jobs_whose_worker_died(reg: InProcess) -> None:
    alive, last = _new_job(reg), _new_job(reg, max_attempts=1)
    jobs.claim(reg.ctx, alive, "w1")
    jobs.claim(reg.ctx, last, "w1")
    assert dispatcher.reap(reg.ctx) == 0
    reg.ctx.settings.job_stale_seconds = 0
    assert dispatcher.reap(reg.ctx) == 2
    assert reg.job(alive)["state"] == "queued" and "lost" in reg.job(alive)["message"]
    assert reg.job(last)["state"] == "failed" and reg.job(last)["error"]["code"] == "worker_lost"


def test_dispatcher_sends_due_unsent_jobs_and_resends_lost_ones(reg: InProcess) -> None:
    due, later = _new_job(reg), _new_job(reg)
    with reg.ctx.db.write() as s:
        s.get(Job, later).not_before = utcnow() + timedelta(hours=1)  # type: ignore[union-attr]
    assert dispatcher.send_due(reg.ctx) == 1 and reg.sent == [due]
    assert dispatcher.send_due(reg.ctx) == 0  # sent, not started yet: not sent again so soon
    with reg.ctx.db.write() as s:  # its message was sent long ago and never started: presumed lost
        s.get(Job, due).enqueued_at = utcnow() - timedelta(seconds=10 * reg.ctx.settings.job_stale_seconds + 1)  # type: ignore[union-attr]
    assert dispatcher.send_due(reg.ctx) == 1 and reg.sent == [due, due]
    reg.ctx.job_sender = None  # a process without a broker leaves sending to the dispatcher
    assert jobs.send(reg.ctx, [later]) == 0


def test_events_are_dispatched_once(reg: InProcess) -> None:
    reg.push_weights("m", 1)
    first = reg.dispatch()
    assert first.events >= 1 and first.jobs_created >= 1  # mlflow_sync for version.created
    again = reg.dispatch()
    assert (again.events, again.jobs_created) == (0, 0)
    keys = [j["idempotency_key"] for j in reg.jobs_of("mlflow_sync")]
    assert len(keys) == len(set(keys)) == 1


def test_verify_job_finds_intact_and_corrupt_bytes(reg: InProcess) -> None:
    v = reg.push_weights("m", 1)
    job = request_verify(reg.ctx, "m@1")
    assert reg.run_sent(["verify"]) == {job["id"]: "succeeded"}
    assert reg.job(job["id"])["result"]["ok"] is True

    path = reg.ctx.store.local_path(v.files[0].sha256)  # type: ignore[index]
    assert path is not None
    path.chmod(0o644)
    path.write_bytes(b"bit rot")
    job = request_verify(reg.ctx, "m@1")
    reg.run_sent(["verify"])
    result = reg.job(job["id"])["result"]
    assert result["ok"] is False and [f["path"] for f in result["files"] if not f["ok"]] == ["model.safetensors"]
    from registry.services import versions

    assert versions.get(reg.ctx, "m@1").corrupt
    assert [e["bad"] for e in _events(reg, "version.corrupt")] == [["model.safetensors"]]


def test_job_lookup_and_listing(reg: InProcess) -> None:
    a, b = _new_job(reg), _new_job(reg, type="prune")
    with pytest.raises(NotFound) as e:
        reg.job(999)
    assert e.value.code == "job_not_found"
    rows, cursor = jobs.list_jobs(reg.ctx, limit=1)
    assert [r["id"] for r in rows] == [b] and cursor == b
    rows, _ = jobs.list_jobs(reg.ctx, type="verify")
    assert [r["id"] for r in rows] == [a]
    rows, _ = jobs.list_jobs(reg.ctx, state="running")
    assert rows == []
