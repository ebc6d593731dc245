"""Benchmark: RMM fit vs reading the adapters, wall and CPU time, one process, one torch thread by default.

The data of ``bench/rmm.py`` (8 rank-16 adapters of a 7B-shaped model, generated once under
``.bench-data/rmm``); two interleaved read / fit rounds. Run it with PYTHONPATH on another tree (and from
a directory that does not shadow it) to time that code the same way:

    python bench/rmm_fit_cpu.py                                  # this tree
    cd /tmp && PYTHONPATH=/tmp/base python /path/to/bench/rmm_fit_cpu.py   # another tree
    T=2 python bench/rmm_fit_cpu.py                              # torch threads
"""

import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("T", "1")))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rmm as bench_rmm  # noqa: E402

import registry  # noqa: E402
from registry.weights import rmm  # noqa: E402
from registry.weights.adapters import load_peft_adapter  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".bench-data" / "rmm"


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    print(registry.__file__, f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    folders = bench_rmm.generate(DATA, 32, 8, 16, 32)
    for _ in range(2):
        c, t = cpu(), time.perf_counter()
        ads = [load_peft_adapter(f) for f in folders]
        tr, cr = time.perf_counter() - t, cpu() - c
        c, t = cpu(), time.perf_counter()
        basis = rmm.fit_basis(ads, p=4)
        tf, cf = time.perf_counter() - t, cpu() - c
        print(f"read {tr:.2f}s (cpu {cr:.2f}) fit {tf:.2f}s (cpu {cf:.2f}) wall ratio {tf / tr:.2f} "
              f"cpu ratio {cf / cr:.2f}", flush=True)
    print("errors", [round(e.overall, 5) for e in basis.member_errors()][:3])


if __name__ == "__main__":
    main()
