"""The client's own cost: registry.client (sync and async drivers of the same flows) against plain
httpx doing the same HTTP in the same run, on one embedded server over loopback.

- push / pull of one safetensors checkpoint: RegistryClient and AsyncRegistryClient against a
  plain-httpx push (draft, one streamed PUT with its sha256, commit) and pull (one streamed GET,
  hashed and written to disk);
- many small requests: ``get_version`` N times, against httpx GET + JSON decoding (what the flow
  machinery and the typed models add per request).

The three contenders of each operation run interleaved, in a rotating order, and the best of
``--repeat`` rounds counts, so load on a shared machine hits them alike.

    python bench/client.py                  # 256 MiB, 3 repeats, 300 small requests
    python bench/client.py --size-mb 64 --requests 100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.io import make_model  # noqa: E402
from registry.client import AsyncRegistryClient, RegistryClient  # noqa: E402
from tests.conftest import start_server  # noqa: E402


def raw_push(url: str, folder: Path, name: str) -> None:
    api = url + "/api/v1"
    with httpx.Client(timeout=600) as c:
        draft = c.post(api + "/drafts", json={"model": name}).json()
        for p in sorted(folder.iterdir()):
            sha = hashlib.sha256(p.read_bytes()).hexdigest()

            def body(p: Path = p) -> object:
                with open(p, "rb") as f:
                    while chunk := f.read(4 << 20):
                        yield chunk

            r = c.put(f"{api}/drafts/{draft['id']}/files/{p.name}", content=body(),
                      headers={"X-Checksum-Sha256": sha, "Content-Length": str(p.stat().st_size)})
            r.raise_for_status()
        c.post(f"{api}/drafts/{draft['id']}/commit").raise_for_status()


def raw_pull(url: str, ref: str, dest: Path) -> None:
    name, _, v = ref.partition("@")
    api = f"{url}/api/v1/models/{name}/versions/{v}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with httpx.Client(timeout=600) as c:
        for f in c.get(api).json()["files"]:
            h = hashlib.sha256()
            with c.stream("GET", f"{api}/files/{f['path']}") as r, open(dest / f["path"], "wb") as out:
                for chunk in r.iter_bytes(4 << 20):
                    out.write(chunk)
                    h.update(chunk)
            assert h.hexdigest() == f["sha256"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--data", type=Path, default=Path(".bench-data/client"))
    args = ap.parse_args()
    # distinct bytes for every push (3 contenders × repeats), so no push is answered by deduplication
    n_sources = 3 * args.repeat
    sources = [make_model(args.data / f"model-{args.size_mb}-{i}", args.size_mb, seed=100 + i)
               for i in range(n_sources)]
    scratch = args.data / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    home = scratch / "home"
    srv = start_server(home, f"sqlite:///{home / 'registry.db'}")
    url = srv.url
    it = iter(range(n_sources))
    try:
        with RegistryClient(url) as rc:
            rc.push(make_model(scratch / "warm", 4), "warmup")
            for folder in sources:
                (folder / "model.safetensors").read_bytes()  # page cache warm for everyone

            def next_source() -> tuple[Path, str]:
                i = next(it)
                return sources[i], f"bench-{i}"

            dest = scratch / "pulled"

            def sync_pull() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                rc.pull("bench-0@1", dest)

            async def apush() -> None:
                async with AsyncRegistryClient(url) as arc:
                    await arc.push(*next_source())

            async def apull() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                async with AsyncRegistryClient(url) as arc:
                    await arc.pull("bench-0@1", dest)

            n = args.requests
            raw = httpx.Client(base_url=url + "/api/v1")

            async def aget() -> None:
                async with AsyncRegistryClient(url) as arc:
                    for _ in range(n):
                        await arc.get_version("bench-0@1")

            contenders = {
                "push": [lambda: raw_push(url, *next_source()), lambda: rc.push(*next_source()),
                         lambda: asyncio.run(apush())],
                "pull": [lambda: raw_pull(url, "bench-0@1", dest), sync_pull, lambda: asyncio.run(apull())],
                "get": [lambda: [json.loads(raw.get("/models/bench-0/versions/1").content) for _ in range(n)],
                        lambda: [rc.get_version("bench-0@1") for _ in range(n)], lambda: asyncio.run(aget())],
            }
            times = {op: [float("inf")] * 3 for op in contenders}
            for r in range(args.repeat):  # interleaved, each round in another order: load hits all alike
                for op, fns in contenders.items():
                    for k in [(r + j) % 3 for j in range(3)]:
                        t = time.perf_counter()
                        fns[k]()
                        times[op][k] = min(times[op][k], time.perf_counter() - t)
            raw.close()
            (t_push_raw, t_push_sync, t_push_async) = times["push"]
            (t_pull_raw, t_pull_sync, t_pull_async) = times["pull"]
            (t_get_raw, t_get_sync, t_get_async) = times["get"]
        mib = sum(p.stat().st_size for p in sources[0].iterdir()) / 2**20
        print(f"\n{mib:.0f} MiB checkpoint and {n} small requests, embedded server (SQLite) on loopback, best of "
              f"{args.repeat}; {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}\n")
        print("| operation | plain httpx | RegistryClient | AsyncRegistryClient | sync / httpx | async / httpx |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, raw_t, sync_t, async_t in (
                ("push (hash, upload, commit)", t_push_raw, t_push_sync, t_push_async),
                ("pull (download, verify sha256)", t_pull_raw, t_pull_sync, t_pull_async),
                (f"{n} × get_version", t_get_raw, t_get_sync, t_get_async)):
            unit = (lambda t: f"{mib / t:.0f} MiB/s") if "×" not in label else (lambda t: f"{t * 1e3 / n:.2f} ms each")
            print(f"| {label} | {unit(raw_t)} | {unit(sync_t)} | {unit(async_t)} | {sync_t / raw_t:.2f}× time | "
                  f"{async_t / raw_t:.2f}× time |")
    finally:
        srv.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
