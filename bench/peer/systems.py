"""The two systems under test, each as: start a server, populate it, and the operations to measure.

Every operation is an async function ``(conn, i) -> requests sent``; ``i`` picks the target
deterministically, so both systems see the same sequence of models, versions and tag values.

Data set (both systems, through their HTTP APIs): ``models`` registered models ``m000..``;
``versions`` versions spread round-robin over them; version ``i`` carries four tags:
``bucket = i % 100`` (matches 1 %), ``decile = i % 10`` (10 %), ``stage`` (dev/prod) and
``owner`` (one of 5 teams); every model gets the alias ``production`` on its version
``alias_version``. Versions created by the "create" operations carry ``bucket = decile = new``,
so they never change the search results.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
from safetensors.numpy import save

from .loadgen import Conn, Operation

ROOT = Path(__file__).resolve().parents[2]


def tags_for(i: int) -> dict[str, str]:
    return {"bucket": str(i % 100), "decile": str(i % 10), "stage": ("dev", "prod")[i % 2],
            "owner": f"team-{i % 5}"}


NEW_TAGS = {"bucket": "new", "decile": "new", "stage": "dev", "owner": "bench"}


def weights_bytes(i: int) -> bytes:
    """A tiny valid safetensors file (one 4x4 float16 tensor), distinct for every ``i``."""
    return save({"w": np.zeros((4, 4), dtype=np.float16)}, metadata={"i": str(i)})


def pick(i: int, n: int, salt: int) -> int:
    """A deterministic, well-spread index in ``range(n)`` for operation ``i``."""
    return (i * 2654435761 + salt * 40503) % (2**32) % n


def proc_tree_cpu(root: int) -> float:
    """User+system CPU seconds of ``root`` and all its descendants (Linux /proc)."""
    return sum(proc_tree_cpu_by_pid(root).values())


def proc_tree_cpu_by_pid(root: int) -> dict[int, float]:
    """User+system CPU seconds of ``root`` and of each of its descendants, by pid (Linux /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / tick
    out: dict[int, float] = {}
    todo = [root]
    while todo:
        p = todo.pop()
        out[p] = stats.get(p, 0.0)
        todo.extend(children.get(p, []))
    return out


def busiest_share(before: dict[int, float], after: dict[int, float]) -> float:
    """The largest share one process took of the CPU a process tree used between two snapshots."""
    used = [after[p] - before.get(p, 0.0) for p in after]
    total = sum(used)
    return max(used) / total if total > 0 else 0.0


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server did not answer {url} in {timeout} s:\n{log.read_text()[-4000:]}")


def wait_idle(root: int, timeout: float = 120, window: float = 1.0, busy: float = 0.1) -> None:
    """Wait until the process tree of ``root`` uses less than ``busy`` of a core over ``window`` s.

    The first worker to finish starting answers the health check while the others may still be
    importing (MLflow's take several seconds); connections opened then all land on the ready one."""
    deadline = time.monotonic() + timeout
    before = proc_tree_cpu(root)
    while time.monotonic() < deadline:
        time.sleep(window)
        after = proc_tree_cpu(root)
        if after - before < busy * window:
            return
        before = after


@dataclass
class System:
    """A server process (own session, so it is stopped with everything it started)."""

    label: str
    port: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    shas: list[tuple[str, int]] = field(default_factory=list)  # ours: blobs of populated versions
    tree: Path = ROOT  # ours: the source tree the server runs from (another checkout for before/after)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return proc_tree_cpu(self.proc.pid) if self.proc else 0.0

    def cpu_by_pid(self) -> dict[int, float]:
        return proc_tree_cpu_by_pid(self.proc.pid) if self.proc else {}

    def _spawn(self, argv: list[str], env: dict[str, str], health: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.home / "server.log"
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=self.home,
                                         start_new_session=True)
        wait_http(self.url + health, self.proc, log)
        wait_idle(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # the session/group this process leads (start_new_session=True)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):  # uvicorn workers that outlived their parent
            os.killpg(pgid, signal.SIGKILL)

    # what each system implements
    def start(self, db_url: str, workers: int) -> None:
        raise NotImplementedError

    async def create_models(self, conn: Conn, names: list[str]) -> None:
        raise NotImplementedError

    def populate_op(self, models: int) -> Operation:
        raise NotImplementedError

    async def set_alias(self, conn: Conn, model: str, alias: str, version: int) -> None:
        raise NotImplementedError

    def operations(self, *, models: int, per_model: int, round_tag: str, create_models: int) -> dict[str, Operation]:
        raise NotImplementedError

    async def count_hits(self, conn: Conn, key: str, value: str) -> int:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ ours


class Ours(System):
    API = "/api/v1"
    one_request_create = False  # set at start: whether this tree's server has POST /models/{name}/versions

    def start(self, db_url: str, workers: int) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import server_env

        env = server_env(self.home, db_url, REGISTRY_PORT=str(self.port), REGISTRY_API_WORKERS=str(workers))
        env["PYTHONPATH"] = str(self.tree)  # ahead of the editable install of /work/main
        self._spawn([sys.executable, "-m", "registry", "up", "--api-workers", str(workers)], env,
                    self.API + "/health")
        # One-request create (POST /models/{name}/versions): only trees that have it (--ours-tree of an older one).
        paths = httpx.get(self.url + "/openapi.json", timeout=30).json()["paths"]
        self.one_request_create = "post" in paths.get(self.API + "/models/{name}/versions", {})

    async def create_models(self, conn: Conn, names: list[str]) -> None:
        for name in names:
            await conn.call("POST", f"{self.API}/models", {"name": name, "kind": "base"})

    def populate_op(self, models: int) -> Operation:
        api = self.API
        shas = self.shas

        async def op(conn: Conn, i: int) -> int:
            data = weights_bytes(i)
            d = await conn.call("POST", f"{api}/drafts", {"model": f"m{i % models:03d}", "kind": "base",
                                                           "tags": tags_for(i)})
            await conn.call("PUT", f"{api}/drafts/{d['id']}/files/model.safetensors", raw=data,
                            content_type="application/octet-stream")
            await conn.call("POST", f"{api}/drafts/{d['id']}/commit")
            shas.append((hashlib.sha256(data).hexdigest(), len(data)))
            return 3

        return op

    async def set_alias(self, conn: Conn, model: str, alias: str, version: int) -> None:
        await conn.call("PUT", f"{self.API}/models/{model}/aliases/{alias}", {"version": str(version)})

    def operations(self, *, models: int, per_model: int, round_tag: str, create_models: int) -> dict[str, Operation]:
        api = self.API
        shas = self.shas

        async def get_number(conn: Conn, i: int) -> int:
            m, v = pick(i, models, 1), 1 + pick(i, per_model, 2)
            await conn.call("GET", f"{api}/models/m{m:03d}/versions/{v}")
            return 1

        async def get_alias(conn: Conn, i: int) -> int:
            await conn.call("GET", f"{api}/models/m{pick(i, models, 3):03d}/versions/production")
            return 1

        def search(key: str, n: int) -> Operation:
            async def op(conn: Conn, i: int) -> int:
                await conn.call("GET", f"{api}/versions?tag={quote(f'{key}={pick(i, n, 4)}')}&limit=100")
                return 1

            return op

        def create(upload: bool) -> Operation:
            async def op(conn: Conn, i: int) -> int:
                model = f"{round_tag}-{'u' if upload else 'l'}{i % create_models:02d}"
                d = await conn.call("POST", f"{api}/drafts", {"model": model, "kind": "base", "tags": NEW_TAGS})
                if upload:
                    await conn.call("PUT", f"{api}/drafts/{d['id']}/files/model.safetensors",
                                    raw=weights_bytes(10**7 + i), content_type="application/octet-stream")
                else:  # bytes the registry already holds (a populated version's weights): no upload
                    sha, size = shas[i % len(shas)]
                    await conn.call("POST", f"{api}/drafts/{d['id']}/links",
                                    {"path": "model.safetensors", "sha256": sha, "size": size})
                await conn.call("POST", f"{api}/drafts/{d['id']}/commit")
                return 3

            return op

        async def create_manifest(conn: Conn, i: int) -> int:
            # One request: the manifest names bytes the registry already holds (the same as "create" links).
            sha, size = shas[i % len(shas)]
            await conn.call("POST", f"{api}/models/{round_tag}-m{i % create_models:02d}/versions", {
                "files": [{"path": "model.safetensors", "sha256": sha, "size": size}], "kind": "base",
                "tags": NEW_TAGS})
            return 1

        ops = {"get_number": get_number, "get_alias": get_alias, "search_1": search("bucket", 100),
               "search_10": search("decile", 10), "create": create(False), "create_upload": create(True)}
        if self.one_request_create:
            ops["create_manifest"] = create_manifest
        return ops

    def create_model_names(self, round_tag: str, create_models: int) -> list[str]:
        return [f"{round_tag}-{kind}{k:02d}" for kind in ("l", "u", "m") for k in range(create_models)]

    async def count_hits(self, conn: Conn, key: str, value: str) -> int:
        page = await conn.call("GET", f"{self.API}/versions?tag={quote(f'{key}={value}')}&limit=1000")
        return len(page["items"])


# ---------------------------------------------------------------------------------------- MLflow


class MLflow(System):
    API = "/api/2.0/mlflow"

    def start(self, db_url: str, workers: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No background job runner (huey consumers): the registry's workers are off too.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        art = (self.home / "artifacts").resolve().as_uri()
        self._spawn([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db_url,
                     "--default-artifact-root", art, "--host", "127.0.0.1", "--port", str(self.port),
                     "--workers", str(workers)], env, "/health")

    async def create_models(self, conn: Conn, names: list[str]) -> None:
        for name in names:
            await conn.call("POST", f"{self.API}/registered-models/create", {"name": name})

    def populate_op(self, models: int) -> Operation:
        api = self.API

        async def op(conn: Conn, i: int) -> int:
            name = f"m{i % models:03d}"
            await conn.call("POST", f"{api}/model-versions/create", {
                "name": name, "source": f"s3://bench-bucket/{name}/{i}",
                "tags": [{"key": k, "value": v} for k, v in tags_for(i).items()]})
            return 1

        return op

    async def set_alias(self, conn: Conn, model: str, alias: str, version: int) -> None:
        await conn.call("POST", f"{self.API}/registered-models/alias",
                        {"name": model, "alias": alias, "version": str(version)})

    def operations(self, *, models: int, per_model: int, round_tag: str, create_models: int) -> dict[str, Operation]:
        api = self.API

        async def get_number(conn: Conn, i: int) -> int:
            m, v = pick(i, models, 1), 1 + pick(i, per_model, 2)
            await conn.call("GET", f"{api}/model-versions/get?name=m{m:03d}&version={v}")
            return 1

        async def get_alias(conn: Conn, i: int) -> int:
            await conn.call("GET", f"{api}/registered-models/alias?name=m{pick(i, models, 3):03d}&alias=production")
            return 1

        def search(key: str, n: int) -> Operation:
            async def op(conn: Conn, i: int) -> int:
                flt = quote(f"tags.{key} = '{pick(i, n, 4)}'")
                await conn.call("GET", f"{api}/model-versions/search?filter={flt}&max_results=100")
                return 1

            return op

        async def create(conn: Conn, i: int) -> int:
            name = f"{round_tag}-l{i % create_models:02d}"
            await conn.call("POST", f"{api}/model-versions/create", {
                "name": name, "source": f"s3://bench-bucket/{name}/{i}",
                "tags": [{"key": k, "value": v} for k, v in NEW_TAGS.items()]})
            return 1

        return {"get_number": get_number, "get_alias": get_alias, "search_1": search("bucket", 100),
                "search_10": search("decile", 10), "create": create}

    def create_model_names(self, round_tag: str, create_models: int) -> list[str]:
        return [f"{round_tag}-l{k:02d}" for k in range(create_models)]

    async def count_hits(self, conn: Conn, key: str, value: str) -> int:
        n, token = 0, None
        while True:
            q = f"filter={quote(f'tags.{key} = {chr(39)}{value}{chr(39)}')}&max_results=1000"
            page = await conn.call("GET", f"{self.API}/model-versions/search?{q}"
                                   + (f"&page_token={quote(token)}" if token else ""))
            n += len(page.get("model_versions", []))
            token = page.get("next_page_token")
            if not token:
                return n


SYSTEMS: dict[str, Callable[..., System]] = {"ours": Ours, "mlflow": MLflow}
