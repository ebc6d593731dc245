"""Push and pull a ~1 GB safetensors checkpoint over HTTP on loopback against the embedded server.

Prints throughput next to `cp` of the same file measured in the same run, the CPU time the client
(this process) and the server spent on each operation, and the server's peak RSS increase during
each operation (Linux: VmHWM after resetting it through /proc/PID/clear_refs).

    python bench/io.py                 # 1 GiB, embedded default (SQLite + local blobs)
    python bench/io.py --size-mb 256   # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.client import RegistryClient  # noqa: E402
from tests.conftest import start_server  # noqa: E402


def make_model(folder: Path, size_mb: int, seed: int = 0) -> Path:
    path = folder / "model.safetensors"
    if path.exists() and abs(path.stat().st_size - size_mb * 2**20) < 2**20:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n = 16
    per = size_mb * 2**20 // n // 2  # fp16 elements per tensor
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(per, generator=g).to(torch.float16) for i in range(n)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    (folder / "config.json").write_text(f'{{"model_type": "bench", "seed": {seed}}}\n')
    return folder


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_kb(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--data", type=Path, default=Path(".bench-data/io"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    loadavg_start = Path("/proc/loadavg").read_text().strip()
    # distinct bytes for every push, so that no push is answered by deduplication
    sources = [make_model(args.data / f"model-{args.size_mb}-{i}", args.size_mb, seed=i)
               for i in range(args.repeat)]
    src = sources[0]
    weights = src / "model.safetensors"
    size = weights.stat().st_size
    scratch = args.data / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    home = scratch / "home"

    weights.read_bytes()  # warm the page cache for every contender alike
    cp_dest = scratch / "cp.safetensors"

    def do_cp() -> None:
        cp_dest.unlink(missing_ok=True)
        subprocess.run(["cp", str(weights), str(cp_dest)], check=True)

    def do_cp_sync() -> None:
        do_cp()
        fd = os.open(cp_dest, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    t_cp = timed(do_cp, args.repeat)
    t_cp_sync = timed(do_cp_sync, args.repeat)
    cp_dest.unlink()

    srv = start_server(home, f"sqlite:///{home / 'registry.db'}")  # API only: no worker, no MLflow UI
    assert srv.proc is not None
    server, url = srv.proc, srv.url
    try:
        with RegistryClient(url) as rc:
            rc.push(make_model(scratch / "warm", 4), "warmup")  # first request imports lazily loaded code
            def measure(fn) -> tuple[float, int, float, float]:  # type: ignore[no-untyped-def]
                """(seconds, server peak RSS increase in KiB, client CPU s, server CPU s) of one call."""
                base = reset_peak(server.pid)
                c0, s0, t = time.process_time(), cpu_seconds(server.pid), time.perf_counter()
                fn()
                return (time.perf_counter() - t, rss_kb(server.pid, "VmHWM") - base,
                        time.process_time() - c0, cpu_seconds(server.pid) - s0)

            def best(runs: list[tuple[float, int, float, float]]) -> tuple[float, int, float, float]:
                """Fastest time, largest RSS increase, least CPU (each over the runs: CPU time is
                what load from other processes stretches least)."""
                return (min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs),
                        min(r[3] for r in runs))

            for folder in sources:
                folder.joinpath("model.safetensors").read_bytes()
            push = best([measure(lambda f=f, i=i: rc.push(f, f"bench-{i}")) for i, f in enumerate(sources)])
            push_nd = best([measure(lambda f=f, i=i: rc.push(f, f"bench-nd-{i}", dedup=False))
                            for i, f in enumerate(sources)])
            dedup = best([measure(lambda i=i: rc.push(src, f"bench-dup-{i}")) for i in range(args.repeat)])
            dest = scratch / "pulled"

            def pull() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                rc.pull("bench-0@1", dest)

            pulled = best([measure(pull) for _ in range(args.repeat)])
            assert (dest / "model.safetensors").stat().st_size == size
        mb = size / 2**20
        rows = [
            ("cp (page cache, no fsync)", (t_cp, None, None, None)),
            ("cp + fsync (durable copy)", (t_cp_sync, None, None, None)),
            ("push new bytes (dedup probe, upload hashing while sending, validate + NaN scan, fsync, commit)",
             push),
            ("push new bytes --no-dedup (hash while sending)", push_nd),
            ("push identical bytes again (deduplicated: hashed, linked, not sent)", dedup),
            ("pull (download, verify sha256 on both ends)", pulled),
        ]
        print(f"\n{mb:.0f} MiB safetensors file, embedded server (SQLite + local blobs) on loopback, "
              f"best of {args.repeat}; {os.cpu_count()} CPU cores; /proc/loadavg {loadavg_start} at start, "
              f"{Path('/proc/loadavg').read_text().strip()} at the end\n")
        print("| operation | seconds | MiB/s | vs cp | vs cp + fsync | client CPU s | server CPU s | "
              "server peak RSS increase |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, (t, rss, c_cpu, s_cpu) in rows:
            print(f"| {label} | {t:.2f} | {mb / t:.0f} | {t_cp / t:.2f}× | {t_cp_sync / t:.2f}× | "
                  f"{'–' if c_cpu is None else f'{c_cpu:.2f}'} | {'–' if s_cpu is None else f'{s_cpu:.2f}'} | "
                  f"{'–' if rss is None else f'{rss / 1024:.0f} MB'} |")
    finally:
        srv.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
