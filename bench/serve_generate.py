"""Benchmark: the server-side cost of generating a derived:basis adapter (no HTTP), new path vs old.

The adapters of ``bench/serve.py`` (8 × r = 16, 32 layers × 4 modules of 2048 × 2048, fp16) are fitted
into a basis with p = n − 1 and saved; then, interleaved, best of ``--repeat``, wall and CPU time:

* ``read stored``: reading the stored member's ``adapter_model.safetensors`` (what a stored download reads);
* ``old``: ``load_basis`` + ``reconstruct`` + ``save_peft_adapter`` into a folder + reading it back (the
  generator before issue 13's work);
* ``new``: ``rmm.load_member_files`` + streaming every byte (what the server sends now), which reads only
  μ, U and the member's coefficients, module by module; the two give the same bytes (checked).

    python bench/serve_generate.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.weights import rmm  # noqa: E402
from registry.weights.adapters import WEIGHTS_NAME, load_peft_adapter, save_peft_adapter  # noqa: E402
from registry.weights.checkpoint import safetensors_range  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import make_adapter  # noqa: E402


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(".bench-data/serve-generate"))
    a = ap.parse_args()
    a.data.mkdir(parents=True, exist_ok=True)
    folders = [a.data / f"a{i}" for i in range(8)]
    basis_file = a.data / "basis.safetensors"
    if not basis_file.exists():
        for i, f in enumerate(folders):
            make_adapter(f, 32, 2048, 16, i)
        rmm.save_basis(rmm.fit_basis([load_peft_adapter(f) for f in folders], p=7), basis_file)

    def old() -> bytes:
        out = Path(tempfile.mkdtemp())
        save_peft_adapter(rmm.load_basis(basis_file).reconstruct(0, device="cpu"), out)
        data = (out / WEIGHTS_NAME).read_bytes()
        shutil.rmtree(out)
        return data

    def new() -> bytes:
        m = rmm.load_member_files(basis_file, 0)
        return b"".join(safetensors_range(m.layout, 0, m.layout.total_size, m.read))

    def stored() -> bytes:
        return (folders[0] / WEIGHTS_NAME).read_bytes()

    assert old() == new()
    rows: dict[str, list[tuple[float, float]]] = {"read stored": [], "old": [], "new": []}
    fns: dict[str, Callable[[], bytes]] = {"read stored": stored, "old": old, "new": new}
    for _ in range(a.repeat):
        for k, fn in fns.items():
            c0, t0 = cpu(), time.perf_counter()
            fn()
            rows[k].append((time.perf_counter() - t0, cpu() - c0))
    w0, c0 = min(x[0] for x in rows["read stored"]), min(x[1] for x in rows["read stored"])
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"member file {len(stored()) / 2**20:.1f} MiB, basis {basis_file.stat().st_size / 2**20:.0f} MiB\n")
    print("| generate one member | wall (s) | CPU (s) |")
    print("|---|---:|---:|")
    for k, xs in rows.items():
        w, c = min(x[0] for x in xs), min(x[1] for x in xs)
        print(f"| {k} | {w:.3f} | {c:.3f} |")
    wn, wo = min(x[0] for x in rows["new"]), min(x[0] for x in rows["old"])
    cn, co = min(x[1] for x in rows["new"]), max(min(x[1] for x in rows["old"]), 1e-9)
    print(f"\nnew / old: wall {wn / wo:.2f}×, CPU {cn / co:.2f}× (stored read: {w0:.3f} s, {c0:.3f} s)")


if __name__ == "__main__":
    main()
