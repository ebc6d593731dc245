"""Failure drill of the production topology under load.

Two API processes (``registry up``, no embedded workers) on one PostgreSQL database and one S3
bucket (moto's server on loopback, a separate process), a shared staging directory, two Celery
workers and the dispatcher on a private Redis. Client threads push small versions (adapters and
fine-tunes pinned to a base), start jobs (merges, transfers) and pull versions back, spread over
both API processes. Meanwhile a worker (while it runs a transfer), the dispatcher and each API
process in turn are killed with SIGKILL and restarted. An operation that fails because its API
process died is retried against the other one, as a load balancer would (job requests carry an
``Idempotency-Key``, so a retry cannot make a second job).

Afterwards every acknowledged version must be listed, in its expected status and byte-exact; every
acknowledged job must have succeeded with its output intact (the killed one on a later attempt); no
job may be left queued or running; a verification job of every version must pass; every blob row
must have its S3 object; each version must have exactly one MLflow sync (the dispatcher's kill lost
no event and duplicated none); and no request may have got a 5xx or hung. The drill prints a table
of what it did (``pytest -s tests/test_topology.py``); ~3 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.client import Job, RegistryAPIError, RegistryClient, RegistryConnectionError, iter_folder

from .conftest import RedisProcess, free_port, need_postgres, new_pg_database, reachable, wait_healthy, wait_until

WARMUP = 5.0  # seconds of load before the first kill
DOWNTIME = 2.0  # seconds a killed process stays down; also between kills
COOLDOWN = 5.0  # seconds of load after the last restart
THREADS = 3
THINK = 0.4  # seconds a client thread rests between operations
OP_DEADLINE = 90.0  # an operation still failing over after this long counts as a hang
REQUEST_TIMEOUT = 30.0  # one request taking longer counts as a hang


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        with open(self.log, "ab") as f:
            f.write(f"\n===== start {time.strftime('%H:%M:%S')}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=f, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Api(Proc):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90) -> None:
        assert self.proc is not None
        if wait_healthy(self.url, self.proc, self.log, timeout, self.name, poll=0.2):
            return
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log.read_text()[-4000:]}")


@dataclass
class Topology:
    root: Path
    env: dict[str, str]
    database_url: str
    s3_endpoint: str
    apis: list[Api]
    workers: list[Proc]
    dispatcher: Proc
    moto: subprocess.Popen[bytes]
    redis: RedisProcess

    def procs(self) -> list[Proc]:
        return [*self.apis, *self.workers, self.dispatcher]

    def dump_logs(self) -> None:
        for p in self.procs():
            print(f"===== {p.name} ({p.log})\n{p.log.read_text(errors='replace')[-5000:]}")

    def stop(self) -> None:
        for p in self.procs():
            p.stop()
        self.moto.terminate()
        try:
            self.moto.wait(10)
        except subprocess.TimeoutExpired:
            self.moto.kill()
        self.redis.stop()


def _start_moto(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(root / "moto.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while not reachable("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"moto server did not start:\n{(root / 'moto.log').read_text()}")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Iterator[Topology]:
    need_postgres()
    pytest.importorskip("moto")
    root = tmp_path_factory.mktemp("topology")
    redis = RedisProcess(free_port())
    redis.start()
    moto, endpoint = _start_moto(root)
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{
        "aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1",
    }).create_bucket(Bucket="drill")
    db_url = new_pg_database(pg_databases)
    (root / "staging").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(aws)
    env.update({
        "PYTHONUNBUFFERED": "1",
        "REGISTRY_DATABASE_URL": db_url,
        "REGISTRY_STORAGE": "s3", "REGISTRY_S3_BUCKET": "drill", "REGISTRY_S3_ENDPOINT_URL": endpoint,
        "REGISTRY_S3_PREFIX": "blobs/",
        "REGISTRY_STAGING_DIR": str(root / "staging"),
        "REGISTRY_BROKER_URL": redis.url, "REGISTRY_RESULT_BACKEND": redis.url,
        "REGISTRY_BROKER_VISIBILITY_TIMEOUT": "10",
        "REGISTRY_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "REGISTRY_EMBEDDED_WORKERS": "0", "REGISTRY_MLFLOW_UI": "false",
        "REGISTRY_JOB_STALE_SECONDS": "3", "REGISTRY_DISPATCH_INTERVAL": "0.3", "REGISTRY_JOB_MAX_ATTEMPTS": "5",
        "REGISTRY_TORCH_THREADS": "1", "REGISTRY_GC_GRACE_SECONDS": "3600",
    })

    def proc_env(name: str, **extra: str) -> dict[str, str]:
        home = root / name
        home.mkdir(exist_ok=True)
        return {**env, "REGISTRY_HOME": str(home), **extra}

    reg = [sys.executable, "-m", "registry"]
    apis = []
    for name in ("api-a", "api-b"):
        port = free_port()
        apis.append(Api(name, [*reg, "up"], proc_env(name, REGISTRY_PORT=str(port)), root / f"{name}.log",
                        port=port))
    workers = [Proc(name, [*reg, "worker", "--hostname", f"{name}@drill"], proc_env(name), root / f"{name}.log")
               for name in ("w1", "w2")]
    dispatcher = Proc("dispatcher", [*reg, "dispatcher"], proc_env("dispatcher"), root / "dispatcher.log")
    topo = Topology(root, env, db_url, endpoint, apis, workers, dispatcher, moto, redis)
    try:
        for p in topo.procs():  # all at once, as an orchestrator would: they migrate the database together
            p.start()
        for a in apis:
            a.wait_ready()
        yield topo
    except BaseException:
        topo.dump_logs()
        raise
    finally:
        topo.stop()


# --------------------------------------------------------------------------- the load


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    return {rel: _sha(p) for rel, p in iter_folder(folder)}


@dataclass
class Stats:
    tried: Counter[str] = field(default_factory=Counter)
    acked: Counter[str] = field(default_factory=Counter)
    failovers: Counter[str] = field(default_factory=Counter)
    http5xx: Counter[str] = field(default_factory=Counter)
    hangs: Counter[str] = field(default_factory=Counter)
    gave_up: Counter[str] = field(default_factory=Counter)
    pulls_ok: int = 0
    pulls_corrupt: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, counter: str, op: str, n: int = 1) -> None:
        with self.lock:
            getattr(self, counter)[op] += n


@dataclass
class Expected:
    ref: str
    kind: str  # push-adapter, push-finetune, merge, transfer
    status: str
    files: dict[str, str] | None  # path -> sha256 (None: job output, taken from its first listing)
    job_id: int | None = None


class Load:
    """Client threads spread over the API processes; failed operations move to another one."""

    def __init__(self, topo: Topology, data: Path, base: str, base_v2: str, stats: Stats) -> None:
        self.topo = topo
        self.data = data
        self.base, self.base_v2 = base, base_v2
        self.stats = stats
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.versions: dict[str, Expected] = {}
        self.jobs: dict[int, str] = {}  # job id -> type
        self.adapters: list[str] = []
        self.finetunes: list[str] = []
        self.seq = 0
        self.killed_mid_job: list[int] = []  # jobs whose worker was killed while running them

    # ------------------------------------------------------------------ routing

    def _attempt(self, op: str, fn: Callable[[str], Any], rng: random.Random) -> Any:
        """Run ``fn(api_url)`` on a random API process; on a connection error or a 5xx, try another
        one (as a load balancer would) until ``OP_DEADLINE``. Returns fn's result or raises the last error."""
        urls = [a.url for a in self.topo.apis]
        first = rng.randrange(len(urls))
        deadline = time.monotonic() + OP_DEADLINE
        k = 0
        while True:
            url = urls[(first + k) % len(urls)]
            try:
                return fn(url)
            except (RegistryConnectionError, httpx.TransportError) as e:
                if isinstance(e, httpx.TimeoutException) or "timed out" in str(e).lower():
                    self.stats.note("hangs", op)
                err: Exception = e
            except RegistryAPIError as e:
                if e.status < 500:
                    raise
                self.stats.note("http5xx", op)
                self.stats.errors.append(f"{op} on {url}: {e}")
                err = e
            if time.monotonic() > deadline:
                self.stats.note("gave_up", op)
                raise err
            self.stats.note("failovers", op)
            k += 1
            time.sleep(0.2 if k % len(urls) else 1.0)

    # ------------------------------------------------------------------ operations

    def _next_folder(self, kind: str) -> Path:
        from registry.demo import make_adapter, make_finetune, random_weights

        with self.lock:
            self.seq += 1
            n = self.seq
        folder = self.data / f"{kind}-{n}"
        if kind == "adapter":
            make_adapter(folder, seed=1000 + n, init_seed=7)
        else:
            make_finetune(folder, random_weights(seed=0), seed=5000 + n)
        return folder

    def push(self, rng: random.Random, kind: str) -> None:
        op = f"push {kind}"
        folder = self._next_folder(kind)
        files = _manifest(folder)
        model = f"drill-{kind}-{rng.randrange(3)}"  # few models: concurrent pushes share version numbers

        def attempt(url: str) -> str:
            with RegistryClient(url, token="", timeout=REQUEST_TIMEOUT) as rc:
                try:
                    return str(rc.push(folder, model, base=self.base).ref)
                except RegistryAPIError as e:
                    if e.code == "duplicate_content":  # an earlier attempt committed before its process died
                        return str(e.details["existing"])
                    raise

        self.stats.note("tried", op)
        try:
            ref = self._attempt(op, attempt, rng)
        except Exception as e:  # noqa: BLE001 - counted; not acknowledged
            self.stats.errors.append(f"{op}: {e!r}")
            return
        self.stats.note("acked", op)
        with self.lock:
            self.versions[ref] = Expected(ref, op, "ready", files)
            (self.adapters if kind == "adapter" else self.finetunes).append(ref)

    def start_job(self, rng: random.Random) -> None:
        with self.lock:
            adapters, finetunes = list(self.adapters), list(self.finetunes)
        if rng.random() < 0.5 and len(adapters) >= 2:
            kind, path = "merge", "/api/v1/merges"
            body: dict[str, Any] = {"method": "task_arithmetic", "inputs": rng.sample(adapters, 2),
                                    "name": "drill-merged", "params": {"lam": round(rng.uniform(0.5, 1.5), 3)}}
        elif finetunes:
            kind, path = "transfer", "/api/v1/transfers"
            body = {"finetune": rng.choice(finetunes), "target_base": self.base_v2,
                    "alpha": round(rng.uniform(0.5, 1.0), 3)}
        else:
            return
        op = f"job {kind}"
        key = uuid.uuid4().hex  # the same request retried elsewhere must not make a second job

        def attempt(url: str) -> int:
            try:
                r = httpx.post(url + path, json=body, headers={"Idempotency-Key": key}, timeout=REQUEST_TIMEOUT)
            except httpx.TransportError as e:
                raise RegistryConnectionError(str(e)) from e
            if r.status_code >= 400:
                raise RegistryAPIError(r.status_code, r.json().get("error", {}).get("code", "?") if
                                       r.headers.get("content-type", "").startswith("application/json") else "?",
                                       r.text[:300])
            return int(r.json()["id"])

        self.stats.note("tried", op)
        try:
            job_id = self._attempt(op, attempt, rng)
        except Exception as e:  # noqa: BLE001
            self.stats.errors.append(f"{op}: {e!r}")
            return
        self.stats.note("acked", op)
        with self.lock:
            self.jobs[job_id] = kind

    def pull(self, rng: random.Random, scratch: Path) -> None:
        with self.lock:
            pushed = [e for e in self.versions.values() if e.files is not None]
        if not pushed:
            return
        exp = rng.choice(pushed)
        op = "pull"
        dest = scratch / uuid.uuid4().hex

        def attempt(url: str) -> None:
            shutil.rmtree(dest, ignore_errors=True)
            with RegistryClient(url, token="", timeout=REQUEST_TIMEOUT) as rc:
                rc.pull(exp.ref, dest)

        self.stats.note("tried", op)
        try:
            self._attempt(op, attempt, rng)
        except Exception as e:  # noqa: BLE001
            self.stats.errors.append(f"{op} {exp.ref}: {e!r}")
            if isinstance(e, RegistryAPIError) and e.code == "checksum_mismatch":
                self.stats.pulls_corrupt += 1
            return
        self.stats.note("acked", op)
        got = {rel: _sha(p) for rel, p in iter_folder(dest)}
        if got == exp.files:
            self.stats.pulls_ok += 1
        else:
            self.stats.pulls_corrupt += 1
            self.stats.errors.append(f"pull {exp.ref}: got {got}, expected {exp.files}")
        shutil.rmtree(dest, ignore_errors=True)

    def client_thread(self, i: int) -> None:
        rng = random.Random(i)
        scratch = self.data / f"pulls-{i}"
        scratch.mkdir()
        while not self.stop.is_set():
            x = rng.random()
            try:
                if x < 0.40:
                    self.push(rng, "adapter")
                elif x < 0.55:
                    self.push(rng, "finetune")
                elif x < 0.70:
                    self.start_job(rng)
                else:
                    self.pull(rng, scratch)
            except Exception as e:  # noqa: BLE001 - a bug in the drill itself: record and go on
                self.stats.errors.append(f"thread {i}: {e!r}")
            self.stop.wait(THINK)


# --------------------------------------------------------------------------- chaos


def _kill_worker_mid_job(topo: Topology, load: Load, note: Callable[[str], None]) -> None:
    """Start a transfer and SIGKILL the worker that runs it while it runs (so it must be retried)."""
    api = topo.apis[1].url
    for attempt in range(8):
        with load.lock:
            finetune = load.finetunes[attempt % len(load.finetunes)]
        r = httpx.post(api + "/api/v1/transfers", json={"finetune": finetune, "target_base": load.base_v2,
                                                        "alpha": 0.25 + attempt / 100}, timeout=REQUEST_TIMEOUT)
        assert r.status_code == 202, r.text
        job_id = int(r.json()["id"])
        with load.lock:
            load.jobs[job_id] = "transfer"
        load.stats.note("tried", "job transfer")
        load.stats.note("acked", "job transfer")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = httpx.get(f"{api}/api/v1/jobs/{job_id}", timeout=REQUEST_TIMEOUT).json()
            if job["state"] != "queued":
                break
            time.sleep(0.03)
        victim = next((w for w in topo.workers if (job.get("worker") or "").startswith(w.name + "@")), None)
        if job["state"] != "running" or victim is None:
            continue  # it finished before we saw it run: try another
        victim.kill()
        after = httpx.get(f"{api}/api/v1/jobs/{job_id}", timeout=REQUEST_TIMEOUT).json()
        if after["state"] == "running" and after["attempts"] == job["attempts"]:
            load.killed_mid_job.append(job_id)
        note(f"SIGKILL worker {victim.name} running job {job_id} ({after['state']} after the kill)")
        pause = load.stop.wait
        pause(DOWNTIME)
        victim.start()
        note(f"worker {victim.name} restarted")
        return
    victim = topo.workers[0]
    victim.kill()
    note(f"SIGKILL worker {victim.name} (no job caught running)")
    load.stop.wait(DOWNTIME)
    victim.start()
    note(f"worker {victim.name} restarted")


def chaos(topo: Topology, load: Load, log: list[str]) -> None:
    """Kill one process at a time with SIGKILL and restart it; the client threads keep going."""
    t0 = time.monotonic()

    def note(msg: str) -> None:
        log.append(f"{time.monotonic() - t0:6.1f}s  {msg}")

    def pause(seconds: float) -> None:
        load.stop.wait(seconds)

    pause(WARMUP)
    _kill_worker_mid_job(topo, load, note)  # early, while the job queue is short
    pause(DOWNTIME)
    topo.dispatcher.kill()
    note("SIGKILL dispatcher")
    pause(DOWNTIME)
    topo.dispatcher.start()
    note("dispatcher restarted")
    for api in topo.apis:  # one at a time: the other takes the load meanwhile
        pause(DOWNTIME)
        api.kill()
        note(f"SIGKILL {api.name}")
        pause(DOWNTIME)
        api.start()
        api.wait_ready()
        note(f"{api.name} restarted and ready")
    pause(COOLDOWN)
    note("load stops")


# --------------------------------------------------------------------------- the drill


def _wait(predicate: Callable[[], Any], timeout: float, what: str, topo: Topology) -> Any:
    return wait_until(predicate, timeout, what, poll=0.5, on_timeout=topo.dump_logs)


def _all_jobs(rc: RegistryClient) -> list[Job]:
    return list(rc.iter_jobs(limit=1000))


def test_failure_drill(topology: Topology, tmp_path: Path) -> None:
    from registry.demo import make_base, make_finetune, random_weights, save_checkpoint

    topo = topology
    started = time.monotonic()
    data = tmp_path / "data"
    # setup, before the chaos: a base, its v2 and one fine-tune (the transfers' inputs)
    import torch

    base_w = random_weights(seed=0)
    make_base(data / "base", seed=0)
    g = torch.Generator().manual_seed(99)
    save_checkpoint(data / "base-v2", {n: t + torch.randn(t.shape, generator=g) * 0.001 for n, t in base_w.items()})
    make_finetune(data / "ft-0", base_w, seed=4999)
    stats = Stats()
    with RegistryClient(topo.apis[0].url, token="") as rc:
        base = rc.push(data / "base", "drill-base").ref
        base_v2 = rc.push(data / "base-v2", "drill-base").ref
        ft0 = rc.push(data / "ft-0", "drill-finetune-0", base=base).ref
    # warm-up: the workers' first jobs import MLflow and create its store; wait for them, so the
    # chaos below meets a running system rather than one still starting
    with RegistryClient(topo.apis[1].url, token="") as rc:
        # (each version: its MLflow sync, and its pack: REGISTRY_PACK=auto, the default, runs in the drill)
        _wait(lambda: sorted((j.type, j.state) for j in _all_jobs(rc))
              == [("mlflow_sync", "succeeded")] * 3 + [("pack", "succeeded")] * 3, 240,
              "the setup versions' MLflow syncs and packs", topo)
    setup_s = time.monotonic() - started
    load = Load(topo, data, base, base_v2, stats)
    for ref, folder in ((base, "base"), (base_v2, "base-v2"), (ft0, "ft-0")):
        load.versions[ref] = Expected(ref, "setup", "ready", _manifest(data / folder))
    load.finetunes.append(ft0)

    chaos_log: list[str] = []
    threads = [threading.Thread(target=load.client_thread, args=(i,), name=f"client-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    load_started = time.monotonic()
    chaos_thread = threading.Thread(target=chaos, args=(topo, load, chaos_log), name="chaos")
    chaos_thread.start()
    try:
        chaos_thread.join(300)
    finally:
        load.stop.set()
        for t in threads:
            t.join(OP_DEADLINE + 30)
    load_done = time.monotonic()
    assert not chaos_thread.is_alive(), "a restart did not finish"
    for p in topo.procs():
        assert p.alive(), f"{p.name} is not running at the end:\n{p.log.read_text()[-3000:]}"

    # ------------------------------------------------------------------ afterwards
    rc = RegistryClient(topo.apis[1].url, token="")
    terminal = ("succeeded", "failed", "cancelled")

    def acked_jobs_done() -> list[Job] | None:
        js = [rc.get_job(j) for j in load.jobs]
        return js if all(j.state in terminal for j in js) else None

    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = time.monotonic() - mark
        mark = time.monotonic()

    jobs = _wait(acked_jobs_done, 180, "every acknowledged job to finish", topo)
    phase("jobs")
    for j in jobs:
        if j.state == "succeeded":
            ref = j.result["ref"]
            out = rc.get_version(ref)
            status = "candidate" if j.type == "transfer" else "ready"
            load.versions.setdefault(ref, Expected(ref, f"job {j.type}", status, None, j.id))
            if load.versions[ref].files is None:
                load.versions[ref].files = {f.path: f.sha256 for f in out.files}

    # nothing stuck: every job (mlflow syncs included) reaches a final state
    _wait(lambda: not [j for j in _all_jobs(rc) if j.state not in terminal], 180,
          "no queued or running job", topo)
    phase("queue empty")

    listed = {v.ref: v for v in rc.iter_versions(prefix="drill-", limit=200)}
    intact: Counter[str] = Counter()
    lost: list[str] = []
    for ref, exp in sorted(load.versions.items()):
        v = listed.get(ref)
        if v is None:
            lost.append(f"{ref}: not listed")
            continue
        if v.status != exp.status:
            lost.append(f"{ref}: status {v.status}, expected {exp.status}")
            continue
        dest = tmp_path / "final" / ref.replace("@", "_")
        try:
            rc.pull(ref, dest)
        except Exception as e:  # noqa: BLE001
            lost.append(f"{ref}: pull failed: {e!r}")
            continue
        got = {rel: _sha(p) for rel, p in iter_folder(dest)}
        if got != exp.files:
            lost.append(f"{ref}: bytes differ: {got} != {exp.files}")
            continue
        intact[exp.kind] += 1

    phase("pull all")
    # every version passes a verification job (stored blobs re-read from S3)
    verify_jobs = {ref: rc.verify(ref).id for ref in listed}
    _wait(lambda: all(rc.get_job(j).state in terminal for j in verify_jobs.values()), 180,
          "verification of every version", topo)
    corrupt = []
    for ref, j in verify_jobs.items():
        job = rc.get_job(j)
        if job.state != "succeeded" or not job.result["ok"]:
            corrupt.append(f"{ref}: {job.state} {job.result or job.error}")
    phase("verify all")
    all_jobs = _all_jobs(rc)
    rc.close()
    import boto3
    from sqlalchemy import create_engine, text

    s3 = boto3.client("s3", endpoint_url=topo.s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    objects = {o["Key"].rsplit("/", 1)[-1] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="drill")
               for o in page.get("Contents", [])}
    engine = create_engine(topo.database_url)
    with engine.connect() as c:
        blob_rows = {r[0] for r in c.execute(text("select sha256 from blobs"))}
        referenced = {r[0] for r in c.execute(text("select distinct blob_sha256 from version_files"))}
        # the objects the store must hold: raw files' own, and the payloads of packed files' chunks
        needed = {r[0] for r in c.execute(text(
            "select sha256 from blobs where state = 'ready' and form = 'raw'"))}
        needed |= {r[0] for r in c.execute(text("select distinct object_sha256 from chunks"))}
        packed_files = c.execute(text("select count(*) from blobs where form = 'packed'")).scalar()
    engine.dispose()

    # ------------------------------------------------------------------ the table
    job_states = Counter((load.jobs[j.id], j.state) for j in jobs)
    retried_jobs = sum(1 for j in jobs if j.attempts > 1)
    unacked = sorted(set(listed) - set(load.versions))
    rows = []
    for op in sorted(set(stats.tried) | {"pull"}):
        if op.startswith("push"):
            ok = intact[op]
        elif op.startswith("job"):
            ok = job_states[(op.removeprefix("job "), "succeeded")]
        else:
            ok = stats.pulls_ok
        rows.append((op, stats.tried[op], stats.acked[op], ok, stats.acked[op] - ok, stats.failovers[op],
                     stats.http5xx[op], stats.hangs[op], stats.gave_up[op]))
    lines = ["", "failure drill: 2 API processes, 2 workers, dispatcher, Redis, PostgreSQL, S3 (moto)",
             *[f"  {line}" for line in chaos_log],
             f"  setup + warm-up {setup_s:.0f}s; load {load_done - load_started:.0f}s x {THREADS} threads; "
             f"total {time.monotonic() - started:.0f}s "
             f"(afterwards {time.monotonic() - load_done:.0f}s: "
             + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()) + ")",
             f"  {'operation':16s} {'tried':>6s} {'acked':>6s} {'intact':>6s} {'lost':>5s} {'failover':>8s} "
             f"{'5xx':>4s} {'hangs':>5s} {'gave up':>7s}"]
    for r in rows:
        lines.append(f"  {r[0]:16s} {r[1]:6d} {r[2]:6d} {r[3]:6d} {r[4]:5d} {r[5]:8d} {r[6]:4d} {r[7]:5d} {r[8]:7d}")
    lines += [f"  pulls corrupt: {stats.pulls_corrupt}; acknowledged jobs retried after a kill: {retried_jobs}; "
              f"verified versions: {len(verify_jobs) - len(corrupt)}/{len(verify_jobs)}; "
              f"versions committed without an acknowledgement: {len(unacked)}",
              f"  S3 objects {len(objects)}, blob rows {len(blob_rows)} ({packed_files} packed files): needed objects "
              f"missing {len(needed - objects)}, objects without a row {len(objects - blob_rows)} (left for gc)",
              f"  jobs whose worker was SIGKILLed mid-run: {load.killed_mid_job}",
              f"  jobs by type/state: {dict(Counter((j.type, j.state) for j in all_jobs))}"]
    print("\n".join(lines))
    for msg in stats.errors[:30]:
        print("  error:", msg)

    assert not lost, lost
    assert not corrupt, corrupt
    assert stats.pulls_corrupt == 0
    assert all(j.state == "succeeded" for j in jobs), [(j.id, j.state, j.error) for j in jobs
                                                          if j.state != "succeeded"]
    assert sum(stats.http5xx.values()) == 0, stats.errors
    assert sum(stats.hangs.values()) == 0 and sum(stats.gave_up.values()) == 0, stats.errors
    assert stats.acked["push adapter"] > 0 and stats.acked["pull"] > 0 and load.jobs
    assert sum(p.kills for p in topo.procs()) == 4
    assert not needed - objects and referenced <= blob_rows  # every recorded raw file and payload is in the bucket
    for j in jobs:
        if j.id in load.killed_mid_job:
            assert j.attempts >= 2, j
    # the dispatcher's kill lost no event and duplicated none: one MLflow sync per version
    syncs = Counter(j.params["version_id"] for j in all_jobs if j.type == "mlflow_sync")
    assert len(syncs) == len(listed) and set(syncs.values()) == {1}, syncs
