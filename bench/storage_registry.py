"""Packed storage through the product: push a corpus pinned to its bases, pack every version,
report stored/logical bytes per version and in total, pack MB/s per core, and packed-download
throughput beside a raw stored download of the same bytes (measured in the same run), with the
API server's peak RSS increase.

    python bench/storage_registry.py                      # the synthetic corpus below (~0.3 GB)
    python bench/storage_registry.py --corpus bench.storage   # bench/storage.py's corpus (real fine-tunes)

Two registries on loopback: A keeps files as uploaded (``REGISTRY_PACK=off``: the raw baseline),
B holds the same versions and packs them (in this process, timed; CPU seconds via
``time.process_time`` — the codec runs on one core).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.io import reset_peak, rss_kb  # noqa: E402
from registry.client import RegistryClient  # noqa: E402
from registry.config import Settings  # noqa: E402
from registry.services import packing  # noqa: E402
from registry.services.context import RegistryContext  # noqa: E402
from tests.conftest import start_server  # noqa: E402


@dataclass
class Entry:
    name: str  # model name in the registry
    folder: Path
    kind: str  # base | finetune
    base: str | None  # name of the entry it is pinned to


def synthetic_corpus(root: Path, layers: int = 12, hidden: int = 1024, rel_delta: float = 0.01) -> list[Entry]:
    """A bf16 base (init-like scales), two fine-tunes with Gaussian deltas of relative size
    ``rel_delta`` per tensor, an fp32 copy of the first, and a re-sharded re-upload."""
    g = torch.Generator().manual_seed(0)
    shapes = {}
    for i in range(layers):
        for p, s in {"q": (hidden, hidden), "k": (hidden // 4, hidden), "v": (hidden // 4, hidden),
                     "o": (hidden, hidden), "up": (hidden * 3, hidden), "down": (hidden, hidden * 3)}.items():
            shapes[f"layers.{i}.{p}.weight"] = s
        shapes[f"layers.{i}.norm.weight"] = (hidden,)
    base = {n: (torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 0.0) + (1.0 if len(s) == 1 else 0.0))
            for n, s in shapes.items()}

    def tuned(seed: int) -> dict[str, torch.Tensor]:
        gg = torch.Generator().manual_seed(seed)
        return {n: t + torch.randn(t.shape, generator=gg) * (t.std() if t.numel() > 1 and t.std() > 0 else 0.01)
                * rel_delta for n, t in base.items()}

    def save(name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, shards: int = 1) -> Path:
        folder = root / name
        if folder.exists():
            return folder
        folder.mkdir(parents=True)
        names = sorted(tensors)
        parts = [names[i::shards] for i in range(shards)]
        for k, part in enumerate(parts):
            fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].to(dtype).contiguous() for n in part}, str(folder / fname))
        (folder / "config.json").write_text('{"model_type": "bench"}\n')
        return folder

    ft1, ft2 = tuned(1), tuned(2)
    return [
        Entry("base-bf16", save("base-bf16", base, torch.bfloat16), "base", None),
        Entry("ft1-bf16", save("ft1-bf16", ft1, torch.bfloat16), "finetune", "base-bf16"),
        Entry("ft2-bf16", save("ft2-bf16", ft2, torch.bfloat16), "finetune", "base-bf16"),
        Entry("ft1-bf16-resharded", save("ft1-bf16-resharded", ft1, torch.bfloat16, shards=2), "finetune",
              "base-bf16"),
        Entry("base-fp32", save("base-fp32", base, torch.float32), "base", None),
        Entry("ft1-fp32", save("ft1-fp32", ft1, torch.float32), "finetune", "base-fp32"),
    ]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def download(url: str, ref: str, path: str) -> int:
    name, v = ref.split("@")
    n = 0
    with httpx.stream("GET", f"{url}/api/v1/models/{name}/versions/{v}/files/{path}", timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes(4 << 20):
            n += len(chunk)
    return n


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="synthetic", help="synthetic, or a module with build_registry_corpus(root)")
    ap.add_argument("--data", type=Path, default=Path(".bench-data/storage-registry"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.corpus == "synthetic":
        entries = synthetic_corpus(args.data / "corpus")
    else:
        entries = [Entry(**e) if isinstance(e, dict) else e
                   for e in importlib.import_module(args.corpus).build_registry_corpus(args.data / "corpus")]
    load_start = os.getloadavg()[0]
    scratch = args.data / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    servers = {}
    try:
        for label in ("raw", "packed"):
            home = scratch / label
            servers[label] = start_server(home, f"sqlite:///{home / 'registry.db'}", REGISTRY_PACK="off")
        refs: dict[str, str] = {}
        for label, srv in servers.items():
            with RegistryClient(srv.url) as rc:
                for e in entries:
                    base = refs.get(f"{label}:{e.base}") if e.base else None
                    v = rc.push(e.folder, e.name, kind=e.kind, base=base)
                    refs[f"{label}:{e.name}"] = v.ref
        srv = servers["packed"]
        ctx = RegistryContext.open(Settings(home=srv.home, database_url=srv.database_url))
        rows = []
        cpu_total = wall_total = bytes_total = 0.0
        try:
            with RegistryClient(srv.url) as rc:
                for e in entries:
                    v = rc.get_version(refs[f"packed:{e.name}"])
                    t, c = time.perf_counter(), time.process_time()
                    report = packing.pack_version(ctx, v.id)
                    wall, cpu = time.perf_counter() - t, time.process_time() - c
                    cpu_total += cpu
                    wall_total += wall
                    bytes_total += report.logical_bytes
                    v = rc.get_version(v.ref)
                    rows.append((e, v, wall, cpu, report))
                total = rc.storage().total
        finally:
            ctx.close()
        print(f"\nPacked storage through the registry ({args.corpus} corpus); {os.cpu_count()} CPU cores, "
              f"load average {load_start:.1f} at the start\n")
        print("| version | kind | reference | logical MB | stored MB | stored / logical | pack MB/s (CPU) |")
        print("|---|---|---|---:|---:|---:|---:|")
        for e, v, _wall, cpu, report in rows:
            refd = ", ".join(report.references[:1]) or "–"
            print(f"| {e.name} | {e.kind} | {refd} | {v.size / 1e6:.1f} | {v.stored_bytes / 1e6:.2f} | "
                  f"{v.stored_bytes / v.size:.3f} | {v.size / 1e6 / max(cpu, 1e-9):.0f} |")
        print(f"| **total** | | | {total.logical_bytes / 1e6:.1f} | {total.stored_bytes / 1e6:.2f} | "
              f"{total.ratio:.3f} | {bytes_total / 1e6 / max(cpu_total, 1e-9):.0f} |")
        print(f"\nstore after packing: {total.object_bytes / 1e6:.1f} MB in {total.objects} objects "
              f"({total.chunks} chunks)")

        # downloads: the biggest fine-tune's weights, raw (A) against packed (B), taking turns so
        # that both see the same load
        e = max((x for x in entries if x.kind == "finetune"), key=lambda x: _size(x.folder))
        weights = sorted(p.name for p in e.folder.glob("*.safetensors"))[0]
        size = (e.folder / weights).stat().st_size
        best = {label: float("inf") for label in servers}
        rss = {label: 0 for label in servers}
        cpu = {label: float("inf") for label in servers}
        # each server's resident memory before its first download (a packed one holds the codec's
        # compiled kernels, loaded when it starts)
        idle = {label: rss_kb(srv.proc.pid, "VmRSS") for label, srv in servers.items() if srv.proc is not None}
        for _ in range(args.repeat):
            for label in ("raw", "packed"):
                srv = servers[label]
                assert srv.proc is not None
                base_rss, cpu0 = reset_peak(srv.proc.pid), cpu_seconds(srv.proc.pid)
                t = time.perf_counter()
                assert download(srv.url, refs[f"{label}:{e.name}"], weights) == size
                best[label] = min(best[label], time.perf_counter() - t)
                cpu[label] = min(cpu[label], cpu_seconds(srv.proc.pid) - cpu0)
                rss[label] = max(rss[label], rss_kb(srv.proc.pid, "VmHWM") - base_rss)
        print(f"\nDownload of {e.name}/{weights} ({size / 2**20:.0f} MiB), best of {args.repeat} "
              f"(raw and packed taking turns; load average {os.getloadavg()[0]:.1f} at the end):\n")
        print("| stored as | seconds | MiB/s | vs raw | server CPU ms per MiB | server peak RSS increase | "
              "server RSS before |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label in ("raw", "packed"):
            print(f"| {label} | {best[label]:.2f} | {size / 2**20 / best[label]:.0f} | "
                  f"{best['raw'] / best[label]:.2f}× | {cpu[label] * 1e3 / (size / 2**20):.2f} | "
                  f"{rss[label] / 1024:.0f} MB | {idle.get(label, 0) / 1024:.0f} MB |")
    finally:
        for srv in servers.values():
            srv.stop()


if __name__ == "__main__":
    main()
