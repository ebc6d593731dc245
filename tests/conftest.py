"""Shared fixtures: real registry servers (subprocesses on loopback) over SQLite and PostgreSQL.

PostgreSQL and Redis are expected at REGISTRY_TEST_PG_URL / REGISTRY_TEST_REDIS_URL (defaults:
127.0.0.1). When they are unreachable the tests that need them skip with the reason, unless
REGISTRY_TEST_REQUIRE_SERVICES=1 (set by .ci/run), in which case they fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

PG_ADMIN_URL = os.environ.get("REGISTRY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REGISTRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("REGISTRY_TEST_REQUIRE_SERVICES") == "1"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    if reachable(host, port):
        return
    msg = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(msg + " (REGISTRY_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(msg + "; start it to run this test")


def need_postgres() -> None:
    from sqlalchemy.engine import make_url

    u = make_url(PG_ADMIN_URL)
    need_service("PostgreSQL", u.host or "127.0.0.1", u.port or 5432)


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[list[str]]:
    """Creates nothing itself; drops every database the tests created from it at the end."""
    created: list[str] = []
    yield created
    if created:
        from sqlalchemy import create_engine

        engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for name in created:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


def new_pg_database(created: list[str]) -> str:
    """A fresh, empty PostgreSQL database; returns its SQLAlchemy URL."""
    need_postgres()
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"registry_test_{uuid.uuid4().hex[:10]}"
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    created.append(name)
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    home: Path
    database_url: str
    backend: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    def blob_files(self) -> set[str]:
        return {p.name for p in (self.blob_dir / "sha256").glob("*/*/*")} if self.blob_dir.exists() else set()

    def client(self, token: str | None = None):  # type: ignore[no-untyped-def]
        from registry.client import RegistryClient

        return RegistryClient(self.url, token=token or "")

    @contextmanager
    def context(self) -> Iterator[Any]:
        """The server's registry opened in this process (a RegistryContext), to look behind the API."""
        from registry.config import Settings
        from registry.services.context import RegistryContext

        ctx = RegistryContext.open(Settings(home=self.home, database_url=self.database_url))
        try:
            yield ctx
        finally:
            ctx.close()

    def leftovers(self) -> tuple[set[str], set[str]]:
        """(store objects without a blob row, blob rows that no version file and no packed chunk needs)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        with engine.connect() as c:
            rows = {r[0] for r in c.execute(text("select sha256 from blobs"))}
            unneeded = {r[0] for r in c.execute(text(
                "select sha256 from blobs b"
                " where not exists (select 1 from version_files f where f.blob_sha256 = b.sha256)"
                " and not exists (select 1 from chunks c where c.object_sha256 = b.sha256)"))}
        engine.dispose()
        return self.blob_files() - rows, unneeded

    def cli(self, *args: str, token: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "REGISTRY_URL": self.url}
        if token:
            env["REGISTRY_TOKEN"] = token
        p = subprocess.run([sys.executable, "-m", "registry", *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"registry {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_env(home: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update({"REGISTRY_HOME": str(home), "REGISTRY_DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1",
                "REGISTRY_GC_GRACE_SECONDS": "3600", "REGISTRY_EMBEDDED_WORKERS": "0", "REGISTRY_MLFLOW_UI": "false",
                # Packing has its own tests (test_packing.py); elsewhere files stay as uploaded.
                "REGISTRY_PACK": "off"})
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, poll: float = 0.2,
               on_timeout: Callable[[], None] | None = None) -> Any:
    """``predicate()``'s first truthy value, polling every ``poll`` s; AssertionError after ``timeout``
    (``on_timeout`` runs first, e.g. to print the processes' logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    if on_timeout is not None:
        on_timeout()
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float, what: str = "server",
                 poll: float = 0.1) -> bool:
    """Poll ``url``'s health endpoint until it answers 200 (True) or ``timeout`` passes (False);
    RuntimeError with the log's tail if the process exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/api/v1/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    return False


def start_server(home: Path, database_url: str, backend: str = "sqlite", **extra: str) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = server_env(home, database_url, REGISTRY_PORT=str(port), **extra)
    log = home / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "registry", "up"], env=env, stdout=logf,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if wait_healthy(url, proc, log, 60):
        return Server(url, home, database_url, backend, env, proc, log)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def make_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str],
                backend: str, **extra: str) -> Server:
    home = tmp_path_factory.mktemp(f"home-{backend}")
    url = new_pg_database(pg_databases) if backend == "postgres" else f"sqlite:///{home / 'registry.db'}"
    srv = start_server(home, url, backend, **extra)
    request.addfinalizer(srv.stop)
    return srv


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Server:
    """A registry server (no auth, loopback), once on SQLite and once on PostgreSQL."""
    return make_server(request, tmp_path_factory, pg_databases, request.param)


@pytest.fixture
def server_ctx(server: Server) -> Iterator[Any]:
    """The ``server`` fixture's registry opened in this process (a RegistryContext)."""
    with server.context() as ctx:
        yield ctx


@pytest.fixture(scope="module")
def sqlite_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  pg_databases: list[str]) -> Server:
    return make_server(request, tmp_path_factory, pg_databases, "sqlite")


@pytest.fixture
def name() -> str:
    """A model name no other test uses."""
    return f"m-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from registry.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"))


# --------------------------------------------------------------------------- worker stacks


@dataclass
class Stack:
    """API + dispatcher + worker processes sharing one registry (one broker)."""

    server: Server
    broker: str
    env: dict[str, str]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis: RedisProcess | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def client(self):  # type: ignore[no-untyped-def]
        return self.server.client()

    def start_worker(self, name: str, **extra: str) -> subprocess.Popen[bytes]:
        log = self.server.home / f"{name}.log"
        with open(log, "ab") as f:
            p = subprocess.Popen([sys.executable, "-m", "registry", "worker", "--hostname", f"{name}@test"],
                                 env={**self.env, **extra}, stdout=f, stderr=subprocess.STDOUT)
        self.workers[name] = p
        return p

    def start_dispatcher(self) -> None:
        with open(self.server.home / "dispatcher.log", "ab") as f:
            self.others.append(subprocess.Popen([sys.executable, "-m", "registry", "dispatcher"], env=self.env,
                                                stdout=f, stderr=subprocess.STDOUT))

    def wait_job(self, job_id: int, timeout: float = 120):  # type: ignore[no-untyped-def]  # -> registry.client.Job
        with self.client() as rc:
            try:
                return rc.wait_job(job_id, timeout=timeout, poll=0.2)
            except Exception:
                self.dump_logs()
                raise

    def wait_for(self, predicate, timeout: float = 120, what: str = "condition"):  # type: ignore[no-untyped-def]
        return wait_until(predicate, timeout, what, on_timeout=self.dump_logs)

    def dump_logs(self) -> None:
        for log in sorted(self.server.home.glob("*.log")):
            print(f"===== {log.name}\n{log.read_text()[-6000:]}")

    def stop(self) -> None:
        for p in [*self.workers.values(), *self.others]:
            if p.poll() is None:
                p.terminate()
        for p in [*self.workers.values(), *self.others]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.server.stop()
        if self.redis is not None:
            self.redis.stop()


@dataclass
class RedisProcess:
    """A private redis-server (so a test may stop and restart its broker)."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            if REQUIRE_SERVICES:
                pytest.fail("redis-server is not installed (REGISTRY_TEST_REQUIRE_SERVICES=1)")
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not reachable("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def make_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str],
               broker: str, workers: int = 2, **extra: str) -> Stack:
    home = tmp_path_factory.mktemp(f"stack-{broker}")
    redis = None
    if broker == "redis":
        need_postgres()
        redis = RedisProcess(free_port())
        redis.start()
        db_url = new_pg_database(pg_databases)
        broker_env = {"REGISTRY_BROKER_URL": redis.url, "REGISTRY_RESULT_BACKEND": redis.url,
                      "REGISTRY_BROKER_VISIBILITY_TIMEOUT": "10"}
    else:
        db_url = f"sqlite:///{home / 'registry.db'}"
        broker_env = {}
    settings_env = {"REGISTRY_JOB_STALE_SECONDS": "3", "REGISTRY_DISPATCH_INTERVAL": "0.2",
                    "REGISTRY_WEBHOOK_ALLOW_PRIVATE": "true", "REGISTRY_WEBHOOK_BACKOFF_SECONDS": "0.2",
                    **broker_env, **extra}
    srv = start_server(home, db_url, broker, **settings_env)
    stack = Stack(srv, broker, {**srv.env}, redis=redis)
    request.addfinalizer(stack.stop)
    stack.start_dispatcher()
    for i in range(workers):
        stack.start_worker(f"w{i + 1}")
    return stack


@pytest.fixture(scope="module", params=["sqla", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Stack:
    """API + dispatcher + 2 Celery workers: embedded SQLite broker + SQLite, or Redis + PostgreSQL."""
    return make_stack(request, tmp_path_factory, pg_databases, request.param)
